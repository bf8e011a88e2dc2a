"""What the annotator's local server processes share (``llama_cpp.server``, ``vllm serve``): a
free loopback port, a child that dies with its parent, the tail of its log, and waiting for its
OpenAI-compatible ``GET /v1/models`` to answer."""

from __future__ import annotations

import ctypes
import functools
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:  # loaded before any fork: the child only makes one system call through it
    _LIBC: Any = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform == "linux" else None
except OSError:
    _LIBC = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_parent_death_signal(sig: int) -> None:
    if _LIBC is not None:
        _LIBC.prctl(1, sig)  # PR_SET_PDEATHSIG


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets ``sig`` when its parent dies (Linux; a no-op elsewhere)."""
    return functools.partial(_set_parent_death_signal, sig)


def log_tail(path: Path, n_bytes: int) -> str:
    """The last ``n_bytes`` of a log file ("" if it cannot be read)."""
    try:
        return path.read_bytes()[-n_bytes:].decode("utf-8", errors="replace")
    except OSError:
        return ""


def wait_for_models(
    proc: subprocess.Popen,
    base_url: str,
    timeout_s: float,
    what: str,
    tail: Callable[[], str],
    poll_s: float,
) -> None:
    """Poll ``GET <base_url>/models`` until it answers 200.

    Raises RuntimeError (with the log tail) if ``proc`` exits first or ``timeout_s`` passes; the
    caller stops the process.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"{what} exited with code {code} before it was ready:\n{tail()}")
        try:
            with urllib.request.urlopen(base_url + "/models", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"{what} did not answer on {base_url} within {timeout_s:.0f} s:\n{tail()}")
