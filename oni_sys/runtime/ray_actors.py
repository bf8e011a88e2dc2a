"""The roles as Ray actors, and the driver's handles on them.

- :class:`RunnerActor`, :class:`LearnerActor`: the env runner and the policy learner with the
  few Ray-facing methods the driver calls (fragment + summary as two objects, weights packets).
- :class:`AnnotatorActor` + :class:`RemoteAnnotator`: the annotation service in an actor, and
  the driver's fire-and-forget handle (bounded submits, latest metrics, outage detection).
- :class:`RewardLearnerActor` + :class:`RemoteRewardLearner`: the reward learner's rounds on a
  thread of its own actor, pushing snapshots straight to the learner actor.

Ray restarts the annotator and reward-learner actors in place; they rebuild their state from
the label store. Runners are replaced by the driver's :class:`ActorManager`.

Placement: the annotator and the reward learner are pinned to the driver's node (a hard
``NodeAffinitySchedulingStrategy``), so the label store they write is a file on the node where
the run directory is, given to them as an absolute path; the learner and the env runners go
wherever their resources (``runtime.learner_resources``, ``runtime.env_runner_resources``) are.
Every actor answers ``node_id()``.

Task events: the methods called for every fragment, update, metrics row or reward round are
marked :data:`HOT`, so Ray keeps no task event of their calls. Ray keeps the events of every
task in the GCS (up to ``task_events_max_num_task_in_gcs``, 100,000 by default); with them the
gcs_server of a CartPole run grew by megabytes a minute (``docs/PERFORMANCE.md``, "GCS
memory"). The rare calls (creation, checkpoints, preflight, close) still show in Ray's
dashboard and state API.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import ray
import torch

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.annotators.preflight import TROUBLESHOOTING, AnnotatorUnavailable
from oni_sys.annotators.service_metrics import ServiceStats
from oni_sys.config import Config
from oni_sys.contracts import Fragment, FragmentSummary, WeightsPacket
from oni_sys.learners.policy_learner import PolicyLearner
from oni_sys.runtime.actor_manager import ActorManager

if TYPE_CHECKING:  # the driver's base class: ray_runtime.py imports this module
    from oni_sys.runtime.base import Runtime

logger = logging.getLogger(__name__)

#: marks a method called once per fragment, update, metrics row or reward round: Ray keeps no
#: task event of its calls (see the module docstring)
HOT = ray.method(enable_task_events=False)
#: seconds the annotator actor gets to start before its first question's own timeout
PREFLIGHT_START_MARGIN_S = 120.0


class RunnerActor(EnvRunner):
    """An env runner that answers with (fragment, small summary) as two objects.

    It runs at a lower CPU priority than the other roles (``runtime.env_runner_niceness``): on
    a node it shares with the learner, the learner is the bottleneck, and with equal priorities
    the scheduler gives it only its share of the cores (docs/PERFORMANCE.md, "A faster learner").
    """

    def __init__(self, cfg: Config, *args: Any, **kwargs: Any) -> None:
        if cfg.runtime.env_runner_niceness:
            os.nice(cfg.runtime.env_runner_niceness)
        super().__init__(cfg, *args, **kwargs)

    @HOT
    def sample_with_summary(self) -> tuple[Fragment, FragmentSummary]:
        """Sample a fragment; the summary is what the driver needs without the arrays."""
        fragment = self.sample()
        return fragment, fragment.summary()

    @HOT
    def load_packet(self, packet: WeightsPacket) -> None:
        """Load weights published by the learner."""
        self.set_weights(packet.weights, packet.version)

    def pid(self) -> int:
        """Process id (tests use it to kill a runner)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this runner is on."""
        return _node_id()

    @HOT
    def forget_captions(self, ids: list[int]) -> None:
        """Send these captions' texts again when next seen (the driver had to drop them)."""
        self.sent_captions.difference_update(ids)


