"""The ``vllm`` backend: an OpenAI-compatible client
(:class:`~oni_sys.annotators.openai_backend.OpenAIBackend`) of a ``vllm serve`` server it owns.

How it runs:

- :class:`VLLMProcess` runs ``vllm serve <model> --host 127.0.0.1 --port <free port>
  --tensor-parallel-size N --gpu-memory-utilization F`` as a subprocess of this process (its own
  process group, and a parent-death signal, so vLLM goes when its owner dies), waits for
  ``GET /v1/models`` to answer and stops it. :meth:`VLLMProcess.start` first checks that the
  ``vllm`` package is importable and that CUDA shows ``tensor_parallel_size`` GPUs here: without
  the package it raises :class:`ImportError`, without enough GPUs :class:`RuntimeError`, each a
  single sentence saying what is missing.
- :class:`VLLMBackend` talks to a *server*: anything with ``base_url``, ``alive()`` and ``stop()``
  (:class:`VLLMServer`). Given none, it starts a :class:`VLLMProcess` here; this is what the serial
  runtime, ``oni-sys annotate`` and ``oni-sys doctor`` do, and no Ray is involved. The Ray runtime
  hands it a server that Ray placed on a GPU (:mod:`oni_sys.runtime.vllm_server`). Either way the
  backend owns the server: ``await backend.close()`` stops it.
- The server listens on 127.0.0.1 by default, so the process that scores questions runs on the
  machine that serves them. The Ray runtime gives ``host`` = the IP of the node Ray placed vLLM
  on, since its annotator may run on another node (a loopback-only Ray instance: 127.0.0.1).

This path needs a CUDA machine and cannot run on the CPU-only development box; its tests that
serve a model carry the ``gpu`` marker. Weights come from wherever ``vllm serve`` finds the model
(a local path, or the Hugging Face cache).
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
from typing import Any, Protocol

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


def cuda_gpu_count() -> int:
    """GPUs CUDA shows this process (0 without torch or CUDA)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def require_vllm_package() -> None:
    """Raise :class:`ImportError` (one sentence) unless the ``vllm`` package is importable."""
    if not _vllm_available():
        raise ImportError(VLLM_MISSING)


def require_gpus(tensor_parallel_size: int, found: int) -> None:
    """Raise :class:`RuntimeError` (one sentence) if ``found`` GPUs are too few for vLLM."""
    if found < tensor_parallel_size:
        raise RuntimeError(
            f"The vllm annotator backend needs {tensor_parallel_size} CUDA GPU(s) on this node "
            f"(tensor_parallel_size={tensor_parallel_size}) but found {found}; "
            "on a CPU-only machine use annotator.backend=llamacpp or openai."
        )


def check_vllm_requirements(tensor_parallel_size: int = 1, gpus: int | None = None) -> None:
    """Raise one clear sentence if vLLM cannot run here: the package is missing, or fewer than
    ``tensor_parallel_size`` GPUs (``gpus``, default: :func:`cuda_gpu_count`)."""
    require_vllm_package()
    require_gpus(tensor_parallel_size, cuda_gpu_count() if gpus is None else gpus)


class VLLMServer(Protocol):
    """A running vLLM server as :class:`VLLMBackend` uses it."""

    #: the OpenAI-compatible base URL, up to ``/v1``
    base_url: str

    def alive(self) -> bool:
        """True while the server runs."""
        ...

    def stop(self) -> None:
        """Stop the server; idempotent."""
        ...


