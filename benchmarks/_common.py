"""Shared helpers of the benchmark scripts: timing with medians, throughput, ratios, a table printer.

Benchmarks run as scripts (``python benchmarks/<name>.py``), which puts this directory on
``sys.path``; import with ``from _common import ...``. House rules they follow: every figure is a
median of repeats, every tier figure is printed next to a raw baseline measured in the same run
(and the ratio between them), and nothing is asserted.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

__all__ = [
    "GB",
    "MB",
    "QWEN3_8B_CHUNK_BYTES",
    "fmt_bytes",
    "fmt_rate",
    "fmt_ratio",
    "fmt_seconds",
    "machine_line",
    "median",
    "print_table",
    "rate",
    "time_async",
    "time_sync",
]

MB = 1e6
GB = 1e9
#: One 256-token chunk of Qwen3-8B's KV cache: 36 layers x (K, V) x 8 KV heads x 128 x bf16 x 256.
QWEN3_8B_CHUNK_BYTES = 36 * 2 * 8 * 128 * 2 * 256  # 37,748,736


def median(samples: Sequence[float]) -> float:
    """Median of ``samples`` (NaN for none)."""
    return statistics.median(samples) if samples else float("nan")


def time_sync(fn: Callable[[], object], *, repeats: int, warmup: int = 1,
              before: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``before`` runs untimed ahead of every call (e.g. to reset state the call changes).
    """
    out = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    return out


async def time_async(fn: Callable[[], Awaitable[object]], *, repeats: int, warmup: int = 1,
                     before: Callable[[], Awaitable[object]] | None = None) -> list[float]:
    """Like :func:`time_sync` for a coroutine function, awaited on the running loop."""
    out = []
    for i in range(warmup + repeats):
        if before is not None:
            await before()
        t0 = time.perf_counter()
        await fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    return out


def rate(nbytes: float, seconds: float) -> float:
    """Bytes per second (``inf`` for a zero duration)."""
    return nbytes / seconds if seconds > 0 else float("inf")


def fmt_rate(bytes_per_s: float) -> str:
    """``"9.87 GB/s"`` / ``"512 MB/s"`` (decimal units)."""
    if bytes_per_s >= GB:
        return f"{bytes_per_s / GB:.2f} GB/s"
    return f"{bytes_per_s / MB:.0f} MB/s"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", MB), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float) -> str:
    """``"12.3 us"`` / ``"4.56 ms"`` / ``"1.23 s"``."""
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x: float) -> str:
    """``"0.93x"``, never a misleading ``0.00x`` for a small nonzero ratio."""
    if x >= 100:
        return f"{x:.0f}x"
    return f"{x:.2f}x" if x >= 0.1 or x == 0 else f"{x:.2g}x"


def machine_line() -> str:
    """One line naming what the figures were measured on."""
    torch_version = "-"
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        pass
    return (f"python {platform.python_version()}, torch {torch_version}, {os.cpu_count()} CPUs, "
            f"{platform.platform()}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None,
                align: str | None = None, file: TextIO | None = None) -> None:
    """Print ``rows`` under ``headers``.

    ``align`` has one letter per column, ``l`` or ``r``; by default the first column is left-aligned
    and the others right-aligned (numbers).
    """
    out = file or sys.stdout
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]
    sides = align or "l" + "r" * (len(headers) - 1)

    def line(row: list[str]) -> str:
        parts = [c.ljust(w) if how == "l" else c.rjust(w) for c, w, how in zip(row, widths, sides, strict=False)]
        return "  ".join(parts).rstrip()

    if title:
        print(title, file=out)
    print(line(cells[0]), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells[1:]:
        print(line(row), file=out)
