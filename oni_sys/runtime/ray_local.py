"""A Ray instance started on this machine, on loopback only (the Ray runtime's, ``oni-sys doctor``'s
and :class:`~oni_sys.runtime.vllm_server.RayVLLMServer`'s when nothing is running yet)."""

from __future__ import annotations

import os


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