class VLLMProcess:
    """Owns a ``vllm serve`` subprocess on this machine (started by the constructor).

    The constructor only launches vLLM, listening on ``host`` (default 127.0.0.1);
    :meth:`wait_ready` waits for it to answer. Use :meth:`start` for both, after checking that
    vLLM can run here.
    """

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        extra_args: Sequence[str] = (),
        host: str = "127.0.0.1",
    ) -> None:
        self.model = model
        self.host = host
        self.port = free_port()
        self.base_url = f"http://{host}:{self.port}/v1"
        exe = Path(sys.executable).with_name("vllm")
        cmd = [str(exe)] if exe.exists() else [shutil.which("vllm") or "vllm"]
        self.cmd = [
            *cmd,
            "serve",
            model,
            "--host",
            host,
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
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, stopped as a whole
                preexec_fn=die_with_parent(signal.SIGTERM),  # vLLM goes when its owner dies
            )
        except BaseException:
            self._log.close()
            raise

    @classmethod
    def start(
        cls,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 1800.0,
    ) -> VLLMProcess:
        """Check that vLLM can run here (package, CUDA GPUs), start it and wait until it answers.

        Args:
            model: a Hugging Face model id or a local path, as ``vllm serve`` takes it.
            tensor_parallel_size: GPUs per model; CUDA must show at least this many.
            gpu_memory_utilization: fraction of each GPU's memory vLLM may take.
            extra_args: more ``vllm serve`` arguments (e.g. ``["--max-model-len", "2048"]``).
            startup_timeout_s: how long to wait for ``/v1/models`` (download and load included).
        """
        check_vllm_requirements(tensor_parallel_size)
        process = cls(model, tensor_parallel_size, gpu_memory_utilization, extra_args)
        try:
            process.wait_ready(startup_timeout_s)
        except BaseException:
            process.stop()
            raise
        logger.info("vllm serving %r at %s (pid %d)", model, process.base_url, process.pid())
        return process

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of vLLM's output, for error messages."""
        return log_tail(self.log_path, n_bytes)

    def wait_ready(self, timeout_s: float) -> str:
        """Poll ``GET /v1/models`` until vLLM answers; returns the base URL (stops vLLM if it
        exits or does not answer in time, and raises RuntimeError with its log's tail)."""
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
        """SIGTERM vLLM's process group, SIGKILL after ``grace_s``; idempotent."""
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


class VLLMBackend(OpenAIBackend):
    """An :class:`OpenAIBackend` over a vLLM server that it owns (and stops in :meth:`close`).

    Args:
        model: a Hugging Face model id or a local path, as ``vllm serve`` takes it.
        server: a running server (:class:`VLLMServer`, e.g. one Ray placed on a GPU); default:
            start ``vllm serve`` here with :meth:`VLLMProcess.start`, which blocks until vLLM
            answers (minutes for a large model). The remaining server arguments apply only then.
        tensor_parallel_size: GPUs per model.
        gpu_memory_utilization: fraction of each GPU's memory vLLM may take.
        server_args: more ``vllm serve`` arguments.
        startup_timeout_s: how long to wait for vLLM to answer.
        client_kwargs: the rest go to :class:`OpenAIBackend`.

    vLLM batches requests continuously, so a ``concurrency`` of 32-256 keeps a GPU busy, unlike
    llama.cpp's one-at-a-time server.
    """

    def __init__(
        self,
        model: str,
        *,
        server: VLLMServer | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        server_args: Sequence[str] = (),
        startup_timeout_s: float = 1800.0,
        **client_kwargs: Any,
    ) -> None:
        if not model:
            if server is not None:
                server.stop()
            raise ValueError("the vllm backend needs annotator.model (a model id or path)")
        if server is None:
            server = VLLMProcess.start(
                model,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                extra_args=server_args,
                startup_timeout_s=startup_timeout_s,
            )
        self.server: VLLMServer = server
        try:
            super().__init__(server.base_url, model, **client_kwargs)
        except BaseException:
            server.stop()
            raise

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> VLLMBackend:
        """Build from an :class:`oni_sys.config.AnnotatorConfig` (keyword overrides win, e.g.
        ``server=``)."""
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
        """Close the HTTP session, then stop the vLLM server."""
        import asyncio

        await super().close()
        await asyncio.to_thread(self.server.stop)
