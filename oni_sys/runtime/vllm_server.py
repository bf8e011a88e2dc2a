"""``vllm serve`` placed by Ray: :class:`RayVLLMServer` runs
:class:`~oni_sys.annotators.vllm_backend.VLLMProcess` on an actor that holds
``tensor_parallel_size`` GPUs and is pinned to the caller's node (vLLM listens on 127.0.0.1, and
inherits the actor's ``CUDA_VISIBLE_DEVICES``). It is the server the Ray runtime's annotator actor
hands to :class:`~oni_sys.annotators.vllm_backend.VLLMBackend`: ``base_url``, ``alive()``,
``stop()`` (stops vLLM, kills the actor). The actor is not detached, so it and vLLM also go away
with their creator.
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

logger = logging.getLogger(__name__)


def node_gpus() -> int:
    """GPUs Ray counts on the node of this process (0 if Ray does not list it as alive)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("Alive", True):
            return int(node.get("Resources", {}).get("GPU", 0))
    return 0


class RayVLLMServer:
    """``vllm serve`` on a GPU Ray actor on this node; :attr:`base_url` once it answers.

    Joins Ray (``ray.init()``) if this process is not connected yet; inside the Ray runtime's
    annotator actor it always is.

    Args:
        model: a Hugging Face model id or a local path, as ``vllm serve`` takes it.
        tensor_parallel_size: GPUs per model; the actor requests this many Ray GPUs.
        gpu_memory_utilization: fraction of each GPU's memory vLLM may take.
        extra_args: more ``vllm serve`` arguments (e.g. ``["--max-model-len", "2048"]``).
        startup_timeout_s: how long to wait for ``/v1/models`` (model download and load included).
    """

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 1800.0,
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        require_vllm_package()
        if not ray.is_initialized():
            require_gpus(tensor_parallel_size, cuda_gpu_count())  # no Ray started in vain
            ray.init()
        require_gpus(tensor_parallel_size, node_gpus())
        self.model = model
        self._actor: Any = None
        node_id = ray.get_runtime_context().get_node_id()
        self._actor = (
            ray.remote(VLLMProcess)
            .options(
                num_gpus=tensor_parallel_size,
                num_cpus=1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            )
            .remote(model, tensor_parallel_size, gpu_memory_utilization, list(extra_args))
        )
        try:
            self.base_url: str = ray.get(
                self._actor.wait_ready.remote(startup_timeout_s), timeout=startup_timeout_s + 60
            )
        except BaseException:
            self.stop()
            raise
        logger.info("vllm serving %r at %s (Ray actor on this node)", model, self.base_url)

    @classmethod
    def from_config(cls, cfg: Any) -> RayVLLMServer:
        """The server an :class:`oni_sys.config.AnnotatorConfig` asks for."""
        return cls(
            cfg.model,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )

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
        """Stop vLLM and kill the actor; idempotent."""
        import ray

        actor, self._actor = self._actor, None
        if actor is None:
            return
        try:
            ray.get(actor.stop.remote(), timeout=60)
        except Exception:
            logger.warning("vllm actor did not stop cleanly; killing it", exc_info=True)
        ray.kill(actor)
