"""A Ray head started with ``ray start`` for the cluster tests (shared by tests/cluster/).

The head is started with ``ray start``: loopback only, its own temp dir, free ports, token
authentication with a token of its own; worker nodes can join it (``RayHead.add_worker``).
``tests/cluster/conftest.py`` makes it the ``ray_head`` and ``ray_head_and_worker`` fixtures.

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
* A worker node on this machine (``RayHead.add_worker``) cannot be started with ``ray start
  --address``: under ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` it refuses, and without it it
  replaces 127.0.0.1 by the routable address, where the GCS does not listen. A head on
  127.0.0.2 does not help: for a node address other than 127.0.0.1, GCS and raylet listen on
  all interfaces. So the worker node is started with Ray's ``Node`` class on 127.0.0.1.
* ``--working-dir`` honours ``.gitignore`` (and always leaves out ``.git``, ``.venv``, ``venv``,
  ``__pycache__``), so no ``--runtime-env-json`` excludes are needed; checked on the package
  the head unpacked (tests/cluster/test_job_submit.py).
"""

from __future__ import annotations

import json
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
from procfs import alive, parent_pid

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
ONI_SYS = BIN / "oni-sys"
MARKER = "ONI_SYS_TEST_RAY_HEAD"
NUM_WORKER_PORTS = 32
OBJECT_STORE_BYTES = 200 << 20  # a worker node's object store (Ray's default: 30% of RAM)


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
        ppid = parent_pid(int(entry))
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if ppid is not None:
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
            pids = {p for p in pids | _head_pids(marker) if alive(p)}
            if not pids:
                return
            time.sleep(0.2)


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
    gcs_address: str  # host:port of the GCS, which a worker node joins
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

    def submit_oni_sys(self, job_id: str, *args: str, timeout: float) -> None:
        """``ray job submit --working-dir <repo> -- oni-sys ARGS`` as ``job_id``; asserts that
        the job succeeded (``ray job status`` words SUCCEEDED as "Job '<id>' succeeded")."""
        submitted = self.ray(
            "job",
            "submit",
            "--address",
            self.address,
            "--submission-id",
            job_id,
            "--working-dir",
            str(ROOT),
            "--",
            str(ONI_SYS),
            *args,
            timeout=timeout,
        )
        log = f"{submitted.stdout}\n{submitted.stderr}"
        assert submitted.returncode == 0, f"ray job submit failed:\n{log[-6000:]}"
        status = self.ray("job", "status", "--address", self.address, job_id)
        assert status.returncode == 0, status.stderr
        assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout

    def add_worker(self, num_cpus: int, resources: dict[str, float]) -> None:
        """Start a worker node on this machine that joins the head, with ``num_cpus`` CPUs, the
        custom ``resources``, ports of its own, and the head's temp dir, token and marker (so
        teardown stops it with the head). Returns once the node has registered with the head.

        What ``ray start --address=<gcs> --resources=...`` does, without its command line:
        ``ray start`` refuses a worker node under ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (what
        keeps the head on loopback), and without that setting it replaces the address 127.0.0.1
        by the machine's routable one, where this head's GCS does not listen. So the node is
        started by :func:`_start_worker_node` in a process of its own, with Ray's ``Node`` class,
        as ``ray start`` does after its checks (and as ``ray.cluster_utils.Cluster`` does),
        on 127.0.0.1: every socket it listens on is on loopback (``assert_loopback_only``).
        """
        (
            agent_http,
            agent_grpc,
            runtime_env_agent,
            metrics_export,
            node_manager,
            object_manager,
            *worker_ports,
        ) = _free_ports(6 + NUM_WORKER_PORTS)
        params = {
            "gcs_address": self.gcs_address,
            "node_ip_address": "127.0.0.1",
            "num_cpus": num_cpus,
            "num_gpus": 0,
            "resources": resources,
            "object_store_memory": OBJECT_STORE_BYTES,
            "dashboard_agent_listen_port": agent_http,
            "metrics_agent_port": agent_grpc,
            "runtime_env_agent_port": runtime_env_agent,
            "metrics_export_port": metrics_export,
            "node_manager_port": node_manager,
            "object_manager_port": object_manager,
            "worker_port_list": ",".join(map(str, worker_ports)),
            "temp_dir": str(self.temp_dir),
            "include_log_monitor": False,  # the head's log monitor reads the shared session dir
        }
        started = subprocess.run(
            [sys.executable, str(Path(__file__)), "worker-node", json.dumps(params)],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert started.returncode == 0, (
            f"starting a worker node failed:\n{started.stdout}\n{started.stderr}"
        )


def _start_worker_node(params: dict) -> None:
    """Start the processes of a worker node (raylet, dashboard agent, runtime env agent) and
    return once the head knows the node; they outlive this process, as after ``ray start``."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    node = Node(RayParams(**params), head=False, shutdown_at_exit=False, spawn_reaper=False)
    print(f"worker node {node.node_id} on {node.node_ip_address}")


@contextmanager
def ray_head_running(
    num_cpus: int = 3, resources: dict[str, float] | None = None
) -> Iterator[RayHead]:
    """Start a head (``num_cpus`` CPUs, custom ``resources`` such as ``{"learner_node": 1}``),
    yield it, and stop every process it started, and those of the worker nodes added to it
    (:meth:`RayHead.add_worker`)."""
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
        gcs_address=f"127.0.0.1:{gcs}",
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
            f"--num-cpus={num_cpus}",
            *([f"--resources={json.dumps(resources)}"] if resources else []),
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
        )
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield head
    finally:
        _stop_head(marker)
        leftover = {p for p in _head_pids(marker) if alive(p)}
        shutil.rmtree(base, ignore_errors=True)
        assert not leftover, f"Ray head processes survived teardown: {sorted(leftover)}"


if __name__ == "__main__":  # python tests/ray_head.py worker-node '<RayParams as JSON>'
    assert sys.argv[1] == "worker-node", sys.argv
    _start_worker_node(json.loads(sys.argv[2]))
