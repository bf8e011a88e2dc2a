"""The ``openai`` backend: any OpenAI-compatible **completions** endpoint, many requests in flight.

Works against ``vllm serve <model>`` and ``python -m llama_cpp.server`` (and anything else that
speaks ``POST /v1/completions`` with ``logprobs``). A question is scored by asking for exactly one
generated token at temperature 0 with the top-``K`` log-probabilities of that token, and reading
the log-probability of each allowed choice from that top-``K`` table. Free text is never searched.

What the servers return (checked against their sources and, for llama.cpp, a live server):

- ``llama_cpp.server`` (llama-cpp-python 0.3.x): the legacy OpenAI shape,
  ``choices[0].logprobs.top_logprobs[0] == {token_text: logprob, ...}``, up to ``K`` entries plus
  the sampled token. Token texts are detokenised **with** their leading space (Gemma: ``" Yes"``,
  ``" No"``; ``"Yes"`` without the space is a different token with its own entry). The server only
  returns completion logprobs when the model was loaded with ``logits_all`` (the server's default
  is ``--logits_all true``; otherwise it answers HTTP 500). Requests are served one at a time.
- ``vllm serve``: the same legacy shape. Values below ``-9999`` are clamped to ``-9999.0`` by the
  server (JSON has no ``-inf``), which we read back as ``-inf``. The table holds up to ``K + 1``
  entries (the sampled token is added). ``K`` above the server's ``--max-logprobs`` (default 20) is
  rejected with HTTP 400. How a token is spelled in the table depends on the version: old
  releases returned raw vocabulary pieces (``"▁Yes"``, ``"ĠYes"``), which we map back to
  ``" Yes"`` (the marker is unambiguous); some releases decoded each token id in isolation, which
  for SentencePiece tokenizers (Gemma, Llama 2, Mistral) drops the leading space, so ``" Yes"``
  comes back as ``"Yes"``; recent releases restore the space. For servers of the middle kind pass
  ``space_insensitive=True``: a choice whose exact text is absent is then matched ignoring leading
  spaces. It is off by default because on llama.cpp and current vLLM ``"Yes"`` is a *different*
  token from ``" Yes"`` and must not be counted as it. A warning is logged once when an answer
  would only have matched that way.
- Chat-style entries (``logprobs.content[0].top_logprobs == [{"token", "logprob"}, ...]``, as some
  other OpenAI-compatible servers return) are read too.

Both servers compute these log-probabilities from the model's raw logits (llama-cpp-python from
its stored scores; vLLM V1 before temperature or penalties), so ``temperature: 0`` only makes the
generated token greedy and does not distort them.

Failure handling: a semaphore bounds requests in flight; each HTTP request has a total timeout;
connection errors, timeouts, HTTP 429 (``Retry-After`` honoured, capped at ``backoff_max_s``),
HTTP 5xx, bodies over ``max_body_bytes``, malformed JSON and missing fields are retried with
exponential backoff and full jitter, each failure counted by kind in :meth:`OpenAIBackend.stats`;
other HTTP 4xx than 408/425 (a request the server will never accept) fail at once with
:class:`FatalBackendError`, carrying the server's message. A circuit breaker opens
after ``breaker_threshold`` consecutive failures: while open nothing is sent (callers wait for the
cooldown, and each such wait uses up one retry, so :meth:`OpenAIBackend.score` always ends), then
one probe request is let through (half-open); its success closes the breaker, its failure opens it
again. After ``max_retries`` retries :class:`BackendError` is raised: the caller (the annotation
service) should put the question back in its queue, not drop it.

The API key is read once from the environment variable ``api_key_env`` and sent only as an
``Authorization: Bearer`` header; it never appears in ``repr``, logs, stats or error messages (any
text a server echoes back is scrubbed of it too); pickling drops it and the receiving process
reads its own environment variable.

One backend object serves one asyncio event loop at a time (its HTTP session belongs to the loop
that first used it); :meth:`OpenAIBackend.close` it in that loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp

from oni_sys.annotators.base import (
    BackendError,
    ChoiceScores,
    FatalBackendError,
    Question,
    UnparseableAnswer,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: failure kinds counted in ``stats()["failures"]``
FAILURE_KINDS = (
    "connection",  # refused, reset, server went away mid-response
    "timeout",  # no complete answer within timeout_s
    "http_429",  # rate limited
    "http_5xx",  # server error
    "http_4xx",  # request refused (408/425 are retried, others fail at once)
    "body_too_large",  # more than max_body_bytes
    "bad_json",  # body is not JSON
    "empty_choices",  # "choices": []
    "bad_response",  # JSON without the fields we need (e.g. no logprobs)
    "breaker_open",  # not sent: the circuit breaker was open
)

#: values at or below this are "impossible" (vLLM clamps -inf to -9999.0 for JSON)
_LOGPROB_FLOOR = -9999.0
#: SentencePiece and byte-level BPE spell a leading space with these markers in raw vocab pieces
_SPACE_MARKERS = ("\u2581", "\u0120")  # "▁", "Ġ"
_LATENCY_SAMPLES = 2048


class _Secret:
    """Holds the API key; its ``repr`` never shows it."""

    __slots__ = ("value",)

    def __init__(self, value: str | None) -> None:
        self.value = value or None

    def __repr__(self) -> str:
        return "<redacted>" if self.value else "<unset>"

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of the key replaced by ``***``."""
        if self.value and self.value in text:
            return text.replace(self.value, "***")
        return text


