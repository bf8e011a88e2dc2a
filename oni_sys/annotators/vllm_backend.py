"""The ``vllm`` backend: the system starts ``vllm serve`` on a GPU Ray actor and talks to it as an
OpenAI-compatible server (:class:`~oni_sys.annotators.openai_backend.OpenAIBackend`).

How it runs:

- :class:`VLLMServer` checks that the ``vllm`` package is importable and that this node has
  ``tensor_parallel_size`` GPUs (as Ray sees them when Ray is running, else as CUDA does), joins or
  starts Ray, and creates a Ray actor that requests ``num_gpus=tensor_parallel_size`` and is pinned
  to **this** node. The actor runs ``vllm serve <model> --host 127.0.0.1 --port <free port>
  --tensor-parallel-size N --gpu-memory-utilization F`` as a subprocess (its own process group;
  Ray's ``CUDA_VISIBLE_DEVICES`` for the actor is inherited, so vLLM uses exactly the GPUs Ray gave
  it), polls ``GET /v1/models`` until the server answers, and returns the base URL.
- The server listens on 127.0.0.1 only, which is why the actor is pinned to the caller's node: the
  process that scores questions (the annotation service) must run on the same node as the
  :class:`VLLMServer` it created.
- :class:`VLLMBackend` is an ``OpenAIBackend`` pointed at that URL that owns the server:
  ``await backend.close()`` (or :meth:`VLLMServer.stop`) terminates vLLM and kills the actor. The
  actor is not detached, so it (and, through the process group and a parent-death signal, vLLM)
  also goes away with the driver.
- Without the ``vllm`` package the constructor raises :class:`ImportError`, without enough GPUs
  :class:`RuntimeError`, each a single sentence saying what is missing.

This path needs a CUDA machine and cannot run on the CPU-only development box; its test carries
the ``gpu`` marker. Weights come from wherever ``vllm serve`` finds the model (a local path, or
the Hugging Face cache).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oni_sys.annotators.openai_backend import OpenAIBackend
from oni_sys.annotators.server_process import die_with_parent, free_port, log_tail, wait_for_models

logger = logging.getLogger(__name__)

VLLM_MISSING = (
    "The vllm annotator backend needs the vllm package, which is not installed: "
    "pip install 'oni-sys[vllm]' on a CUDA machine (or use annotator.backend=llamacpp or openai)."
)


def _vllm_available() -> bool:
    """True when the ``vllm`` package can be imported (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def _local_gpu_count() -> int:
    """GPUs on this node: Ray's view when Ray is running here, else CUDA's (0 without torch)."""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            for node in ray.nodes():
                if node.get("NodeID") == node_id and node.get("Alive", True):
                    return int(node.get("Resources", {}).get("GPU", 0))
            return 0
    except Exception:  # Ray missing or not reachable: fall back to CUDA
        logger.debug("could not ask Ray for this node's GPUs", exc_info=True)
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def check_vllm_requirements(tensor_parallel_size: int = 1) -> None:
    """Raise one clear sentence if vLLM cannot run here (package missing, too few GPUs)."""
    if not _vllm_available():
        raise ImportError(VLLM_MISSING)
    found = _local_gpu_count()
    if found < tensor_parallel_size:
        raise RuntimeError(
            f"The vllm annotator backend needs {tensor_parallel_size} CUDA GPU(s) on this node "
            f"(tensor_parallel_size={tensor_parallel_size}) but found {found}; "
            "on a CPU-only machine use annotator.backend=llamacpp or openai."
        )


class _VLLMProcess:
    """Runs inside the Ray actor: owns the ``vllm serve`` subprocess."""

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int,
        gpu_memory_utilization: float,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        exe = Path(sys.executable).with_name("vllm")
        cmd = [str(exe)] if exe.exists() else [shutil.which("vllm") or "vllm"]
        self.cmd = [
            *cmd,
            "serve",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--tensor-parallel-size",
            str(tensor_parallel_size),
            "--gpu-memory-utilization",
            str(gpu_memory_utilization),
            *extra_args,
        ]
        self.log_path = Path(tempfile.mkdtemp(prefix="oni-vllm-")) / "vllm.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, stopped as a whole
            preexec_fn=die_with_parent(signal.SIGTERM),  # vLLM goes when its actor dies
        )

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of vLLM's output, for error messages."""
        return log_tail(self.log_path, n_bytes)

    def wait_ready(self, timeout_s: float) -> str:
        """Poll ``GET /v1/models`` until vLLM answers; returns the base URL."""
        try:
            wait_for_models(self.proc, self.base_url, timeout_s, "vllm serve", self.log_tail, 1.0)
        except RuntimeError:
            self.stop()
            raise
        return self.base_url

    def pid(self) -> int:
        """The vLLM server's process id."""
        return int(self.proc.pid)

    def alive(self) -> bool:
        """True while the vLLM process runs."""
        return self.proc.poll() is None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM vLLM's process group, SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()


class VLLMServer:
    """``vllm serve`` on a GPU Ray actor on this node; :attr:`base_url` once it answers.

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
        check_vllm_requirements(tensor_parallel_size)
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not ray.is_initialized():
            ray.init()
            check_vllm_requirements(tensor_parallel_size)  # now with Ray's view of the GPUs
        self.model = model
        node_id = ray.get_runtime_context().get_node_id()
        actor_cls = ray.remote(_VLLMProcess)
        self._actor: Any = actor_cls.options(
            num_gpus=tensor_parallel_size,
            num_cpus=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(model, tensor_parallel_size, gpu_memory_utilization, list(extra_args))
        try:
            self.base_url: str = ray.get(
                self._actor.wait_ready.remote(startup_timeout_s), timeout=startup_timeout_s + 60
            )
        except BaseException:
            self.stop()
            raise
        logger.info("vllm serving %r at %s", model, self.base_url)

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


class VLLMBackend(OpenAIBackend):
    """An :class:`OpenAIBackend` over a :class:`VLLMServer` it starts and stops.

    The constructor blocks until vLLM answers (minutes for a large model). vLLM batches requests
    continuously, so a ``concurrency`` of 32-256 keeps a GPU busy, unlike llama.cpp's one-at-a-time
    server. Keyword arguments other than the server's go to :class:`OpenAIBackend`.
    """

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        server_args: Sequence[str] = (),
        startup_timeout_s: float = 1800.0,
        **client_kwargs: Any,
    ) -> None:
        if not model:
            raise ValueError("the vllm backend needs annotator.model (a model id or path)")
        self.server = VLLMServer(
            model,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            extra_args=server_args,
            startup_timeout_s=startup_timeout_s,
        )
        try:
            super().__init__(self.server.base_url, model, **client_kwargs)
        except BaseException:
            self.server.stop()
            raise

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> VLLMBackend:
        """Build from an :class:`oni_sys.config.AnnotatorConfig` (keyword overrides win)."""
        kwargs: dict[str, Any] = {
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "api_key_env": cfg.api_key_env,
            "concurrency": cfg.concurrency,
            "timeout_s": cfg.timeout_s,
            "max_retries": cfg.max_retries,
        }
        kwargs.update(overrides)
        model = kwargs.pop("model", cfg.model)
        return cls(model, **kwargs)

    async def close(self) -> None:
        """Close the HTTP session, then stop vLLM and its actor."""
        import asyncio

        await super().close()
        await asyncio.to_thread(self.server.stop)
