"""The cluster recipe of docs/CLUSTER.md, end to end on one machine.

A Ray head is started with ``ray start`` (loopback only, its own temp dir, free ports, token
authentication with a token of its own), CartPole training is submitted to it with
``ray job submit --working-dir <repo>``, and the run directory the job wrote is checked.

Teardown does not use ``ray stop``, which stops every Ray process of the user on the machine
(another engineer's tests included). Every process the head starts inherits a marker
environment variable; teardown ends the processes that carry it and their descendants, by pid.
So this test can run next to other Ray tests, as long as they do not kill Ray processes by name.

Findings this test relies on (Ray 2.60, Linux):

* ``ray start --node-ip-address=127.0.0.1`` replaces 127.0.0.1 with the machine's routable
  address, so the GCS, raylet and client server listen there and the autoscaler/dashboard
  Prometheus servers listen on 0.0.0.0. With ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray keeps
  127.0.0.1 and every listener of the head is on loopback; this test checks that.
* ``ray start`` turns token authentication on by itself whenever a token file exists, but the
  ``ray job`` client sends the token only when ``RAY_AUTH_MODE=token``: head and client both get
  ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (a token written by the test, so
  ``~/.ray/auth_token`` is neither read nor created).
* ``--working-dir`` honours ``.gitignore`` (and always leaves out ``.git``, ``.venv``, ``venv``,
  ``__pycache__``), so no ``--runtime-env-json`` excludes are needed; checked on the package
  the head unpacked.
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
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from loopback_sockets import listening  # tests/ is on sys.path (its conftest.py)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
ONI_SYS = BIN / "oni-sys"
MARKER = "ONI_SYS_TEST_RAY_HEAD"
NUM_WORKER_PORTS = 32

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.skipif(not RAY.exists() or not ONI_SYS.exists(), reason="needs the venv's CLIs"),
]


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


def _assert_loopback_only(marker: str) -> None:
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


@pytest.fixture
def ray_head():
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


def test_job_submit_trains_cartpole(ray_head):
    _assert_loopback_only(ray_head.marker)

    # Token authentication is on: the job API refuses a request without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=30)
    assert refused.value.code == 401

    runs = ray_head.temp_dir.parent / "runs"
    job_id = f"oni-sys-test-{ray_head.marker[:8]}"
    submitted = ray_head.ray(
        "job",
        "submit",
        "--address",
        ray_head.address,
        "--submission-id",
        job_id,
        "--working-dir",
        str(ROOT),
        "--",
        str(ONI_SYS),
        "train",
        "configs/cartpole.yaml",
        "runtime.kind=ray",
        "runtime.address=auto",
        f"runs_dir={runs}",
        "name=job",
        "train.total_env_steps=6000",
        "train.progress=false",
        timeout=600,
    )
    log = f"{submitted.stdout}\n{submitted.stderr}"
    assert submitted.returncode == 0, f"ray job submit failed:\n{log}"
    # `ray job status` words SUCCEEDED as "Job '<id>' succeeded"; the job API (with the token)
    # gives the status itself.
    status = ray_head.ray("job", "status", "--address", ray_head.address, job_id)
    assert status.returncode == 0, status.stderr
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout
    request = urllib.request.Request(
        f"{ray_head.address}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {ray_head.token}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["status"] == "SUCCEEDED"

    run_dir = runs / "job"
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    rows = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
    assert rows, "metrics.jsonl is empty"
    for key in ("env_steps", "sps", "episode_return_mean", "policy_lag_mean", "wall_time"):
        assert key in rows[-1], f"metrics rows lack {key}: {sorted(rows[-1])}"
    assert rows[-1]["env_steps"] >= 6000

    # What --working-dir uploaded (the head unpacked it under its temp dir): the code, but
    # nothing .gitignore names and no virtualenv.
    packages = list(ray_head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/"))
    assert packages, "found no unpacked working_dir package on the head"
    package = packages[0]
    assert (package / "oni_sys").is_dir() and (package / "configs" / "cartpole.yaml").is_file()
    assert not (package / ".venv").exists()
    for ignored in ("oni_sys.egg-info", "runs", ".pytest_cache", ".ruff_cache"):
        if (ROOT / ignored).exists():
            # Ray 2.60 keeps the (empty) directory itself: its pattern, "runs/", matches only
            # what is under it. Nothing it holds may travel (run data can be gigabytes).
            uploaded = [p for p in (package / ignored).rglob("*") if p.is_file()]
            assert not uploaded, f"{ignored} (in .gitignore) was uploaded: {uploaded[:5]}"

    # The job's workers are gone or idle now; the head still listens on loopback only.
    _assert_loopback_only(ray_head.marker)
