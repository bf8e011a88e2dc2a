"""A real ``python -m llama_cpp.server`` (OpenAI-compatible) on 127.0.0.1, started and stopped
by the caller: for tests, benchmarks, and users who want the embedded model behind HTTP.

    with LlamaCppServer(embedded_gguf_path(), Path("server.log"), "gemma-3-270m-q4_k_m") as srv:
        backend = OpenAIBackend(srv.base_url, "gemma-3-270m-q4_k_m")
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)


try:  # loaded before any fork: the child only makes one system call through it
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else None
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """In the server child before exec: SIGKILL it if pytest dies (Linux), so none is left over."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
                preexec_fn=_die_with_parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll ``GET /v1/models`` until the server answers; stop it and raise on failure."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama_cpp.server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=5) as resp:
                    if resp.status == 200:
                        logger.info(
                            "llama_cpp.server ready at %s (pid %d)", self.base_url, self.proc.pid
                        )
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"llama_cpp.server did not answer within {timeout_s} s:\n{self.log_tail()}"
        )

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
        try:
            return self.log_path.read_bytes()[-n_bytes:].decode("utf-8", errors="replace")
        except OSError:
            return ""
