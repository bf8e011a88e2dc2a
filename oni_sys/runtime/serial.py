"""The serial runtime: every role in this process, one step at a time, deterministic for a seed.

The mode to debug in: breakpoints work anywhere, and two runs with the same seed produce the
same metrics.
"""

from __future__ import annotations

from typing import Any

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.learners.policy_learner import PolicyLearner
from oni_sys.runtime.base import Runtime


class SerialRuntime(Runtime):
    """One env runner and the learner, called in turn."""

    def _start_roles(self) -> None:
        offset = self.tracker.updates  # a resumed run plays new episodes, not the old ones again
        self.runner = EnvRunner(self.cfg, runner_index=0, seed_offset=offset)
        self.learner = PolicyLearner(self.cfg, self.runner.interface)
        if self.checkpoint:
            self.learner.load_state_dict(self.checkpoint["learner"]["state"])
        self.runner.set_weights(self.learner.get_weights(), self.learner.version)

    def _train_loop(self) -> None:
        per_batch = self.cfg.algo.fragments_per_batch
        while not self.tracker.finished() and not self.stop_requested():
            fragments = []
            for _ in range(per_batch):
                fragment = self.runner.sample()
                self.tracker.on_fragment(fragment.env_steps, fragment.episodes)
                self._on_captions(fragment.new_captions, fragment.caption_sightings())
                fragments.append(fragment)
            stats = self.learner.learn(fragments)
            self.runner.set_weights(self.learner.get_weights(), self.learner.version)
            if self.reward_learner is not None:
                self.reward_learner.round()
            self._after_update(stats)

    def _learner_state(self) -> dict[str, Any]:
        return {"state": self.learner.state_dict()}

    def _start_annotator(self):
        from oni_sys.annotators.service import AnnotationService

        return AnnotationService(self.cfg.annotator, self.annotator_store_path())

    def _start_reward_learner(self) -> LocalRewardLearner:
        return LocalRewardLearner(self)

    def _stop_roles(self) -> None:
        if getattr(self, "runner", None) is not None:
            self.runner.close()


class LocalRewardLearner:
    """The reward learner in this process: one round of updates after every policy update."""

    def __init__(self, runtime: SerialRuntime):
        from oni_sys.learners.reward_learner import RewardLearner

        self.runtime = runtime
        self.learner = RewardLearner(runtime.cfg)
        if runtime.checkpoint and "reward" in runtime.checkpoint["learner"]:
            self.learner.load_state_dict(runtime.checkpoint["learner"]["reward"])
        runtime.learner.set_reward_snapshot(self.learner.snapshot)

    def round(self) -> None:
        """Take new labels from the annotator, train a little, publish a snapshot when due."""
        labels, prefs = self.runtime.annotator.poll_records()
        self.learner.add(labels, prefs)
        snapshot = self.learner.train(self.runtime.cfg.reward.updates_per_round)
        if snapshot is not None:
            self.runtime.learner.set_reward_snapshot(snapshot)

    def metrics(self) -> dict[str, float]:
        """The reward learner's metrics and the snapshot lag (0 here: published at once)."""
        out = self.learner.metrics()
        out["reward_snapshot_lag"] = float(
            self.learner.snapshot.version - self.runtime.learner.intrinsic.snapshot_version
        )
        return out

    def state_dict(self) -> dict:
        """For the checkpoint."""
        return self.learner.state_dict()

    def close(self) -> None:
        """Nothing to release in process."""
