"""What this machine can hold: the memory bound configurations are checked against.

A tier or pool larger than the machine's memory cannot work: pinned memory must be resident, and
even a pageable slab that size is swapped to death or killed. Configuration validation refuses
such sizes up front, with a message saying how much memory there is, instead of letting torch's
allocator fail at open with its own error.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MemoryLimit", "check_available_now", "check_fits_in_memory", "format_bytes", "memory_available",
           "memory_limit"]


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


def memory_available() -> MemoryLimit | None:
    """Memory this process could take now without swapping or pushing others out: the kernel's
    ``MemAvailable``, or this cgroup's headroom (limit minus use) where that is lower. ``None``
    where neither can be read (not Linux)."""
    available = _meminfo_bytes("MemAvailable")
    headroom = _cgroup_headroom()
    if headroom is not None and (available is None or headroom < available):
        return MemoryLimit(headroom, f"{format_bytes(headroom)} free in this process's cgroup")
    if available is None:
        return None
    return MemoryLimit(available, f"{format_bytes(available)} available now (of {format_bytes(memory_limit().bytes)})")


def check_available_now(nbytes: int, what: str) -> None:
    """Raise :class:`~lmtier.errors.CapacityError` when ``nbytes`` of memory that must be resident
    (a RAM tier's slab, made at open) is more than is available now, naming ``what`` (the tier),
    the size and what is free: checked before allocating, instead of torch's allocator failing
    (pinned memory) or the OOM killer acting once the slab fills (pageable memory)."""
    from lmtier.errors import CapacityError

    free = memory_available()
    if free is not None and nbytes > free.bytes:
        raise CapacityError(f"{what}: max_bytes={format_bytes(nbytes)} is more memory than is free: "
                            f"{free.described}; lower max_bytes or free memory first")


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


def _cgroup_headroom() -> int | None:
    """cgroup v2 ``memory.max`` minus ``memory.current`` of this process's cgroup, if limited."""
    limit = _cgroup_limit()
    if limit is None:
        return None
    for path in _cgroup_files("memory.current", "memory.usage_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return max(limit - int(text), 0)
    return None


def _cgroup_files(v2: str, v1: str) -> list[Path]:
    """Candidate paths of this process's memory cgroup file (``v2`` name, else the ``v1`` one)."""
    out: list[Path] = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and controllers == "":
                out.append(Path("/sys/fs/cgroup", path.lstrip("/"), v2))
            elif "memory" in controllers.split(","):
                out.append(Path("/sys/fs/cgroup/memory", path.lstrip("/"), v1))
    except OSError:
        pass
    return out


def _cgroup_limit() -> int | None:
    """cgroup v2 ``memory.max`` of this process's cgroup, else v1's ``memory.limit_in_bytes``."""
    for candidate in _cgroup_files("memory.max", "memory.limit_in_bytes"):
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)  # "max" (v2) means no limit; v1 says so with a huge number
    return None
