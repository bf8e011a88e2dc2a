"""The ``openai`` backend: any OpenAI-compatible **completions** endpoint, many requests in flight.

A question is scored by asking for one generated token at temperature 0 with the top-``K``
log-probabilities of that token, and reading each allowed choice's log-probability from that table
(:mod:`~oni_sys.annotators.openai_parse`); free text is read only from servers that send no
log-probabilities, and then strictly. Requests go through
:mod:`~oni_sys.annotators.openai_transport`, retried (:mod:`~oni_sys.annotators.retry`) behind a
circuit breaker (:mod:`~oni_sys.annotators.circuit_breaker`). What the servers return, and how
failures and the API key are handled: docs/ANNOTATOR.md, "The openai backend".
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from oni_sys.annotators.base import BackendError, ChoiceScores, FatalBackendError, Question
from oni_sys.annotators.circuit_breaker import CircuitBreaker
from oni_sys.annotators.openai_parse import (
    extract_choice_logprobs,
    parse_completion_top_logprobs,
    parse_models,
    strict_choice,
)
from oni_sys.annotators.openai_transport import HttpTransport
from oni_sys.annotators.retry import (
    FAILURE_KINDS,
    AttemptFailed,
    RetryCounts,
    RetryPolicy,
    call_with_retries,
)
from oni_sys.annotators.secret import Secret

__all__ = [
    "FAILURE_KINDS",
    "CircuitBreaker",
    "OpenAIBackend",
    "extract_choice_logprobs",
    "parse_completion_top_logprobs",
    "strict_choice",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: the old name of :class:`~oni_sys.annotators.retry.AttemptFailed`
_AttemptFailed = AttemptFailed


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


class OpenAIBackend:
    """Scores questions through an OpenAI-compatible ``/v1/completions`` endpoint.

    Args:
        base_url: server URL up to and including ``/v1`` (``http://127.0.0.1:8000/v1``).
        model: model name to request; ``None``: the first model the server lists.
        api_key_env: environment variable holding the API key (unset or empty: no header).
        concurrency: HTTP requests in flight at once.
        timeout_s: total time allowed for one HTTP request (queueing inside the server included).
        max_retries: retries after the first attempt before :class:`BackendError`.
        backoff_base_s, backoff_max_s: retry ``n`` waits ``uniform(0, min(max, base * 2**n))``.
        breaker_threshold: consecutive failures that open the circuit breaker.
        breaker_cooldown_s: how long the open breaker holds requests back before a probe.
        top_logprobs: ``K``, how many top tokens to ask for (>= number of choices; vLLM's default
            ``--max-logprobs`` is 20, OpenAI's own legacy API allowed 5).
        max_body_bytes: a response body larger than this is a failure, never read into memory.
        space_insensitive: match choices ignoring leading spaces when the exact token is absent
            (only for servers that drop leading spaces; see docs/ANNOTATOR.md).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 60,
        max_retries: int = 5,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30,
        breaker_threshold: int = 5,
        breaker_cooldown_s: float = 5,
        top_logprobs: int = 20,
        max_body_bytes: int = 1 << 20,
        space_insensitive: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if top_logprobs < 1:
            raise ValueError("top_logprobs must be >= 1")
        self.model = model
        #: the model name as the server reports it (filled by :meth:`start`)
        self.model_id: str = model or ""
        self.api_key_env = api_key_env
        self._key = Secret(api_key_env)
        self._http = HttpTransport(
            base_url.rstrip("/"),
            self._key,
            concurrency=int(concurrency),
            timeout_s=float(timeout_s),
            max_body_bytes=int(max_body_bytes),
        )
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.top_logprobs = int(top_logprobs)
        self.space_insensitive = bool(space_insensitive)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown_s)
        self._started = False
        self._warned_space = False
        self._start_lock: asyncio.Lock | None = None  # made in the event loop first used
        self._retry_counts = RetryCounts()
        self._questions: Counter[str] = Counter()

    @property
    def base_url(self) -> str:
        """Server URL up to and including ``/v1``, without a trailing slash."""
        return self._http.base_url

    @property
    def concurrency(self) -> int:
        """HTTP requests in flight at once."""
        return self._http.concurrency

    @property
    def timeout_s(self) -> float:
        """Total time allowed for one HTTP request."""
        return self._http.timeout_s

    @property
    def max_body_bytes(self) -> int:
        """Largest response body accepted."""
        return self._http.max_body_bytes

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> OpenAIBackend:
        """Build from an :class:`oni_sys.config.AnnotatorConfig` (keyword overrides win)."""
        kwargs: dict[str, Any] = {
            "api_key_env": cfg.api_key_env,
            "concurrency": cfg.concurrency,
            "timeout_s": cfg.timeout_s,
            "max_retries": cfg.max_retries,
        }
        kwargs.update(overrides)
        base_url = kwargs.pop("base_url", cfg.base_url)
        model = kwargs.pop("model", cfg.model)
        return cls(base_url, model, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (e.g. to a Ray actor) without the session and with a fresh breaker.

        The key is not pickled either: the receiving process reads ``api_key_env`` itself
        (:class:`~oni_sys.annotators.secret.Secret`).
        """
        state = self.__dict__.copy()
        state["_start_lock"] = None
        state["breaker"] = CircuitBreaker(self.breaker.threshold, self.breaker.cooldown_s)
        return state

    def __repr__(self) -> str:
        model = self.model_id or self.model
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={model!r}, "
            f"concurrency={self.concurrency}, api_key_env={self.api_key_env!r}, "
            f"api_key={self._key!r})"
        )

    # ----------------------------------------------------------------------------------------
    # lifecycle

    def _resources(self) -> None:
        """Bind the HTTP session, the start lock and the breaker to the running event loop."""
        if self._http.bind_loop():
            self._start_lock = asyncio.Lock()
            self.breaker.bind_loop()

    async def __aenter__(self) -> OpenAIBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> str:
        """Check the server once via ``GET /models`` and fill :attr:`model_id`; idempotent.

        Raises :class:`BackendError` if the server cannot be reached after the retries, or does
        not serve the configured model.
        """
        self._resources()
        assert self._start_lock is not None
        async with self._start_lock:
            if self._started:
                return self.model_id
            ids = await self._call("GET", "/models", None, parse_models)
            if self.model is None:
                if not ids:
                    raise FatalBackendError(f"the server at {self.base_url} lists no models")
                if len(ids) > 1:
                    logger.warning("server serves %d models; using the first, %r", len(ids), ids[0])
                self.model_id = ids[0]
            elif self.model in ids:
                self.model_id = self.model
            else:
                raise FatalBackendError(
                    f"the server at {self.base_url} serves {ids}, not the configured model "
                    f"{self.model!r} (set annotator.model to one of them)"
                )
            self._started = True
            logger.info("openai backend ready: %s serving %r", self.base_url, self.model_id)
            return self.model_id

    async def health(self) -> None:
        """One ``GET /models`` without retries; raises :class:`BackendError` if it fails."""
        self._resources()
        try:
            await self._http.request("GET", "/models", None, parse_models)
        except AttemptFailed as failure:
            raise BackendError(
                self._key.redact(
                    f"GET {self.base_url}/models failed ({failure.kind}): {failure.message}"
                )
            ) from None

    async def close(self) -> None:
        """Close the HTTP session (the server, if any, is not ours to stop)."""
        await self._http.close()

    # ----------------------------------------------------------------------------------------
    # scoring

    async def score(self, question: Question) -> ChoiceScores:
        """Log-probabilities of ``question.choices`` as the first generated token.

        Raises :class:`BackendError` after ``max_retries`` failed retries
        (:class:`FatalBackendError` at once for a request the server refuses with HTTP 4xx).
        Choices absent from the top ``K`` get ``-inf``; the caller decides what an answer with no
        allowed choice means.
        """
        if not question.choices:
            raise ValueError("a question needs at least one choice")
        if len(question.choices) > self.top_logprobs:
            raise ValueError(
                f"{len(question.choices)} choices but only top_logprobs={self.top_logprobs} "
                "are asked for"
            )
        t0 = time.monotonic()
        self._questions["total"] += 1
        try:
            if not self._started:
                await self.start()
            payload = {
                "model": self.model_id,
                "prompt": question.prompt,
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": self.top_logprobs,
            }
            attempts = [0]
            top, text = await self._call(
                "POST", "/completions", payload, parse_completion_top_logprobs, attempts
            )
        except BaseException:
            self._questions["failed"] += 1
            raise
        self._questions["ok"] += 1
        if top is None:
            logprobs, how = strict_choice(text, question.choices), ["free_text"]
        else:
            logprobs, how = extract_choice_logprobs(
                top, question.choices, space_insensitive=self.space_insensitive
            )
        if not self._warned_space and "absent_space_variant_seen" in how:
            self._warned_space = True
            logger.warning(
                "an allowed answer was missing from the top log-probabilities although the same "
                "text without its leading space was there: if this server drops leading spaces "
                "of tokens (some vLLM versions with SentencePiece tokenizers), use "
                "space_insensitive=True"
            )
        return ChoiceScores(
            logprobs=logprobs,
            latency=time.monotonic() - t0,
            meta={
                "model": self.model_id,
                "attempts": attempts[0],
                "match": how,
                "text": text,
                "top_logprobs": top,
            },
        )

    async def score_many(self, questions: Iterable[Question]) -> list[ChoiceScores | BaseException]:
        """Score questions concurrently (bounded by ``concurrency``); failures are returned."""
        return await asyncio.gather(*(self.score(q) for q in questions), return_exceptions=True)

    # ----------------------------------------------------------------------------------------
    # HTTP with retries and the breaker

    async def _call(
        self,
        method: str,
        path: str,
        payload: dict | None,
        parse: Callable[[Any], T],
        attempts_out: list[int] | None = None,
    ) -> T:
        """One logical request: attempts through the breaker, with backoff, until one succeeds."""
        self._resources()
        return await call_with_retries(
            lambda: self._http.request(method, path, payload, parse),
            what=f"{method} {self.base_url}{path}",
            policy=RetryPolicy(self.max_retries, self.backoff_base_s, self.backoff_max_s),
            breaker=self.breaker,
            counts=self._retry_counts,
            redact=self._key.redact,
            attempts_out=attempts_out,
        )

    # ----------------------------------------------------------------------------------------
    # metrics

    def latency_samples(self) -> list[float]:
        """Seconds per successful HTTP request, most recent last (bounded window)."""
        return list(self._http.latencies)

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and the progress line (never the API key).

        ``requests_total`` counts HTTP requests sent (retries and the one ``GET /models``
        included); ``questions_*`` count :meth:`score` calls; ``failures`` counts failed attempts by
        kind (``breaker_open`` attempts were not sent); ``retries`` counts waits before another
        attempt; ``max_in_flight`` is the peak of ``requests_in_flight``; ``breaker_opens`` counts
        openings (re-openings after a failed probe included).
        """
        lat = sorted(self._http.latencies)
        failures = self._retry_counts.failures
        return {
            "requests_total": self._http.requests_total,
            "requests_in_flight": self._http.in_flight,
            "max_in_flight": self._http.max_in_flight,
            "questions_total": self._questions["total"],
            "questions_ok": self._questions["ok"],
            "questions_failed": self._questions["failed"],
            "failures": {kind: failures[kind] for kind in FAILURE_KINDS if failures[kind]},
            "failures_total": sum(failures.values()),
            "retries": self._retry_counts.retries,
            "breaker_open": self.breaker.is_open,
            "breaker_state": self.breaker.state,
            "breaker_opens": self.breaker.opens,
            "latency_samples": len(lat),
            "latency_p50_s": _percentile(lat, 0.50),
            "latency_p95_s": _percentile(lat, 0.95),
        }
