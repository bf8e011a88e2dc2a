"""llama.cpp scoring in this process: the model that the ``llamacpp`` backend's child process runs.

A question's choices are scored from the next-token logits at the prompt's last position, and
the prompt's shared prefix stays in the KV cache between questions (docs/ANNOTATOR.md, "The
llamacpp backend"). Not thread-safe: one question at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from oni_sys.annotators.base import BackendError, ChoiceScores, FatalBackendError, Question

logger = logging.getLogger(__name__)

_FINGERPRINT_BYTES = 1 << 20
#: distinct prefixes whose tokens are kept (prompt kinds in use at once)
_PREFIX_CACHE = 8


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


def load_error_message(path: str | Path, reason: str) -> str:
    """The one sentence for a GGUF file llama.cpp cannot load."""
    return f"annotator.model: llama.cpp cannot load {str(path)!r} ({reason})"


class LlamaCppModel:
    """Scores questions with llama.cpp in this process, one at a time.

    Args:
        model_path: a GGUF file.
        n_ctx: context length in tokens (prompt and caption together).
        n_threads: CPU threads for llama.cpp.
        seed: llama.cpp seed (scoring is deterministic; kept for completeness).

    Example::

        model = LlamaCppModel(embedded_gguf_path())
        model.score_sync(build_classification("You kill the newt!", cfg)).probabilities()
    """

    def __init__(
        self, model_path: str | Path, n_ctx: int = 2048, n_threads: int = 1, seed: int = 0
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.seed = seed
        self.model_id = model_fingerprint(self.model_path)
        self.llama: Any = None
        self._cached: list[int] = []  # tokens whose KV entries are in the context
        self._prefix_tokens: dict[str, list[int]] = {}
        self._choice_ids: dict[tuple[str, ...], list[int]] = {}
        self.stats: dict[str, float] = {
            "questions": 0,
            "tokens_evaluated": 0,
            "tokens_reused": 0,
            "seconds": 0.0,
        }

    def load(self) -> Any:
        """Load the model (once); raises FatalBackendError if llama.cpp cannot."""
        if self.llama is None:
            from llama_cpp import Llama

            t0 = time.monotonic()
            try:
                self.llama = Llama(
                    str(self.model_path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    n_threads_batch=self.n_threads,
                    seed=self.seed,
                    logits_all=False,  # the last position only: every position costs ~0.5 s
                    # a full sliding-window cache, so trimming it back to the prefix leaves
                    # exactly the prefix's cache
                    swa_full=True,
                    verbose=False,
                )
            except ValueError as exc:
                raise FatalBackendError(load_error_message(self.model_path, str(exc))) from None
            self._cached = []
            logger.info("llama.cpp loaded %s in %.2f s", self.model_id, time.monotonic() - t0)
        return self.llama

    def close(self) -> None:
        """Free the model (it is loaded again on next use)."""
        if self.llama is not None:
            self.llama.close()
            self.llama = None
            self._cached = []

    def tokenize(self, text: str, *, bos: bool) -> list[int]:
        """Tokens of ``text`` as they are fed to the model (control-token text is plain text)."""
        return self.load().tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def _tokens(self, question: Question) -> tuple[list[int], int]:
        """The prompt's tokens and how many of them form the shared prefix (0: none known)."""
        if question.prefix_len <= 0:
            return self.tokenize(question.prompt, bos=True), 0
        prefix = question.prefix
        head = self._prefix_tokens.get(prefix)
        if head is None:
            head = self.tokenize(prefix, bos=True)
            if len(self._prefix_tokens) >= _PREFIX_CACHE:
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
                    raise FatalBackendError(
                        f"the answer {choice!r} is {len(toks)} tokens for {self.model_id}; "
                        "every choice must be exactly one token"
                    )
                ids.append(toks[0])
            self._choice_ids[choices] = ids
        return ids

    def score_sync(self, question: Question) -> ChoiceScores:
        """Log-probabilities of ``question.choices`` as the next token after the prompt.

        Raises:
            FatalBackendError: a choice is not exactly one token, or the prompt does not fit
                ``n_ctx``, or the model cannot be loaded.
            BackendError: llama.cpp failed to evaluate the prompt (worth a retry).
        """
        return self._score(question, reuse=True)

    def score_from_scratch(self, question: Question, *, one_batch: bool = False) -> ChoiceScores:
        """Score on an emptied context (for checks, not for serving).

        By default the prompt is evaluated in the same batches as :meth:`score_sync` (the prefix,
        then the suffix), so the result equals the cached path's. ``one_batch=True`` evaluates
        the whole prompt in one batch: llama.cpp's CPU kernels round differently for other batch
        shapes, so this differs by up to ~0.2 nats.
        """
        self._cached = []
        if self.llama is not None:
            self.llama.reset()
        return self._score(question, reuse=False, one_batch=one_batch)

    def _score(self, question: Question, *, reuse: bool, one_batch: bool = False) -> ChoiceScores:
        import llama_cpp

        if not question.choices:
            raise FatalBackendError("a question needs at least one choice")
        t0 = time.monotonic()
        llama = self.load()
        choice_ids = self._choices(question.choices)
        tokens, n_prefix = self._tokens(question)
        if len(tokens) > self.n_ctx:
            raise FatalBackendError(
                f"the prompt has {len(tokens)} tokens, more than annotator.n_ctx={self.n_ctx}; "
                "raise annotator.n_ctx"
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
