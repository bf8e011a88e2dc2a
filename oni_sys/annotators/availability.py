"""Whether the annotator can answer: up, down (since when, why) or failed for good.

Each change is logged once: one warning when it goes down, one when it is up again, one error
when it fails (docs/ANNOTATOR.md, "When the LLM fails: the policy").
"""

from __future__ import annotations

import asyncio
import logging
import time

from oni_sys.annotators.base import Backend, BackendError, FatalBackendError
from oni_sys.annotators.preflight import TROUBLESHOOTING, describe_backend
from oni_sys.config import AnnotatorConfig

logger = logging.getLogger(__name__)

#: failed health checks in a row that make an idle annotator down (one slow answer under load
#: is not an outage)
HEALTH_FAILURES_DOWN = 2


class Availability:
    """The annotator's availability: down from a question that failed after the backend's own
    retries until the next answer; a fatal error, or an outage beyond ``max_outage_s``, is final.

    Not locked: only the service's event loop changes it; other threads read single attributes.
    """

    def __init__(self, cfg: AnnotatorConfig) -> None:
        self.cfg = cfg
        self.down_since: float | None = None  # time.monotonic() when it went down
        self.last_error = ""
        self.failure: str | None = None  # why it can no longer serve the run
        self._health_failures = 0

    @property
    def up(self) -> bool:
        """Answering: neither down nor failed."""
        return self.down_since is None and self.failure is None

    def outage_seconds(self) -> float:
        """How long it has been unable to answer (0 while it answers)."""
        since = self.down_since
        return 0.0 if since is None else time.monotonic() - since

    def mark_down(self, error: str) -> None:
        """A question (or health check) failed after the backend's retries."""
        self.last_error = error
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning(
                "annotator down (%s): %s; questions wait and are asked again",
                describe_backend(self.cfg),
                error,
            )

    def mark_up(self) -> None:
        """The backend answered."""
        since = self.down_since
        if since is not None:
            self.down_since = None
            logger.warning("annotator up again after %.0f s down", time.monotonic() - since)

    def fail(self, message: str) -> None:
        """It can no longer serve the run (the first reason is kept)."""
        if self.failure is None:
            self.failure = message
            logger.error("%s", message)

    def fail_fatal(self, exc: FatalBackendError) -> None:
        """An error no retry can fix (a refused request, a model not served, a crash loop)."""
        self.fail(
            f"the annotator stopped ({describe_backend(self.cfg)}): {exc}; see {TROUBLESHOOTING}"
        )

    def check_outage(self) -> None:
        """Fail once the current outage is longer than ``annotator.max_outage_s``."""
        outage = self.outage_seconds()
        if outage > self.cfg.max_outage_s and self.failure is None:
            self.fail(
                f"the annotator has not answered for {outage:.0f} s, more than "
                f"annotator.max_outage_s={self.cfg.max_outage_s:g} ({describe_backend(self.cfg)}); "
                f"last error: {self.last_error}; see {TROUBLESHOOTING}"
            )

    async def check_health(self, backend: Backend, timeout_s: float) -> None:
        """Ask the backend whether it can answer (its ``health()``, when it has one), so an idle
        annotator's outage shows too."""
        check = getattr(backend, "health", None)
        if check is None:
            return
        try:
            await asyncio.wait_for(check(), timeout=timeout_s)
        except FatalBackendError as exc:
            self.fail_fatal(exc)
        except (BackendError, OSError, TimeoutError, asyncio.TimeoutError) as exc:
            self._health_failures += 1
            if self._health_failures >= HEALTH_FAILURES_DOWN:
                self.mark_down(str(exc) or f"health check: {type(exc).__name__}")
        else:
            self._health_failures = 0
            self.mark_up()
