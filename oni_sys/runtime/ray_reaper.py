"""Stops the processes of a Ray instance whose driver died (Linux; standard library only).

A driver that starts a local Ray instance (``runtime.kind=ray`` without ``runtime.address``)
owns it. When the driver ends normally, ``ray.shutdown()`` stops the instance; when it is
SIGKILLed, the kernel ends the processes Ray started from the driver (gcs_server, raylet...),
but Ray 2.60's dashboard agent and runtime-env agent notice their raylet's death and then hang
for a minute or more trying to report it to the dead GCS. This reaper ends them, and anything
else of that session, at once.

:func:`oni_sys.runtime.ray_local.start_reaper` starts it right after ``ray.init`` as its own
session (so a Ctrl-C or a SIGKILL of the driver's process group does not reach it), with
standard input a pipe whose write end only the driver holds. It runs as a script
(``python -I .../ray_reaper.py --driver PID --session DIR``), not with ``-m``, because
importing the ``oni_sys.runtime`` package imports torch (seconds and hundreds of MB for a
watcher).

While the driver lives, the reaper records, every 2 s, the processes of the session: the
ones whose command line names the session directory (gcs_server, raylet, the monitors) and
all their descendants (agents, workers and what they started), each by pid and start time, so
a reused pid is never taken for one of them. When the driver dies (end of file on the pipe
without a goodbye, or the reaper's parent changed), it terminates, then kills, the recorded
processes still alive plus any process whose command line names the session directory or
whose stdout or stderr is a file in it (Ray sends every one of its processes' output there).
Processes of other Ray instances match none of this and are never touched. After a goodbye
(``done`` on the pipe, written by the driver after ``ray.shutdown()``) it waits up to
:data:`SHUTDOWN_GRACE_S` for the session's processes to exit on their own, stops what is left
and exits; normally nothing is left and it exits without a word.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import time

#: seconds between two records of the session's processes while the driver lives (a quick
#: scan costs ~10 ms of CPU with 200 processes on the machine)
POLL_S = 2.0
#: seconds a terminated process gets before it is killed
TERM_GRACE_S = 3.0
#: seconds the session's processes get to exit by themselves after a normal ray.shutdown()
SHUTDOWN_GRACE_S = 10.0
#: what the driver writes before closing the pipe on a normal exit
GOODBYE = b"done\n"

Key = tuple[int, int]  # (pid, start time in clock ticks since boot): one process, never reused


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # after the command name: state, ppid, ... starttime is field 22 of the whole line
    return int(fields[1]), int(fields[19]), fields[0].decode()


def _names_session(pid: int, session: str) -> bool:
    """Whether ``pid``'s command line names ``session`` or its stdout/stderr is a file in it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
    except OSError:
        return False
    for arg in cmdline.split("\0"):
        if session in arg and _in_session(arg[arg.index(session) :], session):
            return True
    for fd in (1, 2):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if _in_session(target, session):
            return True
    return False


def _in_session(path: str, session: str) -> bool:
    """``path`` is ``session`` or a path inside it (not a sibling sharing its prefix)."""
    return path == session or path.startswith(session.rstrip("/") + "/")


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
    except OSError:
        return "?"
    # the executable and its script, without directories: "raylet", "python log_monitor.py"
    shown = [os.path.basename(w.decode(errors="replace")) for w in words[:2] if w]
    return " ".join(shown).strip() or "?"


