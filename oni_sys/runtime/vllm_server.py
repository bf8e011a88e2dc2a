"""``vllm serve`` placed by Ray on GPUs that the learner does not hold.

:class:`RayVLLMServer` reserves ``tensor_parallel_size`` GPUs (and one CPU) with a ``STRICT_PACK``
placement group, so they are on one node, any node of the cluster that has them free, not
necessarily the caller's. It then runs :class:`~oni_sys.annotators.vllm_backend.VLLMProcess` on
an actor inside that reservation: vLLM inherits the actor's ``CUDA_VISIBLE_DEVICES`` and listens
on the IP of the node it landed on (``ray.util.get_node_ip_address()``; 127.0.0.1 on a
loopback-only Ray instance), since the annotator that asks it questions may run on another node.
It is the server the Ray runtime's annotator actor hands to
:class:`~oni_sys.annotators.vllm_backend.VLLMBackend`: ``base_url``, ``alive()``, ``stop()``
(stops vLLM, kills the actor, frees the reservation). The actor is not detached, so it and vLLM
also go away with their creator.

Why a placement group rather than an actor asking for GPUs: a reservation that cannot be made is
seen at once (``placement_timeout_s``) and reported in one sentence, where an actor would wait
unplaced for as long as vLLM's startup timeout. The reservation is one bundle of
``tensor_parallel_size`` GPUs because ``vllm serve`` runs as one process that must see them all.

Before reserving anything the live nodes are checked: if none has ``tensor_parallel_size`` GPUs
at all, :class:`RuntimeError` says so at once. The Ray runtime also checks this (besides the
learner's GPUs) before it starts any actor (:mod:`oni_sys.runtime.placement`).

vLLM listens on the node's network address without authentication: keep the cluster's nodes on a
private network (the AWS recipe in docs/CLUSTER.md does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from oni_sys.annotators.vllm_backend import (
    VLLMProcess,
    cuda_gpu_count,
    require_gpus,
    require_vllm_package,
)
from oni_sys.runtime.placement import reserve, vllm_bundles
from oni_sys.runtime.ray_local import keep_ray_on_loopback

logger = logging.getLogger(__name__)


def most_gpus_on_a_node() -> int:
    """The most GPUs any live Ray node declares."""
    import ray

    return max(
        (int(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")),
        default=0,
    )


def require_gpus_on_a_node(tensor_parallel_size: int, most: int) -> None:
    """Raise :class:`RuntimeError` (one sentence) unless some node has enough GPUs for vLLM."""
    if most < tensor_parallel_size:
        raise RuntimeError(
            f"The vllm annotator backend needs {tensor_parallel_size} GPU(s) on one Ray node "
            f"(annotator.tensor_parallel_size={tensor_parallel_size}) but the most any live node "
            f"has is {most}; add a GPU node (docs/CLUSTER.md) or use annotator.backend=llamacpp "
            "or openai."
        )


class NodeVLLMProcess(VLLMProcess):
    """A :class:`VLLMProcess` listening on the IP of the Ray node it runs on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import ray

        super().__init__(*args, host=ray.util.get_node_ip_address(), **kwargs)

    def node_id(self) -> str:
        """The Ray node vLLM runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()


class RayVLLMServer:
    """``vllm serve`` on GPUs Ray reserves on some node; :attr:`base_url` once it answers.

    Starts a Ray instance on 127.0.0.1 if this process is not connected to one yet; inside the
    Ray runtime's annotator actor it always is.

    Args:
        model: a Hugging Face model id or a local path, as ``vllm serve`` takes it.
        tensor_parallel_size: GPUs per model, reserved on one node.
        gpu_memory_utilization: fraction of each GPU's memory vLLM may take.
        extra_args: more ``vllm serve`` arguments (e.g. ``["--max-model-len", "2048"]``).
        startup_timeout_s: how long to wait for ``/v1/models`` (model download and load included).
        placement_timeout_s: how long Ray may take to reserve the GPUs.
    """

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 1800.0,
        placement_timeout_s: float = 60.0,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        require_vllm_package()
        if not ray.is_initialized():
            require_gpus(tensor_parallel_size, cuda_gpu_count())  # no Ray started in vain
            keep_ray_on_loopback()
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
        require_gpus_on_a_node(tensor_parallel_size, most_gpus_on_a_node())
        self.model = model
        self._actor: Any = None
        self._pg: Any = reserve(
            vllm_bundles(tensor_parallel_size)[0],
            f"vllm (annotator.tensor_parallel_size={tensor_parallel_size})",
            placement_timeout_s,
        )
        try:
            self._actor = (
                ray.remote(NodeVLLMProcess)
                .options(
                    num_gpus=tensor_parallel_size,
                    num_cpus=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self._pg, placement_group_bundle_index=0
                    ),
                )
                .remote(model, tensor_parallel_size, gpu_memory_utilization, list(extra_args))
            )
            self.base_url: str = ray.get(
                self._actor.wait_ready.remote(startup_timeout_s), timeout=startup_timeout_s + 60
            )
        except BaseException:
            self.stop()
            raise
        logger.info("vllm serving %r at %s (Ray placement group)", model, self.base_url)

    @classmethod
    def from_config(cls, cfg: Any) -> RayVLLMServer:
        """The server an :class:`oni_sys.config.AnnotatorConfig` asks for."""
        return cls(
            cfg.model,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )

    def node_id(self) -> str | None:
        """The Ray node vLLM runs on (None once stopped)."""
        import ray

        if self._actor is None:
            return None
        return ray.get(self._actor.node_id.remote(), timeout=30)

    def alive(self) -> bool:
        """True while the actor and its vLLM process run."""
        import ray

        if self._actor is None:
            return False
        try:
            return bool(ray.get(self._actor.alive.remote(), timeout=30))
        except Exception:
            return False

    def stop(self) -> None:
        """Stop vLLM, kill the actor and free the GPUs; idempotent."""
        import ray
        from ray.util.placement_group import remove_placement_group

        actor, self._actor = self._actor, None
        pg, self._pg = getattr(self, "_pg", None), None
        if actor is not None:
            try:
                ray.get(actor.stop.remote(), timeout=60)
            except Exception:
                logger.warning("vllm actor did not stop cleanly; killing it", exc_info=True)
            ray.kill(actor)
        if pg is not None:
            remove_placement_group(pg)
