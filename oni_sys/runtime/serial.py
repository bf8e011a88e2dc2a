"""The serial runtime: every role in this process, one step at a time, deterministic for a seed.

The mode to debug in: breakpoints work anywhere, and two runs with the same seed produce the
same metrics (but for the clock: ``sps``, ``wall_time``, ``*_time``, ``learner_idle_fraction``,
``runner_busy_fraction``, ``labels_per_s`` and the annotator's latencies), with the reward loop
on too:

- the annotator is *gated*: it asks nothing while the env runner and the policy learner work;
  after every policy update the runtime opens it and waits until every question submitted so
  far is answered (:meth:`AnnotationService.answer_all`), so what is asked, ranking pairs
  included, does not depend on how fast the LLM answers;
- the reward learner then takes the new labels and preferences sorted by caption id and runs
  exactly ``reward.updates_per_round`` updates (no time bound, unlike the Ray runtime's).

The wait is bounded: while the annotator is down (or after ``annotator.startup_timeout_s``
without an answer) the runtime does not wait; it trains on, the outage shows in the metrics and
stops the run after ``annotator.max_outage_s`` as in the Ray runtime, and the run is no longer
deterministic (a warning says so once). With ``annotator.enabled=true`` and
``reward.kind=none`` the labels feed nothing: the annotator then works beside training, not
gated and not waited for (only its own ``annotator_*`` metrics depend on its speed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.learners.policy_learner import PolicyLearner
from oni_sys.runtime.base import Runtime

logger = logging.getLogger(__name__)


class SerialRuntime(Runtime):
    """One env runner and the learner, called in turn."""

    def _start_roles(self) -> None:
        offset = self.tracker.updates  # a resumed run plays new episodes, not the old ones again
        self._warned_nondeterministic = False
        self.runner = EnvRunner(self.cfg, runner_index=0, seed_offset=offset)
        self.learner = PolicyLearner(self.cfg, self.runner.interface)
        if self.checkpoint:
            self.learner.load_state_dict(self.checkpoint["learner"]["state"])
        self.runner.set_weights(self.learner.get_weights(), self.learner.version)

    # -- placement: every call runs here, when the driver's loop first needs its result -------
    def _num_runners(self) -> int:
        return 1

    def _sample(self, index: int) -> tuple[_Deferred, _Deferred]:
        fragment = _Deferred(self.runner.sample)
        return fragment, _Deferred(lambda: fragment.result().summary())

    def _learn(self, fragments: list[_Deferred]) -> _Deferred:
        return _Deferred(lambda: self.learner.learn([f.result() for f in fragments]))

    def _wait(self, handles: list[_Deferred], timeout: float | None = None) -> _Deferred:
        return handles[0]  # the oldest call: the loop's order is the order of the calls

    def _get(self, handle: _Deferred) -> Any:
        return handle.result()

    def _publish_weights(self) -> None:
        self.runner.set_weights(self.learner.get_weights(), self.learner.version)

    def _after_learn(self) -> None:
        """The annotator answers, then the reward learner trains: in this order, every update."""
        self._answer_all()
        if self.reward_learner is not None:
            self.reward_learner.round()

    def _answer_all(self) -> None:
        """Let the annotator answer everything submitted so far (bounded; see the module doc)."""
        if self.annotator is None or not self.reward_enabled or self.annotator.answer_all():
            return
        if not self._warned_nondeterministic:
            self._warned_nondeterministic = True
            logger.warning(
                "serial runtime: training on without waiting for the annotator's answers; "
                "this run is no longer deterministic for its seed"
            )

    def _learner_state(self) -> dict[str, Any]:
        return {"state": self.learner.state_dict()}

    def _start_annotator(self):
        from oni_sys.annotators.service import AnnotationService

        # Gated when labels feed the reward; labels only collected (reward.kind=none) change
        # nothing in training, so the annotator then works beside it without being waited for.
        path = self.annotator_store_path()
        return AnnotationService(self.cfg.annotator, path, gated=self.reward_enabled)

    def _start_reward_learner(self) -> LocalRewardLearner:
        return LocalRewardLearner(self)

    def _stop_roles(self) -> None:
        if getattr(self, "runner", None) is not None:
            self.runner.close()


class _Deferred:
    """A call not made yet: the serial runtime's stand-in for a Ray object reference. It runs
    when its result is first asked for, so a sample asked for before an update runs after it,
    with the new weights (policy lag 0)."""

    _UNSET = object()

    def __init__(self, call: Callable[[], Any]):
        self._call = call
        self._value: Any = self._UNSET

    def result(self) -> Any:
        """Run the call (once) and return what it returned."""
        if self._value is self._UNSET:
            self._value = self._call()
        return self._value


class LocalRewardLearner:
    """The reward learner in this process: one round of updates after every policy update,
    on the records in a canonical order (sorted by caption id) and bounded by updates only."""

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
        snapshot = self.learner.round(labels, prefs, max_seconds=None)  # bounded by updates only
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
