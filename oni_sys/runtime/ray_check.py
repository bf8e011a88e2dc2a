"""A probe of Ray for ``oni-sys doctor``: start a local instance on 127.0.0.1, run one task on
it, shut it down, and say what was found (the doctor turns that into its report line)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class RayProbe:
    """What :func:`probe_local_ray` found."""

    #: Ray's version; None when Ray is not installed
    version: str | None = None
    #: Ray was already initialised in this process, so nothing was checked
    already_initialised: bool = False
    #: why the instance did not start or run the task (None when it did)
    error: Exception | None = None
    #: seconds ``ray.init`` took
    started_s: float = 0.0
    #: the instance's GCS address, ``host:port``
    gcs_address: str = ""
    #: the instance's resources (``CPU``, ``GPU``, ...)
    resources: dict[str, float] = field(default_factory=dict)


def _ray_task() -> int:
    return os.getpid()


def probe_local_ray(timeout_s: float) -> RayProbe:
    """Start a local Ray instance on 127.0.0.1 (even when ``RAY_ADDRESS`` names a cluster), run
    one task on it within ``timeout_s`` and shut it down; never raises for a Ray failure."""
    try:
        import ray
    except ImportError:
        return RayProbe()
    from oni_sys.runtime.ray_local import keep_ray_on_loopback

    probe = RayProbe(version=ray.__version__)
    if ray.is_initialized():
        probe.already_initialised = True
        return probe
    t0 = time.perf_counter()
    try:
        keep_ray_on_loopback()
        # address="local": always a new instance, even when RAY_ADDRESS names a cluster.
        ray.init(
            address="local",
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        probe.started_s = time.perf_counter() - t0
        ray.get(ray.remote(num_cpus=0)(_ray_task).remote(), timeout=timeout_s)
        probe.resources = dict(ray.cluster_resources())
        probe.gcs_address = ray.get_runtime_context().gcs_address
    except Exception as exc:  # noqa: BLE001 (Ray raises many kinds; the caller reports it)
        probe.error = exc
    finally:
        try:
            ray.shutdown()
        except Exception as exc:  # noqa: BLE001
            logger.warning("ray.shutdown failed: %s: %s", type(exc).__name__, exc)
    return probe
