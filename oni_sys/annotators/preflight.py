"""The annotator's first check: one real question, answered by the configured backend.

Both ``oni-sys doctor`` and the annotation service (before training starts) run
:func:`probe_backend`, so what the doctor reports is what a run will meet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from oni_sys.annotators.base import Backend, BackendError, FatalBackendError, Question
from oni_sys.annotators.prompts import build_classification, build_ranking, prompt_kind

#: where a user reads what to do when the annotator cannot answer
TROUBLESHOOTING = "docs/ANNOTATOR.md, section 'Troubleshooting'"
#: the captions the probe asks about: clearly progress, and clearly not
PROBE_POSITIVE = "You kill the newt!"
PROBE_NEGATIVE = "It's a wall."


class AnnotatorUnavailable(Exception):
    """The run needs labels and the annotator cannot give them (at start, or for longer than
    ``annotator.max_outage_s``, or with an error no retry fixes). ``str()`` is one sentence."""


#: the first bytes of every GGUF file
GGUF_MAGIC = b"GGUF"


def annotator_file_problems(cfg, wants: str | None = None) -> list[str]:
    """What is wrong with the files the annotator will read: one sentence per problem.

    ``cfg`` is the ``annotator`` config section. ``annotator.prompt``, when not a built-in
    name, must be a readable, valid template file, of the kind ``wants`` (classification or
    ranking: what the reward model learns from) when given; ``annotator.model`` for the llamacpp backend,
    when given (null: the embedded model), must be a GGUF file. Nothing is loaded: this runs
    before a run writes anything (``oni-sys train``, ``annotate`` and ``doctor``).
    """
    problems = []
    if cfg.prompt not in ("classification", "ranking"):
        if not Path(cfg.prompt).expanduser().exists():
            problems.append(
                f"annotator.prompt: {cfg.prompt!r} is neither a built-in prompt nor an existing "
                "file; use classification, ranking or the path of a template file "
                "(docs/ANNOTATOR.md, 'Prompts')"
            )
        else:
            try:
                kind = prompt_kind(cfg)  # reads and parses the template
            except ValueError as exc:
                text = one_line(str(exc))
                prefix = "annotator.prompt: "
                problems.append(text if text.startswith(prefix) else prefix + text)
            else:
                if wants is not None and kind != wants:
                    problems.append(
                        f"annotator.prompt: {cfg.prompt!r} is a {kind} template, but the reward "
                        f"model learns from {wants} answers; give a {wants} template"
                    )
    if cfg.backend == "llamacpp" and cfg.model:
        problem = _gguf_problem(Path(cfg.model).expanduser())
        if problem:
            problems.append(
                f"annotator.model: {cfg.model!r} {problem}; for annotator.backend=llamacpp give "
                "the path of a GGUF file, or leave annotator.model unset (null) for the "
                "embedded Gemma 3 270M"
            )
    return problems


def _gguf_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable GGUF file, or None."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    try:
        with open(path, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head != GGUF_MAGIC:
        return "is not a GGUF file (it does not start with the bytes GGUF)"
    return None


def probe_question(cfg) -> Question:
    """The question the probe asks, in the configured prompt's kind."""
    if prompt_kind(cfg) == "ranking":
        return build_ranking(PROBE_POSITIVE, PROBE_NEGATIVE, cfg)
    return build_classification(PROBE_POSITIVE, cfg)


def describe_backend(cfg) -> str:
    """``backend X`` plus what identifies it: the URL and model, or the GGUF file."""
    if cfg.backend == "openai":
        return f"backend openai, {cfg.base_url}, model {cfg.model!r}"
    if cfg.backend == "vllm":
        return f"backend vllm, model {cfg.model!r}"
    if cfg.backend == "llamacpp":
        return f"backend llamacpp, model {cfg.model or 'embedded Gemma 3 270M'}"
    return f"backend {cfg.backend}"


@dataclass
class ProbeResult:
    """What one real question showed: whether it was answered, how fast, and the answer."""

    ok: bool
    seconds: float
    #: probability of the first choice (" Yes", or " A" for ranking) when answered
    p_first: float | None = None
    error: str | None = None

    def sentence(self, cfg) -> str:
        """One line for a user: the verdict, the backend and where to look when it failed."""
        if self.ok:
            return (
                f"the annotator answered a real question in {self.seconds:.2f} s "
                f"(P(first choice)={self.p_first:.2f}; {describe_backend(cfg)})"
            )
        return (
            f"the annotator cannot answer a question ({describe_backend(cfg)}): {self.error}; "
            f"see {TROUBLESHOOTING}"
        )


async def probe_backend(backend: Backend, cfg, timeout_s: float) -> ProbeResult:
    """Ask :func:`probe_question` once (with the backend's own retries), within ``timeout_s``."""
    start = time.perf_counter()
    try:
        scores = await asyncio.wait_for(backend.score(probe_question(cfg)), timeout=timeout_s)
        p_first = scores.probabilities()[0]
    except (TimeoutError, asyncio.TimeoutError):
        return ProbeResult(
            False, time.perf_counter() - start, error=f"no answer in {timeout_s:g} s"
        )
    except (BackendError, FatalBackendError) as exc:
        return ProbeResult(False, time.perf_counter() - start, error=one_line(str(exc)))
    except Exception as exc:  # noqa: BLE001 (whatever broke, the user gets one sentence)
        return ProbeResult(
            False, time.perf_counter() - start, error=f"{type(exc).__name__}: {one_line(str(exc))}"
        )
    return ProbeResult(True, time.perf_counter() - start, p_first=p_first)


def one_line(text: object, limit: int = 400) -> str:
    """``text`` with its whitespace collapsed onto one line, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
