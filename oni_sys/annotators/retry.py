"""Retries of one logical request of the ``openai`` backend.

What a failed attempt is (:class:`AttemptFailed`, counted by kind, :data:`FAILURE_KINDS`), how long
to wait before the next one (:class:`RetryPolicy`: exponential backoff with full jitter, or the
server's ``Retry-After``), and the loop that sends attempts through a circuit breaker
(:func:`call_with_retries`).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from oni_sys.annotators.base import BackendError, FatalBackendError
from oni_sys.annotators.circuit_breaker import CircuitBreaker

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


class AttemptFailed(Exception):
    """One attempt failed; :func:`call_with_retries` turns it into a :class:`BackendError`.

    ``kind`` is one of :data:`FAILURE_KINDS`; ``retryable`` is false for a request the server will
    never accept; ``server_fault`` counts towards opening the circuit breaker (an answered 4xx
    means the server is alive); ``retry_after`` is the server's ``Retry-After`` in seconds.
    """

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
        self.server_fault = server_fault
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
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


@dataclass(frozen=True)
class RetryPolicy:
    """How many retries follow the first attempt, and the waits between them."""

    max_retries: int
    backoff_base_s: float
    backoff_max_s: float

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``retry`` (counted from 0).

        Full jitter, ``uniform(0, min(backoff_max_s, backoff_base_s * 2**retry))``; when the
        server sent ``Retry-After``, that (capped at ``backoff_max_s``) plus up to
        ``backoff_base_s``.
        """
        if retry_after is not None:
            return min(self.backoff_max_s, retry_after) + random.uniform(0.0, self.backoff_base_s)
        return random.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2**retry))


@dataclass
class RetryCounts:
    """Failed attempts by kind, and waits before another attempt."""

    failures: Counter[str] = field(default_factory=Counter)
    retries: int = 0


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    policy: RetryPolicy,
    breaker: CircuitBreaker,
    counts: RetryCounts,
    redact: Callable[[str], str],
    attempts_out: list[int] | None = None,
) -> T:
    """``await attempt()`` until it succeeds, at most ``policy.max_retries + 1`` times.

    Each attempt first asks ``breaker``; one it holds back is not sent, is counted as a
    ``breaker_open`` failure and uses up the attempt (its wait ends early when the breaker changes
    state), so this always ends. ``what`` (``"POST http://host/v1/completions"``) names the request
    in messages, all of which go through ``redact``; ``attempts_out[0]`` is kept at the number of
    the current attempt.

    Raises:
        FatalBackendError: at once, when an attempt fails with ``retryable=False``.
        BackendError: when the last attempt failed; the message names the last failure and, if
            that one was the breaker's, the last failure of a request actually sent.
    """
    budget = policy.max_retries + 1
    last: AttemptFailed | None = None
    last_sent: AttemptFailed | None = None  # the last failure of a request actually sent
    for n in range(budget):
        if attempts_out is not None:
            attempts_out[0] = n + 1
        more = n + 1 < budget
        allowed, is_probe, wait_s = breaker.admit()
        if not allowed:
            counts.failures["breaker_open"] += 1
            last = AttemptFailed("breaker_open", "circuit breaker open: request not sent")
            if more:
                counts.retries += 1
                await breaker.wait(wait_s)
            continue
        try:
            result = await attempt()
        except AttemptFailed as failure:
            last = last_sent = failure
            counts.failures[failure.kind] += 1
            if failure.server_fault:
                breaker.record_failure(is_probe)
            else:
                breaker.record_success(is_probe)
            if not failure.retryable:
                # A refused request (400 bad request or prompt too long, 401/403 auth, 404
                # no such model or path): asking again gets the same answer.
                raise FatalBackendError(redact(f"{what} was refused: {failure.message}")) from None
            logger.debug(
                "%s attempt %d/%d failed (%s): %s",
                what,
                n + 1,
                budget,
                failure.kind,
                redact(failure.message),
            )
            if more:
                counts.retries += 1
                await asyncio.sleep(policy.delay(n, failure.retry_after))
            continue
        except BaseException:
            breaker.record_abort(is_probe)
            raise
        breaker.record_success(is_probe)
        return result
    assert last is not None
    message = f"{what} failed after {budget} attempts; last failure ({last.kind}): {last.message}"
    if last_sent is not None and last_sent is not last:
        message += f"; last server failure ({last_sent.kind}): {last_sent.message}"
    message = redact(message)
    logger.debug("%s", message)  # the caller (the annotation service) says it once per outage
    raise BackendError(message) from None
