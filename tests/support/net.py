"""Which addresses a process listens on (Linux ``/proc``): tests prove servers stay on loopback."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LOOPBACK_HEX", "listening_addresses"]

#: 127.0.0.1 and ::1 (and ::ffff:127.0.0.1) as /proc/net/tcp{,6} print them; 0.0.0.0 / :: are not.
LOOPBACK_HEX = frozenset({"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"})


def listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp) of TCP sockets in LISTEN state owned by ``pids``."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                found.append(cols[1].split(":")[0])
    return found
