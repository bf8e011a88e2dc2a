"""A real ``python -m llama_cpp.server`` (OpenAI-compatible) on 127.0.0.1, started and stopped
by the caller: for tests, benchmarks, and users who want the embedded model behind HTTP.

    with LlamaCppServer(embedded_gguf_path(), Path("server.log"), "gemma-3-270m-q4_k_m") as srv:
        backend = OpenAIBackend(srv.base_url, "gemma-3-270m-q4_k_m")
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from oni_sys.annotators.server_process import die_with_parent, free_port, log_tail, wait_for_models

logger = logging.getLogger(__name__)


class LlamaCppServer:
    """A real ``python -m llama_cpp.server`` subprocess serving a GGUF on 127.0.0.1.

    ``--logits_all true`` is required: llama-cpp-python refuses completion ``logprobs`` for a
    model loaded without it (``logprobs is not supported for models created with
    logits_all=False``, an HTTP 500); the server's default happens to be true, we pass it anyway.
    It makes each request cost about 0.5 s here (logits for every prompt token).
    """

    def __init__(
        self, model_path: Path, log_path: Path, model_alias: str, n_threads: int = 1
    ) -> None:
        self.model_path = Path(model_path)
        self.log_path = Path(log_path)
        self.model_alias = model_alias
        self.n_threads = n_threads
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """Server URL up to ``/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the server (on the same port as before, after a kill) and wait for /v1/models."""
        self.spawn()
        self.wait_ready(timeout_s)

    def spawn(self) -> None:
        """Start the server process without waiting for it.

        Call from the main thread: the child is SIGKILLed when the thread that started it ends.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("server already running")
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--model_alias",
            self.model_alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            "2048",
            "--logits_all",
            "true",
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(signal.SIGKILL),  # none left over if pytest dies
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll ``GET /v1/models`` until the server answers; stop it and raise on failure."""
        assert self.proc is not None
        try:
            wait_for_models(
                self.proc, self.base_url, timeout_s, "llama_cpp.server", self.log_tail, 0.2
            )
        except RuntimeError:
            self.stop()
            raise
        logger.info("llama_cpp.server ready at %s (pid %d)", self.base_url, self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the server (as a crash would) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> LlamaCppServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n_bytes: int = 3000) -> str:
        """The end of the server's output."""
        return log_tail(self.log_path, n_bytes)
