"""The ``llamacpp`` backend: llama.cpp in-process on CPU (default: the embedded Gemma 3 270M).

A question is scored by evaluating its prompt and reading the next-token logits at the **last
position only** (no ``logits_all``: with Gemma's 262k-token vocabulary, logits for every prompt
position cost ~0.5 s a question). Log-softmax over the full vocabulary gives each choice's
log-probability; the caller renormalises over the choices.

Prefix reuse: the tokens whose KV entries sit in the context are remembered, and a new prompt
only evaluates what follows their longest common prefix. Questions built by
:mod:`oni_sys.annotators.prompts` share their instructions and worked examples (the
``Question.prefix_len`` characters), so after the first question only the caption's suffix (a few
dozen tokens) is evaluated. The prefix and the suffix are tokenised separately, so the prefix
tokens never depend on the caption. ``save_state``/``load_state`` would also work but copy the
whole KV cache (tens of MB) on every question; trimming the cache with ``llama_memory_seq_rm``
costs nothing. Gemma 3 uses sliding-window attention, whose default cache drops entries older
than the window; the context is therefore created with ``swa_full=True`` so that a trimmed cache
is exactly the cache of the prefix (checked by a test against evaluation from scratch).

The model is not thread-safe: all llama.cpp work runs in one worker thread under a lock, one
question at a time, so the event loop never blocks. Concurrency above 1 buys nothing here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib.util
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from oni_sys.annotators.base import BackendError, ChoiceScores, Question, UnparseableAnswer

logger = logging.getLogger(__name__)

_FINGERPRINT_BYTES = 1 << 20


def model_fingerprint(path: str | Path) -> str:
    """A cheap identity of a model file: ``<file name>@<12 hex>``.

    Hashes the size and the first and last MiB (the GGUF header with every tensor's name, shape
    and type, and the last tensor's data) instead of the whole file, so it costs milliseconds.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            h.update(f.read(_FINGERPRINT_BYTES))
    return f"{path.name}@{h.hexdigest()[:12]}"


class LlamaCppBackend:
    """Scores questions with llama.cpp in this process (Backend protocol).

    Args:
        model_path: a GGUF file; ``None`` uses the embedded Gemma 3 270M.
        n_ctx: context length in tokens (prompt and caption together).
        n_threads: CPU threads for llama.cpp.
        seed: llama.cpp seed (scoring is deterministic; kept for completeness).

    Example:
        >>> backend = LlamaCppBackend()
        >>> scores = await backend.score(build_classification("You kill the newt!", cfg))
        >>> p_yes, p_no = scores.probabilities()
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        n_ctx: int = 2048,
        n_threads: int = 1,
        seed: int = 0,
    ) -> None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError(
                "the llamacpp annotator backend needs llama-cpp-python: "
                "pip install 'oni-sys[llamacpp]'"
            )
        if model_path is None:
            from oni_sys.annotators.embedded_model import embedded_gguf_path

            model_path = embedded_gguf_path()
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ValueError(f"annotator.model: {str(path)!r} is not a GGUF file")
        self.model_path = path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.seed = seed
        self.model_id = model_fingerprint(path)
        self._llama: Any = None
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llamacpp"
        )
        self._cached: list[int] = []  # tokens whose KV entries are in the context
        self._prefix_tokens: dict[str, list[int]] = {}
        self._choice_ids: dict[tuple[str, ...], list[int]] = {}
        self.stats: dict[str, float] = {
            "questions": 0,
            "tokens_evaluated": 0,
            "tokens_reused": 0,
            "seconds": 0.0,
        }

    # ------------------------------------------------------------------------------------------
    # lifecycle

    def _load(self) -> Any:
        if self._llama is None:
            from llama_cpp import Llama

            t0 = time.monotonic()
            try:
                self._llama = Llama(
                    str(self.model_path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    seed=self.seed,
                    logits_all=False,
                    swa_full=True,
                    verbose=False,
                )
            except ValueError as exc:
                raise ValueError(
                    f"annotator.model: llama.cpp cannot load {str(self.model_path)!r} ({exc})"
                ) from None
            self._cached = []
            logger.info(
                "llamacpp backend loaded %s in %.2f s", self.model_id, time.monotonic() - t0
            )
        return self._llama

    async def start(self) -> str:
        """Load the model now (otherwise the first question does); returns :attr:`model_id`."""
        await self._run(self._locked(self._load))
        return self.model_id

    async def close(self) -> None:
        """Free the model and stop the worker thread (the backend cannot be used afterwards)."""

        def free() -> None:
            if self._llama is not None:
                self._llama.close()
                self._llama = None
                self._cached = []

        try:
            await self._run(self._locked(free))
        finally:
            self._executor.shutdown(wait=False)

    def _locked(self, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            with self._lock:
                return fn(*args)

        return call

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------------------------------
    # scoring

    async def score(self, question: Question) -> ChoiceScores:
        """Log-probabilities of ``question.choices`` as the next token after the prompt.

        Raises:
            ValueError: a choice is not exactly one token of this model's vocabulary.
            UnparseableAnswer: the prompt does not fit ``n_ctx``.
            BackendError: llama.cpp failed to evaluate the prompt (worth a retry).
        """
        return await self._run(self._locked(self.score_sync), question)

    def tokenize(self, text: str, *, bos: bool) -> list[int]:
        """Tokens of ``text`` as this backend feeds them (control-token text is plain text)."""
        llama = self._load()
        return llama.tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def _tokens(self, question: Question) -> tuple[list[int], int]:
        """The prompt's tokens and how many of them form the shared prefix (0: none known)."""
        if question.prefix_len <= 0:
            return self.tokenize(question.prompt, bos=True), 0
        prefix = question.prefix
        head = self._prefix_tokens.get(prefix)
        if head is None:
            head = self.tokenize(prefix, bos=True)
            if len(self._prefix_tokens) >= 8:
                self._prefix_tokens.pop(next(iter(self._prefix_tokens)))
            self._prefix_tokens[prefix] = head
        return head + self.tokenize(question.suffix, bos=False), len(head)

    def _choices(self, choices: tuple[str, ...]) -> list[int]:
        ids = self._choice_ids.get(choices)
        if ids is None:
            ids = []
            for choice in choices:
                toks = self.tokenize(choice, bos=False)
                if len(toks) != 1:
                    raise ValueError(
                        f"the answer {choice!r} is {len(toks)} tokens for {self.model_id}; "
                        "every choice must be exactly one token"
                    )
                ids.append(toks[0])
            self._choice_ids[choices] = ids
        return ids

    def score_sync(self, question: Question) -> ChoiceScores:
        """Blocking :meth:`score`; call it from one thread at a time (``score`` does)."""
        return self._score(question, reuse=True)

    def score_from_scratch(self, question: Question, *, one_batch: bool = False) -> ChoiceScores:
        """Score on an emptied context (for checks, not for serving).

        By default the prompt is evaluated in the same batches as :meth:`score` (the prefix, then
        the suffix), so the result must equal the cached path's exactly. ``one_batch=True``
        evaluates the whole prompt in one batch instead: llama.cpp's CPU kernels round
        differently for different batch shapes, so this differs by up to ~0.2 nats.
        """
        with self._lock:
            self._cached = []
            if self._llama is not None:
                self._llama.reset()
            return self._score(question, reuse=False, one_batch=one_batch)

    def _score(self, question: Question, *, reuse: bool, one_batch: bool = False) -> ChoiceScores:
        import llama_cpp

        if not question.choices:
            raise ValueError("a question needs at least one choice")
        t0 = time.monotonic()
        llama = self._load()
        choice_ids = self._choices(question.choices)
        tokens, n_prefix = self._tokens(question)
        if len(tokens) > self.n_ctx:
            raise UnparseableAnswer(
                f"the prompt has {len(tokens)} tokens, more than n_ctx={self.n_ctx}"
            )
        if n_prefix >= len(tokens):
            n_prefix = 0  # an empty suffix: nothing to split off
        # Reuse the cached prefix only, never a longer common prefix with the previous caption:
        # llama.cpp's CPU kernels round differently for different batch shapes, so evaluating
        # the whole suffix in one batch on top of the prefix makes a caption's score independent
        # of which question came before (and equal to a fresh evaluation in the same batches).
        reused = n_prefix > 0 and reuse and self._cached[:n_prefix] == tokens[:n_prefix]
        try:
            self._cached = []
            if reused:
                llama.n_tokens = n_prefix  # eval() trims the KV cache after the prefix
            else:
                llama.reset()
                if n_prefix and not one_batch:
                    llama.eval(tokens[:n_prefix])
            llama.eval(tokens[llama.n_tokens :])
            ptr = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
            if not ptr:
                raise RuntimeError("llama.cpp returned no logits")
            logits = np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),))
            top = float(logits.max())
            log_z = top + math.log(float(np.exp(logits - top, dtype=np.float64).sum()))
            logprobs = [float(logits[i]) - log_z for i in choice_ids]
        except Exception as exc:
            llama.reset()
            raise BackendError(f"llama.cpp failed to evaluate the prompt: {exc}") from exc
        self._cached = tokens
        latency = time.monotonic() - t0
        evaluated = len(tokens) - n_prefix if reused else len(tokens)
        self.stats["questions"] += 1
        self.stats["tokens_evaluated"] += evaluated
        self.stats["tokens_reused"] += len(tokens) - evaluated
        self.stats["seconds"] += latency
        return ChoiceScores(
            logprobs=logprobs,
            latency=latency,
            meta={
                "model": self.model_id,
                "prompt_tokens": len(tokens),
                "evaluated_tokens": evaluated,
            },
        )