class _AttemptFailed(Exception):
    """One HTTP attempt failed (internal; turned into :class:`BackendError` at the end)."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        retryable: bool = True,
        server_fault: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable
        #: counts towards opening the circuit breaker (an answered 4xx means the server is alive)
        self.server_fault = server_fault
        self.retry_after = retry_after


class CircuitBreaker:
    """Consecutive-failure circuit breaker: closed -> open (cooldown) -> half-open (one probe).

    Not thread-safe; used from one event loop. ``clock`` is injectable for tests.
    """

    def __init__(
        self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if threshold < 1:
            raise ValueError("breaker_threshold must be >= 1")
        self.threshold = threshold
        self.cooldown_s = float(cooldown_s)
        self._clock = clock
        self.state = "closed"
        self.consecutive_failures = 0
        self.opens = 0
        self.rejections = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._changed: asyncio.Event | None = None

    def bind_loop(self) -> None:
        """Create the state-change event in the running loop."""
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        """True while requests are held back (open, or half-open with the probe out)."""
        return self.state != "closed"

    def admit(self) -> tuple[bool, bool, float]:
        """``(allowed, is_probe, wait_s)``: may a request be sent now, and if not, for how long to wait."""
        if self.state == "closed":
            return True, False, 0.0
        if self.state == "open":
            remaining = self._opened_at + self.cooldown_s - self._clock()
            if remaining > 0:
                self.rejections += 1
                return False, False, remaining
            self.state = "half_open"
            logger.debug("circuit breaker half-open: sending one probe request")
        if not self._probe_in_flight:
            self._probe_in_flight = True
            return True, True, 0.0
        self.rejections += 1
        return False, False, self.cooldown_s

    def record_success(self, is_probe: bool) -> None:
        """The server answered."""
        self.consecutive_failures = 0
        if is_probe:
            self._probe_in_flight = False
        if self.state != "closed":
            logger.warning("circuit breaker closed: the server answers again")
            self.state = "closed"
            self._probe_in_flight = False
            self._notify()

    def record_failure(self, is_probe: bool) -> None:
        """The server failed (connection, timeout, 429, 5xx, garbage)."""
        self.consecutive_failures += 1
        if is_probe:
            self._probe_in_flight = False
            self._open("probe failed")
        elif self.state == "closed" and self.consecutive_failures >= self.threshold:
            self._open(f"{self.consecutive_failures} consecutive failures")

    def record_abort(self, is_probe: bool) -> None:
        """The attempt was cancelled before an outcome: free the probe slot."""
        if is_probe:
            self._probe_in_flight = False
            self._notify()

    def _open(self, why: str) -> None:
        if self.state != "open":
            self.opens += 1
            # the first opening is worth a warning; re-opening after a failed probe is routine
            logger.log(
                logging.WARNING if self.state == "closed" else logging.DEBUG,
                "circuit breaker open (%s): holding requests back for %.1f s",
                why,
                self.cooldown_s,
            )
        self.state = "open"
        self._opened_at = self._clock()
        self._notify()

    async def wait(self, wait_s: float) -> None:
        """Sleep up to ``wait_s`` (plus a little jitter), waking early when the state changes."""
        event = self._changed
        delay = max(0.0, wait_s) + random.uniform(0.0, 0.05 * self.cooldown_s + 0.01)
        if event is None:
            await asyncio.sleep(delay)
            return
        try:
            await asyncio.wait_for(event.wait(), timeout=delay)
        except (TimeoutError, asyncio.TimeoutError):
            pass


def _unmark(token: str) -> str:
    """A raw vocabulary piece's leading space markers (``▁``/``Ġ``) turned into spaces."""
    n = 0
    while n < len(token) and token[n] in _SPACE_MARKERS:
        n += 1
    return " " * n + token[n:] if n else token


