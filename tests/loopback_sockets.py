"""Which TCP ports a set of processes listens on, and on which address (read from /proc).

Tests that start servers (a Ray head, a multi-node Ray cluster) use it to check that everything
listens on loopback only.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def decode_address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # IPv6: four 32-bit words, each in host (little-endian) order.
    return socket.inet_ntop(
        socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    )


def listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[len("socket:[") : -1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in owner:  # 0A: LISTEN
                addr, port = local.rsplit(":", 1)
                found.append((owner[inode], decode_address(addr), int(port, 16)))
    return found
