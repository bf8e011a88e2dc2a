"""A Ray head started with ``ray start`` for the cluster tests (shared by tests/cluster/).

The head is started with ``ray start``: loopback only, its own temp dir, free ports, token
authentication with a token of its own. ``tests/cluster/conftest.py`` makes it the ``ray_head``
fixture.

Teardown does not use ``ray stop``, which stops every Ray process of the user on the machine
(another engineer's tests included). Every process the head starts inherits a marker
environment variable; teardown ends the processes that carry it and their descendants, by pid.
So these tests can run next to other Ray tests, as long as they do not kill Ray processes by name.

Findings these tests rely on (Ray 2.60, Linux):

* ``ray start --node-ip-address=127.0.0.1`` replaces 127.0.0.1 with the machine's routable
  address, so the GCS, raylet and client server listen there and the autoscaler/dashboard
  Prometheus servers listen on 0.0.0.0. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray keeps
  127.0.0.1 and every listener of the head is on loopback; ``assert_loopback_only`` checks that.
* ``ray start`` turns token authentication on by itself whenever a token file exists, but the
  ``ray job`` client sends the token only when ``RAY_AUTH_MODE=token``: head and client both get
  ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (a token written by the test, so
  ``~/.ray/auth_token`` is neither read nor created).
* ``--working-dir`` honours ``.gitignore`` (and always leaves out ``.git``, ``.venv``, ``venv``,
  ``__pycache__``), so no ``--runtime-env-json`` excludes are needed; checked on the package
  the head unpacked (tests/cluster/test_job_submit.py).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loopback_sockets import listening

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
ONI_SYS = BIN / "oni-sys"
MARKER = "ONI_SYS_TEST_RAY_HEAD"
NUM_WORKER_PORTS = 32


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago (all held open while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, raw environment) for every process we may read."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out[int(entry)] = (ppid, env)
    return out


def _head_pids(marker: str) -> set[int]:
    """Processes carrying ``MARKER=marker`` and all their descendants.

    Descendants are needed because Ray renames its workers (setproctitle), which can overwrite
    the environment block that /proc shows.
    """
    procs = _processes()
    tag = f"{MARKER}={marker}".encode()
    pids = {pid for pid, (_, env) in procs.items() if tag in env.split(b"\0")}
    pids.discard(os.getpid())
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in pids and pid not in pids:
                pids.add(pid)
                grew = True
    return pids


def _stop_head(marker: str, grace: float = 1.0) -> None:
    """SIGTERM the head's processes, then SIGKILL whatever is left after ``grace`` seconds.

    Like ``ray stop --force`` in effect (gcs_server and raylet do not exit on SIGTERM within
    seconds), but only for this head's processes.
    """
    pids = _head_pids(marker)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            pids = {p for p in pids | _head_pids(marker) if _alive(p)}
            if not pids:
                return
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_loopback_only(marker: str) -> None:
    listeners = listening(_head_pids(marker))
    assert listeners, "found no listening sockets of the Ray head (is /proc readable?)"
    exposed = [
        (pid, addr, port)
        for pid, addr, port in listeners
        if addr not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    ]
    assert not exposed, f"Ray head processes listen beyond loopback: {exposed}"


@dataclass
class RayHead:
    env: dict[str, str]
    address: str  # the job API (dashboard) URL
    temp_dir: Path
    token: str
    marker: str

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(RAY), *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@contextmanager
def ray_head_running() -> Iterator[RayHead]:
    """Start a head (3 CPUs), yield it, and stop every process it started."""
    # A short path: Ray's unix sockets live under it and must fit in 107 characters.
    base = Path(tempfile.mkdtemp(prefix="oni-ray-", dir="/tmp"))
    marker = uuid.uuid4().hex
    token = secrets.token_hex(32)
    token_file = base / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    temp_dir = base / "ray"
    temp_dir.mkdir()
    (
        gcs,
        dashboard,
        client_server,
        agent_http,
        agent_grpc,
        runtime_env_agent,
        metrics_export,
        node_manager,
        object_manager,
        autoscaler_metrics,
        dashboard_metrics,
        *worker_ports,
    ) = _free_ports(11 + NUM_WORKER_PORTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        {
            MARKER: marker,
            "RAY_TMPDIR": str(temp_dir),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            # Keep 127.0.0.1 as the node address instead of the routable one (see module doc).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Prometheus servers with fixed default ports (44217, 44227) and no CLI flag.
            "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),
            "DASHBOARD_METRIC_PORT": str(dashboard_metrics),
        }
    )
    head = RayHead(
        env=env,
        address=f"http://127.0.0.1:{dashboard}",
        temp_dir=temp_dir,
        token=token,
        marker=marker,
    )
    try:
        started = head.ray(
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client_server}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            f"--metrics-export-port={metrics_export}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--worker-port-list={','.join(map(str, worker_ports))}",
            "--num-cpus=3",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        )
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield head
    finally:
        _stop_head(marker)
        leftover = {p for p in _head_pids(marker) if _alive(p)}
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"Ray head processes survived teardown: {sorted(leftover)}"
