"""What each fault test saw, for docs/reliability.md: cases tried, wrong values, calls that raised to
the caller, stored values lost, the worst call latency.

A test takes the ``ledger`` fixture and names its fault: ``rec = ledger("redis: server frozen")``;
it times the calls the caller makes (``await rec.call(mgr.get(keys))``), counts what came back
(``rec.values(got, expected)``) and what a restart found (``rec.lost(n)``). The test still asserts
the behaviour itself; the ledger only records it. With ``LMTIER_RELIABILITY_OUT`` set (by
``benchmarks/reliability.py``), each record is appended there as one JSON line at teardown.
Latency is reported, never asserted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

__all__ = ["OUT_ENV", "FaultRecord"]

OUT_ENV = "LMTIER_RELIABILITY_OUT"
T = TypeVar("T")


@dataclass
class FaultRecord:
    """One test's account of one fault."""

    fault: str
    test: str = ""
    cases: int = 0  # operations tried while the fault was in effect (or inputs tried)
    wrong: int = 0  # values returned that differ from what was stored
    raised: int = 0  # fault-time calls that raised to the caller (bad input: typed errors are separate)
    typed_errors: int = 0  # bad input answered with a typed error naming what to fix
    lost: int = 0  # values stored and intact before the fault, gone after it
    misses: int = 0
    worst_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    async def call(self, awaitable: Awaitable[T]) -> T:
        """Await one caller-facing call during the fault: counted, timed, an exception recorded."""
        start = time.perf_counter()
        self.cases += 1
        try:
            return await awaitable
        except BaseException:
            self.raised += 1
            raise
        finally:
            self.worst_s = max(self.worst_s, time.perf_counter() - start)

    def call_now(self, fn: Callable[[], T]) -> T:
        """:meth:`call` for a synchronous caller-facing call (``ServerStore``'s API)."""
        start = time.perf_counter()
        self.cases += 1
        try:
            return fn()
        except BaseException:
            self.raised += 1
            raise
        finally:
            self.worst_s = max(self.worst_s, time.perf_counter() - start)

    def values(self, got: Sequence[Any], expected: Sequence[bytes | None]) -> None:
        """Count wrong values (returned and different) and misses among ``got``."""
        for value, want in zip(got, expected, strict=True):
            if value is None:
                self.misses += 1
            elif want is None or bytes(value) != want:
                self.wrong += 1

    def typed_error(self) -> None:
        self.cases += 1
        self.typed_errors += 1

    def write(self) -> None:
        out = os.environ.get(OUT_ENV)
        if out:
            with open(out, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(self)) + "\n")
