"""A Ray instance started on this machine, on loopback only (the Ray runtime's, ``oni-sys doctor``'s
and :class:`~oni_sys.runtime.vllm_server.RayVLLMServer`'s when nothing is running yet), and the
reaper that stops what is left of the Ray runtime's instance when its driver is killed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import oni_sys.runtime.ray_reaper as ray_reaper

logger = logging.getLogger(__name__)


def keep_ray_on_loopback() -> None:
    """Make a locally started Ray instance listen on 127.0.0.1 only.

    Ray 2.60 on Linux replaces a 127.0.0.1 node address with the machine's routable one (and
    its servers then listen on every interface) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0.
    Ray reads that variable once, at import, so the already imported constant is set too; the
    processes Ray starts inherit the variable.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


class Reaper:
    """The driver's end of :mod:`oni_sys.runtime.ray_reaper`: a process that stops what is left
    of this driver's local Ray instance once the driver dies; :meth:`close` after
    ``ray.shutdown()`` lets it exit quietly."""

    def __init__(self, process: subprocess.Popen, pipe_fd: int):
        self.process = process
        self._fd: int | None = pipe_fd

    def close(self, timeout_s: float = 30.0) -> None:
        """Say goodbye (Ray has shut down) and wait for the reaper to exit."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, ray_reaper.GOODBYE)
        except OSError:  # the reaper is gone already
            pass
        os.close(self._fd)
        self._fd = None
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("the Ray reaper (pid %d) did not exit; leaving it", self.process.pid)


def start_reaper() -> Reaper | None:
    """Start the reaper of the Ray instance this process has just started (``ray.init`` with
    ``address="local"``); None where there is no /proc to watch (not Linux). See
    :mod:`oni_sys.runtime.ray_reaper`."""
    import ray

    if not os.path.isdir("/proc/self/fd"):
        return None
    try:  # the session directory has no public getter in Ray 2.60 but ray.init's return value
        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception as exc:  # noqa: BLE001 (a missing reaper must never cost the run)
        logger.warning("no reaper for the local Ray instance: %s", exc)
        return None
    read_fd, write_fd = os.pipe()  # both close on exec: only the driver keeps the write end
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-I",  # the standard library only; nothing of the driver's environment
                ray_reaper.__file__,
                f"--driver={os.getpid()}",
                f"--session={session}",
            ],
            stdin=read_fd,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # outlives the driver and its process group
        )
    finally:
        os.close(read_fd)
    return Reaper(process, write_fd)