def _logsumexp(values: Iterable[float]) -> float:
    vals = [v for v in values if v != -math.inf]
    if not vals:
        return -math.inf
    top = max(vals)
    return top + math.log(sum(math.exp(v - top) for v in vals))


def extract_choice_logprobs(
    top: Mapping[str, float],
    choices: tuple[str, ...] | list[str],
    *,
    space_insensitive: bool = False,
) -> tuple[list[float], list[str]]:
    """Log-probability of each choice from a top-K table ``{token_text: logprob}``.

    Matching, per choice, first rule that finds something:

    1. ``exact``: the table has the choice's text as a key.
    2. ``marker``: keys that are raw vocabulary pieces whose ``▁``/``Ġ`` space markers, turned into
       spaces, give the choice (old vLLM returned such pieces); several are combined by
       log-sum-exp.
    3. ``space_insensitive`` (only when asked, and only when the choices stay distinct without
       leading spaces): keys equal to the choice ignoring leading spaces, for servers that drop
       the leading space of isolated tokens (see the module docstring).

    Absent choices get ``-inf`` (the token was not among the top K). Returns the log-probabilities
    and, per choice, how it was matched (``exact``, ``marker``, ``space_insensitive``, ``absent``).
    """
    stripped_distinct = len({c.lstrip(" ") for c in choices}) == len(choices)
    unmarked: dict[str, list[float]] = {}
    for token, lp in top.items():
        unmarked.setdefault(_unmark(token), []).append(lp)
    out: list[float] = []
    how: list[str] = []
    for choice in choices:
        if choice in top:
            out.append(float(top[choice]))
            how.append("exact")
            continue
        marked = [lp for token, lp in top.items() if token != choice and _unmark(token) == choice]
        if marked:
            out.append(_logsumexp(marked))
            how.append("marker")
            continue
        loose = [
            lp
            for text, lps in unmarked.items()
            if text.lstrip(" ") == choice.lstrip(" ")
            for lp in lps
        ]
        if space_insensitive and stripped_distinct and loose:
            out.append(_logsumexp(loose))
            how.append("space_insensitive")
            continue
        out.append(-math.inf)
        how.append("absent" if not loose else "absent_space_variant_seen")
    return out, how


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if math.isnan(value):
        return None
    return -math.inf if value <= _LOGPROB_FLOOR else value


def strict_choice(text: str, choices: tuple[str, ...] | list[str]) -> list[float]:
    """Last-resort parser of free text: the answer must be exactly one allowed choice.

    Surrounding whitespace is ignored, nothing else (no case folding, no substring search), so
    "Yes, because..." or "yes" is not an answer. The chosen choice gets log-probability 0 (a
    probability of 1, since no probabilities are known), the others ``-inf``.

    Raises:
        UnparseableAnswer: when the text is not exactly one of the choices.
    """
    hits = [i for i, c in enumerate(choices) if text.strip() == c.strip()]
    if len(hits) != 1:
        raise UnparseableAnswer(
            f"free-text answer {text[:80]!r} is not exactly one of {list(choices)}"
        )
    return [0.0 if i == hits[0] else float("-inf") for i in range(len(choices))]


