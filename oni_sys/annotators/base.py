"""Records and the backend interface shared by the annotation store, prompts, backends and service.

A *question* is one prompt whose answer is one of a few allowed *choices* (for example " Yes" /
" No", or " 1" / " 2" for a pair). A backend scores the choices: it returns their
log-probabilities as the LLM's next token, which the caller renormalises over the allowed choices
(so every label comes with a probability). Nothing here parses free text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol


class BackendError(Exception):
    """A backend failed to answer (network, server, malformed response); the question may be retried."""


class FatalBackendError(Exception):
    """The backend cannot answer and no retry will change that: the server refused the request
    (HTTP 400/401/403/404), the model is not served, the prompt is longer than the context, the
    model cannot be loaded, or a supervised model process crashed too often. The message is one
    sentence a user can act on (it carries the server's own message when there is one)."""


class UnparseableAnswer(Exception):
    """The backend answered, but with nothing that maps onto the allowed choices."""


@dataclass(frozen=True)
class Question:
    """One prompt and its allowed answers (each choice is the text of the next token).

    Questions built by :mod:`oni_sys.annotators.prompts` also carry the raw ``captions`` they
    ask about (one for classification, two for a ranking pair; backends that read no prompt,
    such as the rules backend, use them) and ``prefix_len``: ``prompt[:prefix_len]`` is the part
    that is identical for every caption (instructions and worked examples), so a backend may
    evaluate it once and keep its KV cache. ``prefix_len == 0`` means no shared prefix is known.
    """

    prompt: str
    choices: tuple[str, ...]
    captions: tuple[str, ...] = ()
    prefix_len: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.prefix_len <= len(self.prompt):
            raise ValueError(
                f"prefix_len {self.prefix_len} is outside the prompt of {len(self.prompt)} characters"
            )

    @property
    def prefix(self) -> str:
        """The caption-independent start of the prompt (empty when unknown)."""
        return self.prompt[: self.prefix_len]

    @property
    def suffix(self) -> str:
        """The rest of the prompt after :attr:`prefix`."""
        return self.prompt[self.prefix_len :]


@dataclass
class ChoiceScores:
    """Log-probabilities the model gave each choice (``-inf`` when a choice was not seen)."""

    logprobs: list[float]
    #: seconds the backend spent on this question
    latency: float = 0.0
    #: backend-specific details worth keeping for debugging (never the API key)
    meta: dict = field(default_factory=dict)

    def probabilities(self) -> list[float]:
        """Choice probabilities renormalised over the allowed choices."""
        finite = [lp for lp in self.logprobs if math.isfinite(lp)]
        if not finite:
            raise UnparseableAnswer("none of the allowed answers had a probability")
        top = max(finite)
        weights = [math.exp(lp - top) if math.isfinite(lp) else 0.0 for lp in self.logprobs]
        total = sum(weights)
        return [w / total for w in weights]


class Backend(Protocol):
    """An LLM that scores the choices of a question. Implementations are asyncio-friendly."""

    #: identifies the model (and anything else that changes answers, such as quantisation)
    model_id: str

    async def score(self, question: Question) -> ChoiceScores:
        """Score ``question.choices``; raise :class:`BackendError` on failures worth retrying."""
        ...

    async def close(self) -> None:
        """Release connections, servers or model memory."""
        ...
