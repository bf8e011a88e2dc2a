"""The Ray runtime: the driver that places every role as a Ray actor (``ray_actors.py``).

Fragments travel from runners to the learner through the object store (the driver only passes
references and a small summary); weights travel back as one object that every runner reads.
Each runner has exactly one ``sample`` call outstanding and the learner at most
``runtime.max_fragments_in_flight`` fragments queued, so memory stays bounded however fast the
runners are. A runner whose process dies is replaced and training goes on; the annotator and the
reward learner are restarted by Ray when their process dies, and pick up from the label store.

Before it creates any actor the driver checks that the live nodes can hold the run
(:mod:`oni_sys.runtime.placement`); the annotator and the reward learner run on the driver's
node, the learner and the env runners wherever their resources are.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from oni_sys.annotators.preflight import one_line
from oni_sys.config import ConfigError
from oni_sys.runtime.actor_manager import ActorManager
from oni_sys.runtime.base import Runtime
from oni_sys.runtime.placement import (
    check_cluster,
    demand_of,
    placement_problem,
    reserve,
    reserved_node,
)
from oni_sys.runtime.ray_actors import (
    LearnerActor,
    RemoteAnnotator,
    RemoteRewardLearner,
    RunnerActor,
)
from oni_sys.runtime.ray_local import Reaper, start_reaper
from oni_sys.runtime.ray_local import keep_ray_on_loopback as _keep_ray_on_loopback

logger = logging.getLogger(__name__)


class RayRuntime(Runtime):
    """Env runners and the learner as Ray actors, coordinated by this driver."""

    _table_ref: Any = None
    _table: dict[str, Any] | None = None
    _reaper: Reaper | None = None  # stops the local instance's processes if this driver dies

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._learn_inputs: dict[Any, list[Any]] = {}  # learn handle -> its fragment handles

    def _connect(self) -> None:
        import ray

        rt = self.cfg.runtime
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self._started_ray = False
        if not ray.is_initialized():
            if rt.address:
                # A head that answers at all was checked before the run started (ray_check.py,
                # bounded); what Ray still refuses here (auth, versions) is one sentence.
                try:
                    ray.init(address=rt.address, log_to_driver=True)
                except ConnectionError as exc:
                    raise ConfigError(
                        [f"runtime.address: Ray could not join {rt.address} ({one_line(exc)})"]
                    ) from None
            else:
                _keep_ray_on_loopback()
                # A local instance: bound to loopback, with enough logical CPUs for every actor
                # even on a small machine (the actors share the cores; Ray only counts).
                need = rt.num_env_runners * rt.cpus_per_env_runner + rt.learner_cpus
                need += rt.annotator_cpus if self.annotator_enabled else 0.0
                need += rt.reward_learner_cpus if self.reward_enabled else 0.0
                # The custom resources the roles ask for, so the run fits here as on a cluster.
                custom: dict[str, float] = dict(rt.learner_resources)
                for name, amount in rt.env_runner_resources.items():
                    custom[name] = custom.get(name, 0.0) + amount * rt.num_env_runners
                # address="local": a new instance even when RAY_ADDRESS names a cluster
                # (set by `ray start` on this machine, or inside a Ray job).
                ray.init(
                    address="local",
                    num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                    resources=custom or None,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=True,
                )
                self._reaper = start_reaper()
            self._started_ray = True
        # Before any actor exists: a run the live nodes cannot hold fails now, in one sentence,
        # instead of leaving actors pending forever.
        demand = demand_of(
            self.cfg, self._learner_gpus(), self.annotator_enabled, self.reward_enabled
        )
        check_cluster(demand, wait_s=rt.resource_wait_s)
        self._demand = demand
        # The learner's share is reserved now, before the annotator starts: vLLM's reservation
        # (annotator.backend=vllm) must never take the learner's GPU.
        self._learner_pg = reserve(demand.learner, "the learner", max(30.0, rt.resource_wait_s))
        # Ray chose the learner's node: the rest must still fit around it.
        check_cluster(demand, learner_node_id=reserved_node(self._learner_pg))

    def _start_roles(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        rt = self.cfg.runtime
        probe = self.env_interface  # read from one env before the run started
        learner_cls = ray.remote(LearnerActor).options(
            num_cpus=rt.learner_cpus,
            num_gpus=self._learner_gpus(),
            resources=dict(rt.learner_resources),
            max_concurrency=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._learner_pg, placement_group_bundle_index=0
            ),
        )
        # Never restarted: its state is the run, and a silent restart would lose updates.
        self.learners = ActorManager(
            "policy learner", lambda _: learner_cls.remote(self.cfg, probe)
        )
        self.learner = self.learners[0]
        if self.checkpoint:
            ray.get(self.learner.load_state_dict.remote(self.checkpoint["learner"]["state"]))
        self._runner_cls = ray.remote(RunnerActor).options(
            num_cpus=rt.cpus_per_env_runner, resources=dict(rt.env_runner_resources)
        )
        self._spawned = 0
        self.weights = self.learner.weights_packet.remote()
        self.runners = ActorManager(
            "env runner",
            self._spawn_runner,
            count=rt.num_env_runners,
            max_restarts=rt.max_runner_restarts,
            limit_name="runtime.max_runner_restarts",
            restarts=self.tracker.runner_restarts,
        )

    def _learner_gpus(self) -> float:
        """``runtime.learner_gpus``, with -1 resolved: one GPU if CUDA is visible here or the
        cluster has a GPU, else none."""
        gpus = self.cfg.runtime.learner_gpus
        if gpus < 0:
            gpus = 1.0 if torch.cuda.is_available() or _cluster_has_gpu() else 0.0
        return gpus

    def _spawn_runner(self, index: int):
        """A new env runner actor holding the current weights."""
        # Every runner ever started gets a fresh seed offset: a replacement plays new episodes.
        self._spawned += 1
        offset = self.tracker.updates * 1000 + self._spawned
        runner = self._runner_cls.remote(self.cfg, index, offset)
        runner.load_packet.remote(self.weights)
        return runner

    # -- placement: every call is a Ray task ----------------------------------------------------
    def _num_runners(self) -> int:
        return len(self.runners)

    def _sample(self, index: int) -> tuple[Any, Any]:
        return tuple(self.runners.call(index, "sample_with_summary", num_returns=2))

    def _learn(self, fragments: list[Any]) -> Any:
        # Top-level arguments: Ray fetches them to the learner while it still learns on the
        # previous batch. Kept until the result is read, for a batch that must be retried.
        handle = self.learner.learn_many.remote(*fragments)
        self._learn_inputs[handle] = fragments
        return handle

    def _wait(self, handles: list[Any], timeout: float | None = None) -> Any:
        import ray

        done, _ = ray.wait(handles, num_returns=1, timeout=timeout)
        return done[0] if done else None

    def _get(self, handle: Any) -> Any:
        import ray

        fragments = self._learn_inputs.pop(handle, None)
        try:
            return ray.get(handle)
        except ray.exceptions.ObjectLostError:
            if fragments is None:
                raise
        # A fragment of this batch was stored on a node that died (with its env runner): learn
        # on the rest, passed as references the learner resolves one by one.
        logger.warning(
            "a batch lost fragments with a node that left the cluster; learning on the rest"
        )
        return ray.get(self.learner.learn_available.remote(fragments))

    def _runner_lost(self, index: int, exc: Exception) -> bool:
        from ray.exceptions import RayActorError

        if not isinstance(exc, RayActorError):
            return False
        self.runners.replace(index, exc)
        self.tracker.runner_restarts = self.runners.restarts
        self._warn_if_unplaceable()
        return True

    def _warn_if_unplaceable(self) -> None:
        """Say so when the nodes left cannot hold every env runner (a node went away): the
        replacements wait, unseen in any error, until the cluster has room again."""
        import ray

        try:
            problem = placement_problem(
                ray.nodes(),
                ray.get_runtime_context().get_node_id(),
                self._demand,
                reserved_node(self._learner_pg),
            )
        except Exception:  # noqa: BLE001 (a warning must never cost the run)
            logger.debug("placement check after a lost runner failed", exc_info=True)
            return
        if problem is not None:
            logger.warning(
                "%s; the replacement env runners wait until a node has room (training goes on "
                "with the runners that are placed)",
                problem.replace("the cluster cannot place the run: ", "after a lost node, "),
            )

    def _cancel(self, handles: list[Any]) -> None:
        import ray

        for ref in handles:
            ray.cancel(ref, force=False)

    def _batches_in_flight(self) -> int:
        return max(1, self.cfg.runtime.max_fragments_in_flight // self.cfg.algo.fragments_per_batch)

    def _broadcast_every(self) -> int:
        return self.cfg.runtime.broadcast_every

    def _publish_weights(self) -> None:
        self.weights = self.learner.weights_packet.remote()
        self.runners.broadcast("load_packet", self.weights)

    def _start_annotator(self) -> RemoteAnnotator:
        def forget(ids: list[int]) -> None:
            if getattr(self, "runners", None) is not None:
                self.runners.broadcast("forget_captions", ids)

        return RemoteAnnotator(self.cfg, self.annotator_store_path(), forget)

    def _start_reward_learner(self) -> RemoteRewardLearner:
        return RemoteRewardLearner(self)

    def _reward_table(self, fresh: bool) -> dict[str, Any] | None:
        """The learner's table: waited for when ``fresh``, else the latest answer at hand (a
        metrics row must not stall the driver behind queued learn calls; the file is then at
        most one row old) while the next one is asked for."""
        import ray

        if fresh:
            self._table_ref = None
            self._table = ray.get(self.learner.reward_table.remote())
            return self._table
        if self._table_ref is not None:
            ready, _ = ray.wait([self._table_ref], timeout=0)
            if ready:
                self._table, self._table_ref = ray.get(ready[0]), None
        if self._table_ref is None:
            self._table_ref = self.learner.reward_table.remote()
        return self._table

    def _learner_state(self) -> dict[str, Any]:
        import ray

        return {"state": ray.get(self.learner.state_dict.remote())}

    def _stop_roles(self) -> None:
        import ray

        if getattr(self, "runners", None) is not None:
            self.runners.close()
        if getattr(self, "learners", None) is not None:
            self.learners.close()
        if getattr(self, "_learner_pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._learner_pg)
            self._learner_pg = None
        if getattr(self, "_started_ray", False):
            ray.shutdown()
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None


def _cluster_has_gpu() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
