"""Reading ``/proc/<pid>/stat`` in tests: a process's state, parent, start time and niceness."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None when it is gone.

    Index 0 is the state (field 3 of proc(5)), 1 the parent pid, 16 the niceness, 19 the start
    time. The command name may hold spaces and parentheses, so the split is after its last ")".
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def parent_pid(pid: int) -> int | None:
    """The parent's pid, or None when ``pid`` is gone."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def niceness(pid: int) -> int:
    """The process's niceness (raises FileNotFoundError when it is gone)."""
    fields = stat_fields(pid)
    if fields is None:
        raise FileNotFoundError(f"process {pid} is gone")
    return int(fields[16])