def parse_completion_top_logprobs(data: Any) -> tuple[dict[str, float] | None, str]:
    """``({token_text: logprob}, generated_text)`` of the first generated token of a response.

    The table is ``None`` when the server sent text but no ``logprobs`` at all (it does not
    support them); :func:`strict_choice` then reads the text as the last resort.

    Raises :class:`_AttemptFailed` (``empty_choices`` or ``bad_response``) when the response
    lacks what we need.
    """
    if not isinstance(data, dict):
        raise _AttemptFailed("bad_response", "response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise _AttemptFailed("bad_response", "response has no 'choices' list")
    if not choices:
        raise _AttemptFailed("empty_choices", "response has an empty 'choices' list")
    first = choices[0]
    if not isinstance(first, dict):
        raise _AttemptFailed("bad_response", "choices[0] is not an object")
    text = first.get("text")
    text = text if isinstance(text, str) else ""
    logprobs = first.get("logprobs")
    if logprobs is None and text:
        # A server without completion logprobs: the caller falls back to the strict parser.
        return None, text
    if not isinstance(logprobs, dict):
        raise _AttemptFailed(
            "bad_response",
            "choices[0] has no 'logprobs' (does the server return completion logprobs? "
            "llama_cpp.server needs --logits_all true)",
        )
    entries: Any
    if "top_logprobs" in logprobs and logprobs["top_logprobs"] is not None:
        table = logprobs["top_logprobs"]
        if not isinstance(table, list) or not table:
            raise _AttemptFailed("bad_response", "'top_logprobs' is not a non-empty list")
        entries = table[0]
    elif isinstance(logprobs.get("content"), list) and logprobs["content"]:
        step = logprobs["content"][0]
        entries = step.get("top_logprobs") if isinstance(step, dict) else None
    else:
        raise _AttemptFailed("bad_response", "'logprobs' has neither 'top_logprobs' nor 'content'")
    top: dict[str, float] = {}
    if isinstance(entries, dict):
        pairs: Iterable[tuple[Any, Any]] = entries.items()
    elif isinstance(entries, list):
        pairs = [
            (e.get("token"), e.get("logprob")) if isinstance(e, dict) else (None, None)
            for e in entries
        ]
    else:
        raise _AttemptFailed("bad_response", "top log-probabilities of the first token are missing")
    for token, value in pairs:
        number = _number(value)
        if not isinstance(token, str) or number is None:
            raise _AttemptFailed("bad_response", "top log-probabilities hold a non-numeric entry")
        top[token] = number
    if not top:
        raise _AttemptFailed("bad_response", "top log-probabilities of the first token are empty")
    return top, text


def _server_message(body: bytes) -> str | None:
    """The message of an error body (``{"error": {"message": ...}}`` as OpenAI, vLLM and
    llama.cpp send it, or ``{"detail": ...}`` / ``{"message": ...}``), at most 300 characters."""
    try:
        data = json.loads(body[:65536])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    candidates = [
        error.get("message") if isinstance(error, dict) else error,
        data.get("detail"),
        data.get("message"),
    ]
    for text in candidates:
        if isinstance(text, str) and text.strip():
            return " ".join(text.split())[:300]
    return None


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


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
            (only for servers that drop leading spaces; see the module docstring).
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
        self.base_url = base_url.rstrip("/")
        self.model = model
        #: the model name as the server reports it (filled by :meth:`start`)
        self.model_id: str = model or ""
        self.api_key_env = api_key_env
        self._key = _Secret(os.environ.get(api_key_env))
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.top_logprobs = int(top_logprobs)
        self.max_body_bytes = int(max_body_bytes)
        self.space_insensitive = bool(space_insensitive)
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown_s)
        self._started = False
        self._warned_space = False
        # per-event-loop resources
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._start_lock: asyncio.Lock | None = None
        # counters
        self._requests_total = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._retries = 0
        self._failures: Counter[str] = Counter()
        self._questions = Counter()
        self._latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)

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
        """Pickle (e.g. to a Ray actor) without the key or the session; see ``__setstate__``."""
        state = self.__dict__.copy()
        state.update(_key=None, _loop=None, _session=None, _semaphore=None, _start_lock=None)
        state["breaker"] = CircuitBreaker(self.breaker.threshold, self.breaker.cooldown_s)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Re-read the key from ``api_key_env`` in the receiving process's environment."""
        self.__dict__.update(state)
        self._key = _Secret(os.environ.get(self.api_key_env))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model_id or self.model!r}, "
            f"concurrency={self.concurrency}, api_key_env={self.api_key_env!r}, "
            f"api_key={self._key!r})"
        )

    # ----------------------------------------------------------------------------------------
    # lifecycle

    def _resources(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._session is None or self._session.closed:
            if self._session is not None and not self._session.closed and self._loop is not loop:
                logger.warning("OpenAIBackend used from a new event loop; opening a new session")
            self._loop = loop
            connector = aiohttp.TCPConnector(limit=self.concurrency + 1)
            self._session = aiohttp.ClientSession(connector=connector, raise_for_status=False)
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._start_lock = asyncio.Lock()
            self.breaker.bind_loop()
        return self._session

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
            ids = await self._call("GET", "/models", None, self._parse_models)
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
            await self._attempt("GET", "/models", None, self._parse_models)
        except _AttemptFailed as failure:
            raise BackendError(
                self._key.redact(
                    f"GET {self.base_url}/models failed ({failure.kind}): {failure.message}"
                )
            ) from None

    async def close(self) -> None:
        """Close the HTTP session (the server, if any, is not ours to stop)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    # ----------------------------------------------------------------------------------------
    # scoring

    async def score(self, question: Question) -> ChoiceScores:
        """Log-probabilities of ``question.choices`` as the first generated token.

        Raises :class:`BackendError` after ``max_retries`` failed retries (:class:`FatalBackendError` at once for a
        request the server refuses with HTTP 4xx). Choices absent from the top ``K`` get
        ``-inf``; the caller decides what an answer with no allowed choice means.
        """
        if not question.choices:
            raise ValueError("a question needs at least one choice")
        if len(question.choices) > self.top_logprobs:
            raise ValueError(
                f"{len(question.choices)} choices but only top_logprobs={self.top_logprobs} are asked for"
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
        """Score questions concurrently (bounded by ``concurrency``); failures are returned, not raised."""
        return await asyncio.gather(*(self.score(q) for q in questions), return_exceptions=True)

    # ----------------------------------------------------------------------------------------
    # HTTP with retries and the breaker

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.backoff_max_s, retry_after) + random.uniform(0.0, self.backoff_base_s)
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2**retry))

    async def _call(
        self,
        method: str,
        path: str,
        payload: dict | None,
        parse: Callable[[Any], T],
        attempts_out: list[int] | None = None,
    ) -> T:
        """One logical request: attempts, backoff and breaker bookkeeping until success or give-up."""
        self._resources()
        budget = self.max_retries + 1
        last: _AttemptFailed | None = None
        last_sent: _AttemptFailed | None = None  # the last failure of a request actually sent
        for attempt in range(budget):
            if attempts_out is not None:
                attempts_out[0] = attempt + 1
            more = attempt + 1 < budget
            allowed, is_probe, wait_s = self.breaker.admit()
            if not allowed:
                self._failures["breaker_open"] += 1
                last = _AttemptFailed("breaker_open", "circuit breaker open: request not sent")
                if more:
                    self._retries += 1
                    await self.breaker.wait(wait_s)
                continue
            try:
                result = await self._attempt(method, path, payload, parse)
            except _AttemptFailed as failure:
                last = last_sent = failure
                self._failures[failure.kind] += 1
                if failure.server_fault:
                    self.breaker.record_failure(is_probe)
                else:
                    self.breaker.record_success(is_probe)
                if not failure.retryable:
                    # A refused request (400 bad request or prompt too long, 401/403 auth, 404
                    # no such model or path): asking again gets the same answer.
                    raise FatalBackendError(
                        self._key.redact(
                            f"{method} {self.base_url}{path} was refused: {failure.message}"
                        )
                    ) from None
                logger.debug(
                    "%s %s%s attempt %d/%d failed (%s): %s",
                    method,
                    self.base_url,
                    path,
                    attempt + 1,
                    budget,
                    failure.kind,
                    self._key.redact(failure.message),
                )
                if more:
                    self._retries += 1
                    await asyncio.sleep(self._backoff(attempt, failure.retry_after))
                continue
            except BaseException:
                self.breaker.record_abort(is_probe)
                raise
            self.breaker.record_success(is_probe)
            return result
        assert last is not None
        message = (
            f"{method} {self.base_url}{path} failed after {budget} attempts; "
            f"last failure ({last.kind}): {last.message}"
        )
        if last_sent is not None and last_sent is not last:
            message += f"; last server failure ({last_sent.kind}): {last_sent.message}"
        message = self._key.redact(message)
        logger.debug("%s", message)  # the caller (the service) says it once per outage
        raise BackendError(message) from None

    async def _attempt(
        self, method: str, path: str, payload: dict | None, parse: Callable[[Any], T]
    ) -> T:
        session = self._resources()
        assert self._semaphore is not None
        headers = {"Accept": "application/json"}
        if self._key.value:
            headers["Authorization"] = f"Bearer {self._key.value}"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self._semaphore:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._requests_total += 1
            t0 = time.monotonic()
            try:
                async with session.request(
                    method, self.base_url + path, json=payload, headers=headers, timeout=timeout
                ) as resp:
                    status = resp.status
                    retry_after = _retry_after_seconds(resp.headers.get("Retry-After"))
                    body = await self._read_capped(resp)
            except _AttemptFailed:
                raise
            except (TimeoutError, asyncio.TimeoutError):
                raise _AttemptFailed(
                    "timeout", f"no complete answer within {self.timeout_s:g} s"
                ) from None
            except aiohttp.ClientError as exc:
                raise _AttemptFailed("connection", f"{type(exc).__name__}: {exc}") from None
            except OSError as exc:
                raise _AttemptFailed("connection", f"{type(exc).__name__}: {exc}") from None
            finally:
                self._in_flight -= 1
        snippet = _server_message(body) if 400 <= status < 500 else None
        snippet = snippet or body[:200].decode("utf-8", errors="replace")
        if status == 429:
            raise _AttemptFailed("http_429", f"HTTP 429: {snippet}", retry_after=retry_after)
        if status >= 500:
            raise _AttemptFailed("http_5xx", f"HTTP {status}: {snippet}", retry_after=retry_after)
        if status >= 400:
            retryable = status in (408, 425)
            raise _AttemptFailed(
                "http_4xx", f"HTTP {status}: {snippet}", retryable=retryable, server_fault=False
            )
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _AttemptFailed("bad_json", f"body is not JSON: {snippet!r}") from None
        result = parse(data)
        self._latencies.append(time.monotonic() - t0)
        return result

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The response body, refusing (and dropping the connection) beyond ``max_body_bytes``."""
        cap = self.max_body_bytes
        if resp.content_length is not None and resp.content_length > cap:
            resp.close()
            raise _AttemptFailed(
                "body_too_large", f"body of {resp.content_length} bytes exceeds {cap} bytes"
            )
        buf = bytearray()
        async for chunk in resp.content.iter_chunked(64 * 1024):
            buf += chunk
            if len(buf) > cap:
                resp.close()
                raise _AttemptFailed("body_too_large", f"body exceeds {cap} bytes")
        return bytes(buf)

    @staticmethod
    def _parse_models(data: Any) -> list[str]:
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise _AttemptFailed("bad_response", "GET /models: no 'data' list")
        ids = [m.get("id") for m in data["data"] if isinstance(m, dict)]
        if not all(isinstance(i, str) for i in ids):
            raise _AttemptFailed("bad_response", "GET /models: a model without a string 'id'")
        return ids

    # ----------------------------------------------------------------------------------------
    # metrics

    def latency_samples(self) -> list[float]:
        """Seconds per successful HTTP request, most recent last (bounded window)."""
        return list(self._latencies)

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and the progress line (never the API key).

        ``requests_total`` counts HTTP requests sent (retries and the one ``GET /models``
        included); ``questions_*`` count :meth:`score` calls; ``failures`` counts failed attempts by
        kind (``breaker_open`` attempts were not sent); ``retries`` counts waits before another
        attempt; ``max_in_flight`` is the peak of ``requests_in_flight``; ``breaker_opens`` counts
        openings (re-openings after a failed probe included).
        """
        lat = sorted(self._latencies)
        return {
            "requests_total": self._requests_total,
            "requests_in_flight": self._in_flight,
            "max_in_flight": self._max_in_flight,
            "questions_total": self._questions["total"],
            "questions_ok": self._questions["ok"],
            "questions_failed": self._questions["failed"],
            "failures": {
                kind: self._failures[kind] for kind in FAILURE_KINDS if self._failures[kind]
            },
            "failures_total": sum(self._failures.values()),
            "retries": self._retries,
            "breaker_open": self.breaker.is_open,
            "breaker_state": self.breaker.state,
            "breaker_opens": self.breaker.opens,
            "latency_samples": len(lat),
            "latency_p50_s": _percentile(lat, 0.50),
            "latency_p95_s": _percentile(lat, 0.95),
        }
