"""The annotator's first check: one real question, answered by the configured backend.

Both ``oni-sys doctor`` and the annotation service (before training starts) run
:func:`probe_backend`, so what the doctor reports is what a run will meet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

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