class SessionProcesses:
    """The processes of one Ray session, as recorded while its driver lives."""

    def __init__(self, session: str, exclude: set[int]):
        self.session = session.rstrip("/")
        self.exclude = exclude
        self.known: dict[int, int] = {}  # pid -> start time
        #: processes found not to name the session, not checked again by a quick scan
        self.strangers: set[Key] = set()

    def scan(self, thorough: bool = True) -> dict[int, int]:
        """Every live process of the session now: named after it, or descended from one that
        is (or from one recorded earlier). Adds them to :attr:`known`; returns them.

        A quick scan (``thorough=False``, while the driver lives) reads the command line and
        output of a process only the first time it sees it (Ray renames its workers, but
        they are found as descendants).
        """
        table: dict[int, tuple[int, int, str]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (info := _stat(int(entry))) is not None:
                table[int(entry)] = info
        # forget the recorded processes that are gone (a pid now reused is another process)
        self.known = {
            pid: start
            for pid, start in self.known.items()
            if pid in table and table[pid][1] == start and table[pid][2] != "Z"
        }
        found = set()
        strangers = set()
        for pid, (_, start, state) in table.items():
            if state == "Z" or pid in self.exclude:
                continue
            if not thorough and (pid, start) in self.strangers:
                strangers.add((pid, start))
            elif _names_session(pid, self.session):
                found.add(pid)
            else:
                strangers.add((pid, start))
        self.strangers = strangers
        found |= set(self.known)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = list(found)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in found and child not in self.exclude and table[child][2] != "Z":
                    found.add(child)
                    todo.append(child)
        for pid in found:
            self.known[pid] = table[pid][1]
        return {pid: table[pid][1] for pid in found}

    def stop(self, deadline_s: float = 15.0) -> list[str]:
        """Terminate, then kill, every process of the session until none is left (or
        ``deadline_s`` passed); returns the names of those that were running."""
        stopped: dict[Key, str] = {}
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            alive = self.scan()
            if not alive:
                break
            for pid, start in alive.items():
                stopped.setdefault((pid, start), _name(pid))
            _signal_all(alive, signal.SIGTERM)
            term_end = min(end, time.monotonic() + TERM_GRACE_S)
            while alive and time.monotonic() < term_end:
                time.sleep(0.1)
                alive = {p: s for p, s in alive.items() if _same_alive(p, s)}
            _signal_all(alive, signal.SIGKILL)
            time.sleep(0.1)
        return list(stopped.values())


def _same_alive(pid: int, start: int) -> bool:
    info = _stat(pid)
    return info is not None and info[1] == start and info[2] != "Z"


def _signal_all(procs: dict[int, int], sig: int) -> None:
    """Send ``sig`` to each (pid, start time) that is still that process."""
    for pid, start in procs.items():
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # gone, or a kernel without pidfd (then pids are checked just before)
            if _same_alive(pid, start):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            continue
        try:  # the pidfd pins the process: a start time that matches now cannot change
            if _same_alive(pid, start):
                signal.pidfd_send_signal(fd, sig)
        except OSError:
            pass
        finally:
            os.close(fd)


def _say(message: str) -> None:
    try:
        print(f"oni-sys ray reaper: {message}", file=sys.stderr, flush=True)
    except OSError:  # the driver's terminal or pipe may be gone with it
        pass


def watch(driver: int, session: str, pipe_fd: int = 0) -> int:
    """Record the session's processes until the driver dies or says goodbye, then stop what
    is left of them (see the module docstring). Returns the exit code."""
    procs = SessionProcesses(session, exclude={os.getpid(), driver})
    said = b""
    while True:
        procs.scan(thorough=False)
        ready, _, _ = select.select([pipe_fd], [], [], POLL_S)
        if ready:
            data = os.read(pipe_fd, 64)
            said += data
            if not data:
                break
        if os.getppid() != driver:  # reparented: the driver is gone (end of file comes too)
            break
    if said.endswith(GOODBYE):
        end = time.monotonic() + SHUTDOWN_GRACE_S
        while procs.scan() and time.monotonic() < end:
            time.sleep(0.2)
        left = procs.stop()
        if left:
            _say(
                f"ray.shutdown() left {len(left)} processes of {session} running; stopped "
                + ", ".join(sorted(left))
            )
        return 0
    left = procs.stop()
    if left:
        _say(
            f"the driver (pid {driver}) died; stopped the {len(left)} processes left of its "
            f"Ray instance {session}: " + ", ".join(sorted(left))
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", type=int, required=True, help="the driver's process id")
    parser.add_argument("--session", required=True, help="the Ray session directory")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the driver's end decides
    return watch(args.driver, os.path.abspath(args.session))


if __name__ == "__main__":
    sys.exit(main())
