"""The annotation service's counters and the metrics row computed from them."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

#: seconds of label times behind ``labels_per_s``
RATE_WINDOW_S = 60.0


class Timings(NamedTuple):
    """Latencies (sorted) and recent label times, copied while the service's lock is held."""

    latencies: list[float]
    recent: list[float]
    now: float


@dataclass
class ServiceStats:
    """Counters behind :meth:`AnnotationService.metrics`."""

    questions_seen: int = 0
    store_hits: int = 0
    requests_total: int = 0
    labels_total: int = 0
    unlabelable_total: int = 0
    parse_failures: int = 0
    backend_errors: int = 0
    preferences_total: int = 0
    dropped: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=2000))
    label_times: deque = field(default_factory=lambda: deque(maxlen=2000))

    #: the counters that add up over a run (a resumed run continues them)
    COUNTERS = (
        "questions_seen",
        "store_hits",
        "requests_total",
        "labels_total",
        "unlabelable_total",
        "parse_failures",
        "backend_errors",
        "preferences_total",
        "dropped",
    )

    #: the counters that the metrics row reports, and their keys there
    IN_METRICS = {
        "requests_total": "annotator_requests_total",
        "labels_total": "labels_total",
        "preferences_total": "preferences_total",
        "unlabelable_total": "unlabelable_total",
        "parse_failures": "annotator_parse_failures",
        "backend_errors": "annotator_backend_errors",
        "dropped": "annotator_dropped",
    }

    def state_dict(self) -> dict[str, object]:
        """The counters and the latencies behind p50/p95 (call with the lock held); label
        times are clock readings of this process and start afresh."""
        state: dict[str, object] = {k: getattr(self, k) for k in self.COUNTERS}
        state["latencies"] = list(self.latencies)
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Add a previous session's :meth:`state_dict` to these counters (call with the lock
        held); keys it lacks count as 0."""
        for key in self.COUNTERS:
            setattr(self, key, getattr(self, key) + int(state.get(key, 0) or 0))
        older = [float(x) for x in state.get("latencies", ()) or ()]
        self.latencies.extendleft(reversed(older[-(self.latencies.maxlen or 0) :]))

    def timings(self) -> Timings:
        """The latencies and the label times of the last minute (call with the lock held)."""
        now = time.perf_counter()
        recent = [t for t in self.label_times if now - t < RATE_WINDOW_S]
        return Timings(sorted(self.latencies), recent, now)

    def row(
        self,
        timings: Timings,
        *,
        queue: int,
        in_flight: int,
        up: bool,
        outage_s: float,
        restarts: int,
    ) -> dict[str, float]:
        """The metrics row: these counters with the queue, availability and timing figures."""
        lat, recent, now = timings
        window = min(RATE_WINDOW_S, max(now - recent[0], 1e-9)) if recent else RATE_WINDOW_S
        return {
            "annotator_queue": queue,
            "annotator_in_flight": in_flight,
            **{name: getattr(self, counter) for counter, name in self.IN_METRICS.items()},
            "labels_per_s": len(recent) / window if recent else 0.0,
            "annotator_latency_p50": lat[len(lat) // 2] if lat else float("nan"),
            "annotator_latency_p95": lat[int(len(lat) * 0.95)] if lat else float("nan"),
            "annotator_store_hit_rate": self.store_hits / self.questions_seen
            if self.questions_seen
            else float("nan"),
            "annotator_up": 1.0 if up else 0.0,
            "annotator_outage_s": outage_s,
            "annotator_restarts": restarts,
        }
