"""The reward learner: distils the annotator's labels into the intrinsic reward model.

It consumes labels (and, for ranking, preferences) as they arrive, trains continuously and
publishes a new :class:`~oni_sys.learners.reward_models.RewardSnapshot` every
``reward.updates_per_snapshot`` updates (hashing: whenever new labels arrived). It never waits
for the policy learner and the policy learner never waits for it: a caption without a label
earns 0 until one arrives.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from oni_sys.config import Config
from oni_sys.contracts import LabelRecord, PreferenceRecord

logger = logging.getLogger(__name__)


class RewardLearner:
    """Owns the reward model, its dataset and optimiser; hands out versioned snapshots."""

    def __init__(self, cfg: Config):
        from oni_sys.learners.reward_models import make_reward_model

        self.cfg = cfg
        self.model = make_reward_model(cfg.reward, cfg.seed)
        self.updates = 0
        self.labels_seen = 0
        self.preferences_seen = 0
        self._since_snapshot = 0
        self._new_data = False
        self._last_stats: dict[str, float] = {}
        self.snapshot = self.model.snapshot()  # version 0, "nothing learned": rewards all 0

    def add(self, labels: list[LabelRecord], preferences: list[PreferenceRecord]) -> int:
        """Add labels and preferences from the annotator; returns how many were new."""
        new = self.model.add_labels(labels) if labels else 0
        new += self.model.add_preferences(preferences) if preferences else 0
        self.labels_seen += len(labels)
        self.preferences_seen += len(preferences)
        self._new_data = self._new_data or new > 0
        return new

    def round(
        self,
        labels: list[LabelRecord],
        preferences: list[PreferenceRecord],
        max_seconds: float | None = 1.0,
    ):
        """One round of the reward learner's schedule, the same in both runtimes: add the new
        records in a canonical order, run up to ``reward.updates_per_round`` updates (stopping
        after ``max_seconds``; None: no time bound), and return a new snapshot when one is due,
        else None.

        Records arrive in the order the LLM answered them; sorting them by caption id makes the
        dataset, and every minibatch drawn from it, independent of that order.

        Example::

            labels, prefs = annotator.poll_records()
            snapshot = reward_learner.round(labels, prefs)
            if snapshot is not None:
                policy_learner.set_reward_snapshot(snapshot)
        """
        labels = sorted(labels, key=lambda r: r.caption_id)
        preferences = sorted(preferences, key=lambda r: (r.id_a, r.id_b))
        self.add(labels, preferences)
        return self.train(self.cfg.reward.updates_per_round, max_seconds)

    def train(self, max_updates: int, max_seconds: float | None = 1.0):
        """Run up to ``max_updates`` updates, stopping early after ``max_seconds`` (None: no time
        bound, so the number of updates does not depend on the clock; the serial runtime's
        choice); return a new snapshot or None."""
        trainable = self.model.kind != "hashing"
        start = time.perf_counter()
        if trainable and (self._new_data or self.updates > 0):
            for _ in range(max_updates):
                stats = self.model.update()
                if not stats:
                    break
                self._last_stats = stats
                self.updates += 1
                self._since_snapshot += 1
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    break
        due = (
            self._new_data
            if not trainable
            else self._since_snapshot >= self.cfg.reward.updates_per_snapshot
        )
        if not due:
            return None
        self._since_snapshot = 0
        self._new_data = False
        self.snapshot = self.model.snapshot()
        return self.snapshot

    def metrics(self) -> dict[str, float]:
        """Loss, held-back accuracy and data counts of the reward model."""
        out = {f"reward_model_{k}": float(v) for k, v in self._last_stats.items()}
        out.update({f"reward_model_eval_{k}": float(v) for k, v in self.model.evaluate().items()})
        out.update(
            {
                "reward_model_updates": float(self.updates),
                "reward_labels_seen": float(self.labels_seen),
                "reward_preferences_seen": float(self.preferences_seen),
                "reward_learner_version": float(self.snapshot.version),
            }
        )
        return out

    def state_dict(self) -> dict[str, Any]:
        """The model with its dataset, optimiser and statistics, and the counters."""
        return {
            "model": self.model.state_dict(),
            "updates": self.updates,
            "labels_seen": self.labels_seen,
            "preferences_seen": self.preferences_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (publishes a snapshot of the restored model)."""
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self.labels_seen = int(state["labels_seen"])
        self.preferences_seen = int(state["preferences_seen"])
        self.snapshot = self.model.snapshot()
