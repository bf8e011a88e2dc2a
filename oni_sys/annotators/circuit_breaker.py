"""A consecutive-failure circuit breaker for a client on one asyncio event loop.

Closed, requests pass; after ``threshold`` consecutive failures it opens and holds requests back
for ``cooldown_s``; then, half-open, it lets one probe through, whose success closes it and whose
failure opens it again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


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
        """``(allowed, is_probe, wait_s)``: may a request be sent now, else how long to wait."""
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