class LearnerActor(PolicyLearner):
    """The policy learner, publishing weights together with their version."""

    fragments_lost = 0  # fragments whose node died before the learner read them

    def pid(self) -> int:
        """Process id (tests read its CPU priority)."""
        return os.getpid()

    @HOT
    def learn_many(self, *fragments: Fragment) -> dict[str, float]:
        """Learn on fragments passed as separate arguments (Ray resolves each reference)."""
        stats = self.learn(list(fragments))
        stats["version"] = float(self.version)
        return stats

    @HOT
    def learn_available(self, refs: list[Any]) -> dict[str, float]:
        """Learn on the fragments behind ``refs`` that still exist: a fragment stored on a node
        that died is lost with it, and counted in ``fragments_lost`` (the run goes on)."""
        import ray

        fragments = []
        for ref in refs:
            try:
                fragments.append(ray.get(ref))
            except ray.exceptions.ObjectLostError:
                self.fragments_lost += 1
        if fragments:
            stats = self.learn(fragments)
        else:
            stats = {"trained": 0.0, "policy_lag_max": 0.0}
        stats["version"] = float(self.version)
        stats["fragments_lost"] = float(self.fragments_lost)
        return stats

    def state_dict(self) -> dict[str, Any]:
        """The policy learner's state, with ``fragments_lost`` (a counter over the run)."""
        return {**super().state_dict(), "fragments_lost": self.fragments_lost}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (older checkpoints and the serial runtime's: 0)."""
        super().load_state_dict(state)
        self.fragments_lost = int(state.get("fragments_lost", 0))

    @HOT
    def weights_packet(self) -> WeightsPacket:
        """Weights and their version, as one object for every runner to read."""
        return WeightsPacket(self.get_weights(), self.version)

    @HOT
    def set_reward_snapshot(self, snapshot: Any) -> None:
        """Use a newer intrinsic-reward snapshot (pushed by the reward learner)."""
        super().set_reward_snapshot(snapshot)

    def reward_snapshot_version(self) -> int:
        """Version of the reward snapshot in use (a restarted reward learner publishes above it)."""
        return int(self.intrinsic.snapshot_version)

    @HOT
    def reward_table(self) -> dict[str, Any]:
        """The per-caption intrinsic reward table (``intrinsic_rewards.json``)."""
        return self.intrinsic.table()

    def node_id(self) -> str:
        """The Ray node this learner is on."""
        return _node_id()


def _node_id() -> str:
    """The Ray node id (hex) of this process."""
    import ray

    return ray.get_runtime_context().get_node_id()


def on_driver_node() -> Any:
    """A scheduling strategy that places an actor on the node of this (driver) process, or
    nowhere: it never moves to another node, not even when Ray restarts it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=_node_id(), soft=False)


def _worker_logging() -> None:
    """Give this Ray worker's ``oni_sys`` loggers the CLI's format and level (Ray forwards
    worker output to the driver; without a handler only bare warnings would show)."""
    root = logging.getLogger("oni_sys")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def _actor_restarted() -> bool:
    """True in an actor that Ray restarted after its process died."""
    import warnings

    import ray

    with warnings.catch_warnings():
        # Ray 2.60 reads the restart count through its deprecated ray.state API and says so
        # once per actor; the property itself is the documented way to ask.
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class AnnotatorActor:
    """The annotation service inside a Ray actor (its own thread keeps the LLM busy).

    Ray restarts the actor when its process dies; the new one reopens the store, asks again
    every caption that was submitted but not answered, and publishes the stored labels again
    (the labels the old one had not yet handed to the reward learner are among them).
    """

    def __init__(self, cfg: Config, store_path: str):
        from oni_sys.annotators.service import AnnotationService

        _worker_logging()
        server = None
        if cfg.annotator.backend == "vllm":  # vLLM on GPUs Ray reserves (any node), not here
            from oni_sys.runtime.vllm_server import RayVLLMServer

            server = RayVLLMServer.from_config(cfg.annotator)
        try:
            self.service = AnnotationService(cfg.annotator, store_path, vllm_server=server)
        except BaseException:
            if server is not None:
                server.stop()
            raise
        if _actor_restarted():
            owed = self.service.requeue_missing()
            self.service.republish_stored()
            logger.warning(
                "annotator restarted (pid %d): %d captions asked again", os.getpid(), owed
            )

    def preflight(self) -> str | None:
        """Ask one real question; None when answered, else the one-sentence reason."""
        try:
            self.service.preflight()
        except AnnotatorUnavailable as exc:
            return str(exc)
        return None

    def version(self) -> str:
        """The annotator version its labels are stored under."""
        return self.service.version

    def node_id(self) -> str:
        """The Ray node this annotator (and its label store) is on."""
        return _node_id()

    @HOT
    def submit(self, texts: dict[int, str], sightings: dict[int, int]) -> None:
        """Queue captions; returns at once."""
        self.service.submit(texts, sightings)

    @HOT
    def status(self) -> dict[str, Any]:
        """The service's metrics, its failure (None while it can serve) and this process id."""
        return {
            "metrics": self.service.metrics(),
            "failure": self.service.failure(),
            "pid": os.getpid(),
        }

    @HOT
    def poll_records(self):
        """New labels and preferences with their texts (for the reward learner)."""
        return self.service.poll_records()

    def stored_records(self):
        """Every stored label and preference of this version (for a restarted reward learner)."""
        return self.service.stored_records()

    def requeue_missing(self) -> int:
        """Ask again every stored caption without an answer (a resumed run)."""
        return self.service.requeue_missing()

    def state_dict(self) -> dict[str, Any]:
        """The service's cumulative counters (for the run's checkpoint)."""
        return self.service.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the counters of a resumed run."""
        self.service.load_state_dict(state)

    def close(self) -> None:
        """Write what is answered and stop."""
        self.service.close()


class RemoteAnnotator:
    """The driver's handle on the annotator actor: every call is fire-and-forget.

    Metrics are requested in the background and the latest answer is reported, so a slow or
    dead annotator never holds up the training loop. At most :attr:`MAX_SUBMITS` submits are
    in flight; captions beyond that wait here, merged, and the least seen of them are dropped
    (and counted) past ``annotator.max_queue``: their env runners send them again when seen again.
    """

    MAX_SUBMITS = 8

    def __init__(self, cfg: Config, store_path, forget=None):
        import ray

        self.cfg = cfg
        #: where the store is, on the driver's node (an absolute path: the actor's working
        #: directory is not the driver's)
        self.store_path = os.path.abspath(os.fspath(store_path))
        actor_cls = ray.remote(AnnotatorActor).options(
            num_cpus=cfg.runtime.annotator_cpus,
            max_concurrency=4,
            max_restarts=-1,  # for as long as the outage limit allows
            max_task_retries=-1,  # submits sent to a dying actor reach its successor
            scheduling_strategy=on_driver_node(),  # the store is a file beside the run directory
        )
        self.manager = ActorManager(
            "annotator", lambda _: actor_cls.remote(cfg, self.store_path), restart="ray"
        )
        self.actor = self.manager[0]
        self.forget = forget
        self._status = self.manager.latest(0, "status", ("metrics", "failure", "pid"))
        self._status.value["metrics"] = dict.fromkeys(
            ("labels_total", "annotator_queue", "annotator_requests_total")
        )
        #: the annotator version (known after :meth:`preflight`)
        self.version: str | None = None
        self.dropped = 0
        self._restarts_before = 0  # actor restarts of earlier sessions (resume)
        self._state: dict[str, Any] = {}  # the last state the actor gave (for checkpoints)
        self._submits: list[Any] = []
        self._texts: dict[int, str] = {}
        self._counts: Counter[int] = Counter()

    def preflight(self) -> None:
        """Ask one real question through the actor; raise AnnotatorUnavailable if it cannot."""
        import ray

        from oni_sys.annotators.preflight import describe_backend

        # The question itself is bounded by annotator.startup_timeout_s inside the actor; the
        # margin is for the actor's own start (a process, the model loaded) on the driver's node.
        timeout_s = self.cfg.annotator.startup_timeout_s + PREFLIGHT_START_MARGIN_S
        try:
            failure = ray.get(self.actor.preflight.remote(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            failure = (
                f"the annotator actor did not answer its first question within {timeout_s:g} s "
                f"({describe_backend(self.cfg.annotator)}; annotator.startup_timeout_s plus "
                f"{PREFLIGHT_START_MARGIN_S:g} s to start it); see {TROUBLESHOOTING}"
            )
        except ray.exceptions.RayError as exc:  # the actor could not even start
            cause = str(exc).strip().splitlines()[-1][:400]
            failure = (
                f"the annotator actor could not start ({describe_backend(self.cfg.annotator)}): "
                f"{cause}; see {TROUBLESHOOTING}"
            )
        if failure:
            raise AnnotatorUnavailable(failure)
        self.version = ray.get(self.actor.version.remote())

    def requeue_missing(self) -> int:
        """Ask again every stored caption without an answer (a resumed run)."""
        import ray

        return int(ray.get(self.actor.requeue_missing.remote()))

    def state_dict(self) -> dict[str, Any]:
        """The cumulative counters, for the checkpoint, with the driver's own drops and the
        actor's restarts: the actor's, asked now (so they are never below a row already
        logged); while it is down (or does not answer within 10 s), the last ones known, from
        its state or its latest metrics. Never below a previous checkpoint's."""
        import ray

        fresh: dict[str, Any] | None = None
        if self._status.down_since is None:  # a down actor would hold up the checkpoint
            try:
                fresh = ray.get(self.actor.state_dict.remote(), timeout=10)
            except Exception as exc:  # noqa: BLE001 (a dead helper never makes a checkpoint fail)
                logger.warning(
                    "annotator counters unavailable for this checkpoint (%s); using the last ones",
                    str(exc).splitlines()[0][:300],
                )
        if fresh is None:  # what the latest metrics row saw
            metrics = self._status.value.get("metrics") or {}
            stats = {k: metrics.get(name) for k, name in ServiceStats.IN_METRICS.items()}
            fresh = {"stats": {k: int(v) for k, v in stats.items() if v is not None}}
        old, new = self._state.get("stats") or {}, dict(fresh.get("stats") or {})
        for key, value in old.items():
            if key != "latencies" and isinstance(value, int):
                new[key] = max(value, int(new.get(key, 0) or 0))
        new.setdefault("latencies", old.get("latencies", []))
        restarts = max(int(self._state.get("restarts", 0)), int(fresh.get("restarts", 0) or 0))
        self._state = {"stats": new, "restarts": restarts}
        return {
            **self._state,
            "driver_dropped": self.dropped,
            "actor_restarts": self.manager.restarts + self._restarts_before,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a resumed run's counters (in the actor and here); the first metrics row
        already shows them."""
        import ray

        ray.get(self.actor.load_state_dict.remote(state))
        self.dropped += int(state.get("driver_dropped", 0) or 0)
        self._restarts_before += int(state.get("actor_restarts", 0) or 0)
        self._state = ray.get(self.actor.state_dict.remote())
        self._status.value.update(ray.get(self.actor.status.remote()))

    def submit(self, texts: dict[int, str], sightings: dict[int, int]) -> None:
        """Send captions to the annotator without waiting (bounded, see the class docstring)."""
        import ray

        self._texts.update(texts)
        self._counts.update(sightings)
        if self._submits:
            _, self._submits = ray.wait(self._submits, num_returns=len(self._submits), timeout=0)
        if len(self._submits) < self.MAX_SUBMITS:
            self._submits.append(self.actor.submit.remote(self._texts, dict(self._counts)))
            self._texts, self._counts = {}, Counter()
            return
        excess = len(self._texts) - self.cfg.annotator.max_queue
        if excess > 0:
            least = sorted(self._texts, key=lambda c: self._counts.get(c, 0))[:excess]
            for cid in least:
                del self._texts[cid]
            self.dropped += excess
            if self.forget is not None:
                self.forget(least)

    def _poll(self) -> dict[str, Any]:
        status = self._status.get()
        self.manager.saw_pid(0, status.get("pid"))
        return status

    def metrics(self) -> dict[str, float]:
        """The latest metrics the annotator has answered with (possibly one row old), marked
        down while the actor itself does not answer."""
        status = self._poll()
        out = dict(status.get("metrics") or {})
        if self._status.down_since is not None:
            out["annotator_up"] = 0.0
            out["annotator_outage_s"] = max(
                float(out.get("annotator_outage_s") or 0.0),
                time.monotonic() - self._status.down_since,
            )
        restarts = self.manager.restarts + self._restarts_before
        if out.get("annotator_restarts") is not None or restarts:
            out["annotator_restarts"] = float(out.get("annotator_restarts") or 0) + float(restarts)
        if self.dropped:
            out["annotator_dropped"] = float(out.get("annotator_dropped") or 0) + self.dropped
        return out

    def failure(self) -> str | None:
        """Why the annotator can no longer serve the run, or None."""
        status = self._poll()
        if status.get("failure"):
            return status["failure"]
        since = self._status.down_since
        limit = self.cfg.annotator.max_outage_s
        if since is not None and time.monotonic() - since > limit:
            return (
                f"the annotator actor has not answered for {time.monotonic() - since:.0f} s, "
                f"more than annotator.max_outage_s={limit:g}; see {TROUBLESHOOTING}"
            )
        return None

    def close(self) -> None:
        """Let the annotator write its answers, then stop it."""
        self.manager.close("close")


class RewardLearnerActor:
    """The reward learner as a Ray actor: a thread pulls labels from the annotator, trains in
    rounds and pushes every new snapshot to the policy learner; nobody waits for it."""

    def __init__(self, cfg: Config, annotator, policy_learner, state: dict | None = None):
        import threading

        import ray

        from oni_sys.learners.reward_learner import RewardLearner

        _worker_logging()
        torch.set_num_threads(cfg.runtime.torch_threads)
        self.cfg = cfg
        self.annotator = annotator
        self.policy_learner = policy_learner
        self.learner = RewardLearner(cfg)
        if state is not None:
            self.learner.load_state_dict(state)
        if _actor_restarted():
            # The labels the old process had learned from are in the store; the snapshots it
            # published are in use, so this one's versions continue above them.
            try:
                labels, prefs = ray.get(self.annotator.stored_records.remote(), timeout=120)
                self.learner.add(labels, prefs)
                used = ray.get(self.policy_learner.reward_snapshot_version.remote(), timeout=120)
                self.learner.model.version = max(self.learner.model.version, used)
            except Exception as exc:  # noqa: BLE001 (learning goes on with what arrives later)
                labels, prefs = [], []
                logger.warning("reward learner: stored labels unavailable (%s)", exc)
            logger.warning(
                "reward learner restarted (pid %d): %d labels and %d preferences from the store",
                os.getpid(),
                len(labels),
                len(prefs),
            )
        self.policy_learner.set_reward_snapshot.remote(self.learner.snapshot)
        self._annotator_down = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reward-learner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import ray

        while not self._stop.is_set():
            try:
                labels, prefs = ray.get(self.annotator.poll_records.remote(), timeout=30)
                if self._annotator_down:
                    self._annotator_down = False
                    logger.warning("reward learner: labels arrive again")
            except Exception as exc:  # noqa: BLE001 (an annotator outage only pauses learning)
                if not self._annotator_down:  # one line per change of state, not per round
                    self._annotator_down = True
                    logger.warning(
                        "reward learner: the annotator does not answer (%s); learning goes on "
                        "with the labels it has",
                        str(exc).splitlines()[0][:300],
                    )
                labels, prefs = [], []
            with self._lock:
                snapshot = self.learner.round(labels, prefs)
            if snapshot is not None:
                self.policy_learner.set_reward_snapshot.remote(snapshot)
            self._stop.wait(self.cfg.reward.round_interval_s)

    @HOT
    def metrics(self) -> dict[str, float]:
        """Loss, accuracy, counts, and the newest snapshot version."""
        with self._lock:
            return self.learner.metrics()

    def state_dict(self) -> dict:
        """For the checkpoint (between rounds)."""
        with self._lock:
            return self.learner.state_dict()

    def pid(self) -> int:
        """Process id (tests use it to kill the reward learner)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this reward learner is on."""
        return _node_id()

    def close(self) -> None:
        """Stop the loop."""
        self._stop.set()
        self._thread.join(timeout=30)


class RemoteRewardLearner:
    """The driver's handle on the reward-learner actor (metrics fetched without waiting)."""

    def __init__(self, runtime: Runtime):
        import ray

        cfg = runtime.cfg
        state = None
        if runtime.checkpoint and "reward" in runtime.checkpoint["learner"]:
            state = runtime.checkpoint["learner"]["reward"]
        actor_cls = ray.remote(RewardLearnerActor).options(
            num_cpus=cfg.runtime.reward_learner_cpus,
            max_concurrency=4,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy=on_driver_node(),  # beside the annotator it reads from
        )
        self.manager = ActorManager(
            "reward learner",
            lambda _: actor_cls.remote(cfg, runtime.annotator.actor, runtime.learner, state),
            restart="ray",
        )
        self.actor = self.manager[0]
        self.runtime = runtime
        self._state = state
        self._metrics = self.manager.latest(0, "metrics", ("reward_learner_version",))
        if state is not None:  # resumed: the counters show before the actor first answers
            self._metrics.value.update(
                reward_model_updates=float(state["updates"]),
                reward_labels_seen=float(state["labels_seen"]),
                reward_preferences_seen=float(state["preferences_seen"]),
            )

    def metrics(self) -> dict[str, float]:
        """The latest metrics, plus how many snapshots the policy learner is behind."""
        out = self._metrics.get()
        used = self.runtime.reward_snapshot_version
        if out.get("reward_learner_version") is not None and used is not None:
            out["reward_snapshot_lag"] = out["reward_learner_version"] - used
        return out

    def state_dict(self) -> dict | None:
        """For the checkpoint: the actor's state, or (if it does not answer) the last state it
        gave; a dead helper never makes a checkpoint fail."""
        import ray

        try:
            self._state = ray.get(self.actor.state_dict.remote(), timeout=60)
        except Exception as exc:  # noqa: BLE001
            logger.warning(
                "reward learner state unavailable for this checkpoint (%s); keeping the last one",
                str(exc).splitlines()[0][:300],
            )
        return self._state

    def close(self) -> None:
        """Stop the actor."""
        self.manager.close("close")
