"""Probes of Ray: for ``oni-sys doctor``, start a local instance on 127.0.0.1, run one task on
it, shut it down, and say what was found (the doctor turns that into its report line); before a
run joins a cluster (``runtime.address``), whether a Ray head answers there at all."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from oni_sys.config import RAY_ADDRESS_ALLOWED, split_host_port

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


#: how long the TCP connection to a cluster's head may take before the run is refused
RAY_CONNECT_TIMEOUT_S = 5.0


def ray_address_problem(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> str | None:
    """Why no Ray cluster can be joined at ``address`` (``runtime.address``), or None.

    ``ray.init`` retries a head that does not answer for many minutes, deaf to Ctrl-C; this
    opens one TCP connection to the head first, within ``timeout_s``. ``auto`` is resolved as
    ``ray.init`` does: ``RAY_ADDRESS``, else the address ``ray start`` recorded on this machine
    (a cluster found only by scanning the processes of the machine, which ``ray.init`` falls
    back to, is not joined: on a shared machine it may be anyone's). A localhost head is dialled
    where ``ray.init`` dials it: at this machine's routable address, unless Ray is kept on
    loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``).
    """
    target, source = address, ""
    if address == "auto":
        target, source = _resolve_auto()
        if not target:
            return (
                "auto found no Ray cluster to join: RAY_ADDRESS is not set and `ray start` "
                f"recorded none on this machine (nothing in {source}); start one with "
                "`ray start --head`, give host:port of a running Ray head or ray://host:port, "
                "or leave runtime.address unset to start a local instance"
            )
    client = target.startswith("ray://")
    parts = split_host_port(target[len("ray://") :] if client else target)
    if parts is None:
        return f"{address!r}{source} is not a Ray address; {RAY_ADDRESS_ALLOWED}"
    host, port = parts
    dial = host if client else _dialled_host(host)
    via = f", which Ray dials as {dial}:{port}" if dial != host else ""
    try:
        with socket.create_connection((dial, port), timeout=timeout_s) as conn:
            speaks_grpc = _speaks_http2(conn)
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout_s:g} s"
        else:
            reason = exc.strerror or type(exc).__name__
        return (
            f"no Ray head answers at {host}:{port}{source}{via} ({reason}); {RAY_ADDRESS_ALLOWED}"
        )
    if not speaks_grpc:
        return (
            f"what listens at {host}:{port}{source}{via} is not a Ray head (it does not answer "
            f"as a gRPC server within {timeout_s:g} s); {RAY_ADDRESS_ALLOWED}"
        )
    return None


#: an HTTP/2 client's first bytes: the connection preface and an empty SETTINGS frame
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_http2(conn: socket.socket) -> bool:
    """Whether the server on ``conn`` answers an HTTP/2 preface with a SETTINGS frame, as
    every gRPC server (a Ray head's GCS, a Ray Client server) does at once. Anything else
    listening there (a web server, a database, a silent port) would leave ``ray.init``
    retrying for many minutes. With ``RAY_USE_TLS`` set the head speaks TLS first: not
    checked then."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    try:
        conn.sendall(_HTTP2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = conn.recv(9 - len(head))
            if not chunk:
                return False
            head += chunk
    except OSError:  # a timeout, or a reset: not a gRPC server
        return False
    return head[3] == 4  # the frame type of the server's first frame: SETTINGS


def _resolve_auto() -> tuple[str, str]:
    """``(address, where it was found)`` for ``auto``; the address is empty when none is
    found, and where it was looked for is then the address file of ``ray start``."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env, f" (RAY_ADDRESS={env})"
    try:
        from ray._common.utils import get_ray_address_file

        path = Path(get_ray_address_file(None))
    except (ImportError, AttributeError):  # Ray moved it: its default place in Ray 2.60
        path = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        recorded = path.read_text().strip()
    except OSError:
        recorded = ""
    return (recorded, f" (recorded by `ray start` in {path})") if recorded else ("", str(path))


def _dialled_host(host: str) -> str:
    """The host ``ray.init`` connects to for ``host`` (it replaces localhost, see above)."""
    try:
        from ray._private.services import resolve_ip_for_localhost

        return resolve_ip_for_localhost(host)
    except Exception:  # noqa: BLE001 (Ray moved it, or found no routable address: dial as given)
        return host
