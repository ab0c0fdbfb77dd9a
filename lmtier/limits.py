"""What this machine can hold: the memory bound configurations are checked against.

A tier or pool larger than the machine's memory cannot work: pinned memory must be resident, and
even a pageable slab that size is swapped to death or killed. Configuration validation refuses
such sizes up front, with a message saying how much memory there is, instead of letting torch's
allocator fail at open with its own error.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MemoryLimit", "check_fits_in_memory", "format_bytes", "memory_limit"]


class MemoryLimit:
    """The most memory this process can have (``bytes``), and how to say so (``described``)."""

    __slots__ = ("bytes", "described")

    def __init__(self, nbytes: int, described: str) -> None:
        self.bytes = nbytes
        self.described = described


def memory_limit() -> MemoryLimit:
    """Physical memory, or this process's cgroup limit where that is lower (containers)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = _meminfo_bytes("MemAvailable")
    now = f", {format_bytes(available)} available now" if available is not None else ""
    cgroup = _cgroup_limit()
    if cgroup is not None and cgroup < total:
        return MemoryLimit(cgroup, f"this process's cgroup may use {format_bytes(cgroup)} "
                                   f"(the machine has {format_bytes(total)} of RAM{now})")
    return MemoryLimit(total, f"this machine has {format_bytes(total)} of RAM{now}")


def check_fits_in_memory(nbytes: int) -> int:
    """``nbytes`` if it is positive and fits in this machine's memory, else a ValueError (for a
    pydantic validator) saying how much memory there is. For sizes that must be resident: a
    pool, a RAM tier."""
    if nbytes <= 0:
        raise ValueError(f"must be a positive number of bytes, got {nbytes}")
    limit = memory_limit()
    if nbytes > limit.bytes:
        raise ValueError(f"{format_bytes(nbytes)} is more memory than there is: {limit.described}; lower it")
    return nbytes


def format_bytes(n: float) -> str:
    """Binary units, as ``max_bytes`` values are usually written: ``23.4 GiB``."""
    if n >= 1 << 70:
        return f"{n:.3g} bytes"
    for unit, scale in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit() -> int | None:
    """cgroup v2 ``memory.max`` of this process's cgroup, else v1's ``memory.limit_in_bytes``."""
    candidates: list[Path] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and controllers == "":
                candidates.append(Path("/sys/fs/cgroup", path.lstrip("/"), "memory.max"))
            elif "memory" in controllers.split(","):
                candidates.append(Path("/sys/fs/cgroup/memory", path.lstrip("/"), "memory.limit_in_bytes"))
    except OSError:
        return None
    for candidate in candidates:
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)  # "max" (v2) means no limit; v1 says so with a huge number
    return None
