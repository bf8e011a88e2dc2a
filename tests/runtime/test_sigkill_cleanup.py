"""A driver that started its own Ray instance leaves no process behind: not when it is SIGKILLed
in the middle of training, and not when it finishes normally. A driver that joined a cluster
stops none of the cluster's processes when it is SIGKILLed.

Real runs of ``oni-sys train`` as subprocesses; the processes are found through /proc (Linux
only). A process belongs to the run when it descended from the driver (recorded while the
driver lived, by pid and start time) or names the run's Ray session directory on its command
line or as its stdout/stderr. Other Ray instances on this machine are never touched; processes
the test finds left over are killed by pid at the end (and the test fails).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procfs import stat_fields  # tests/procfs.py

pytest.importorskip("ray")
if not sys.platform.startswith("linux"):
    pytest.skip("reads /proc", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
#: seconds the run's processes get to disappear once the driver is gone
GONE_WITHIN_S = 20.0

Proc = tuple[int, int]  # (pid, start time): one process, whatever reuses the pid later


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) or None when gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(proc: Proc) -> bool:
    info = _stat(proc[0])
    return info is not None and info[1] == proc[1] and info[2] != "Z"


def descendants(root: int) -> set[Proc]:
    table = {int(e): s for e in os.listdir("/proc") if e.isdigit() and (s := _stat(int(e)))}
    found, todo = set(), [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, start, state) in table.items():
            if ppid == parent and state != "Z" and (pid, start) not in found:
                found.add((pid, start))
                todo.append(pid)
    return found


def session_dir_of(driver: int, procs: set[Proc]) -> str | None:
    """The Ray session directory the driver started (Ray names it ``session_<time>_<pid>``)."""
    for pid, _ in procs:
        match = re.search(rf"(/\S*?/session_[\d_-]+_{driver})(?=[/\s])", _cmdline(pid) + " ")
        if match:
            return match.group(1)
    return None


def naming_session(session: str) -> set[Proc]:
    """Live processes whose command line names ``session`` or whose output goes into it."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (info := _stat(int(entry))) is None or info[2] == "Z":
            continue
        pid = int(entry)
        targets = [_cmdline(pid)]
        for fd in (1, 2):
            try:
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
        if any(session + "/" in t or t.endswith(session) for t in targets):
            found.add((pid, info[1]))
    return found


def survivors(recorded: set[Proc], session: str) -> set[Proc]:
    """What is left of the run after ``GONE_WITHIN_S`` (earlier when nothing is)."""
    deadline = time.monotonic() + GONE_WITHIN_S
    while True:
        left = {p for p in recorded if _alive(p)} | naming_session(session)
        left.discard((os.getpid(), _stat(os.getpid())[1]))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def describe(procs: set[Proc]) -> str:
    return "; ".join(f"{pid} {_cmdline(pid)[:120]}" for pid, _ in sorted(procs))


def kill_leftovers(procs: set[Proc]) -> None:
    for proc in procs:
        if _alive(proc):
            os.kill(proc[0], signal.SIGKILL)


def start_training(tmp_path: Path, total_steps: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oni_sys.cli",
            "train",
            "configs/cartpole.yaml",
            "runtime.kind=ray",
            f"runs_dir={tmp_path / 'runs'}",
            f"train.total_env_steps={total_steps}",
            "train.log_every_updates=1",
            "train.progress=false",
            "train.tensorboard=false",
        ],
        cwd=REPO,
        stdout=(tmp_path / "driver.log").open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_for_training(driver: subprocess.Popen, tmp_path: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        metrics = list((tmp_path / "runs").glob("*/metrics.jsonl"))
        if metrics and metrics[0].stat().st_size > 0:
            return
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(0.5)
    pytest.fail("the run logged no update in time:\n" + (tmp_path / "driver.log").read_text())


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_process_behind(tmp_path):
    driver = start_training(tmp_path, total_steps=10**9)
    recorded: set[Proc] = set()
    try:
        wait_for_training(driver, tmp_path)
        recorded = descendants(driver.pid)
        session = session_dir_of(driver.pid, recorded)
        names = describe(recorded)
        assert session is not None, f"no Ray session of the driver among: {names}"
        # what the finding was about: Ray's agents, beside its servers and our actors
        for part in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            assert part in names, f"{part} not among the driver's processes: {names}"

        driver.send_signal(signal.SIGKILL)
        driver.wait()
        left = survivors(recorded, session)
        assert not left, f"alive {GONE_WITHIN_S:.0f} s after the driver's SIGKILL: {describe(left)}"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        kill_leftovers(recorded)


@pytest.mark.slow
def test_a_finished_run_leaves_no_process_behind_and_says_nothing_about_it(tmp_path):
    driver = start_training(tmp_path, total_steps=3000)
    recorded: set[Proc] = set()
    session = None
    try:
        while driver.poll() is None:  # every process the run had at some point
            recorded |= descendants(driver.pid)
            session = session or session_dir_of(driver.pid, recorded)
            time.sleep(0.2)
        log = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 0, log[-3000:]
        assert session is not None, f"no Ray session of the driver among: {len(recorded)} pids"
        left = survivors(recorded, session)
        assert not left, f"alive {GONE_WITHIN_S:.0f} s after a normal exit: {describe(left)}"
        assert "oni-sys ray reaper" not in log, log[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        kill_leftovers(recorded)


@pytest.mark.slow
def test_a_driver_that_joined_a_cluster_stops_none_of_it_when_killed(tmp_path):
    from ray_head import ray_head_running  # tests/ is on sys.path (tests/conftest.py)

    with ray_head_running() as head:
        # the head's own processes (gcs_server, raylet, agents...), which write under its temp
        # dir; not its workers, which Ray itself starts and ends as jobs come and go
        head_procs = {
            p
            for p in naming_session(str(head.temp_dir))
            if not re.search(r"ray::IDLE|default_worker\.py", _cmdline(p[0]))
        }
        gcs = re.search(r"--gcs_server_port=(\d+)", " ".join(_cmdline(p) for p, _ in head_procs))
        assert gcs, f"no gcs_server among the head's processes: {describe(head_procs)}"
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "oni_sys.cli",
                "train",
                "configs/cartpole.yaml",
                "runtime.kind=ray",
                f"runtime.address=127.0.0.1:{gcs.group(1)}",
                f"runs_dir={tmp_path / 'runs'}",
                "train.total_env_steps=1000000000",
                "train.log_every_updates=1",
                "train.progress=false",
                "train.tensorboard=false",
            ],
            cwd=REPO,
            env=head.env,
            stdout=(tmp_path / "driver.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_training(driver, tmp_path)
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            time.sleep(GONE_WITHIN_S / 2)  # what a reaper would have stopped by now
            gone = {p for p in head_procs if not _alive(p)}
            assert not gone, f"the head lost processes with the driver: {describe(gone)}"
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
