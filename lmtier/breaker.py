"""A per-tier circuit breaker: stop calling a tier that keeps failing, probe it now and then.

closed --(``failures`` consecutive unavailable errors, or one missed deadline)--> open
open --(cooldown passes)--> half_open
half_open --(probe succeeds)--> closed;  half_open --(probe fails)--> open, cooldown doubled (capped)

Why one missed deadline is enough: a tier that does not answer at all (a stopped process, a
partition) costs every caller its whole deadline, so waiting for three of them would cost three
requests a deadline each; a refused connection costs microseconds and may be a blip.

While open, the manager skips the tier: reads are misses, writes are skipped (and counted), and
nothing waits on a dead server. Exactly one call is let through as the probe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

__all__ = ["CircuitBreaker"]

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(self, failures: int, cooldown_s: float, max_cooldown_s: float,
                 clock: Callable[[], float]) -> None:
        self.threshold = failures
        self.base_cooldown = cooldown_s
        self.max_cooldown = max_cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self.state: State = "closed"
        self.failures = 0
        self.cooldown = cooldown_s
        self.opened_at = 0.0
        self.times_opened = 0

    def allow(self) -> bool:
        """May a call go to the tier now? In half_open, only the single probe is allowed."""
        with self._lock:
            if self.state == "closed":
                return True
            if self.state == "open" and self._clock() - self.opened_at >= self.cooldown:
                self.state = "half_open"
                return True
            return False

    def record_success(self) -> bool:
        """Returns True when this success closed an open circuit."""
        with self._lock:
            recovered = self.state != "closed"
            self.state, self.failures, self.cooldown = "closed", 0, self.base_cooldown
            return recovered

    def abandon_probe(self) -> None:
        """A half-open probe was cancelled by us: give the probe slot back."""
        with self._lock:
            if self.state == "half_open":
                self.state = "open"
                self.opened_at = self._clock() - self.cooldown  # probe again on the next call

    def record_failure(self, *, at_once: bool = False) -> bool:
        """Returns True when this failure opened the circuit (``at_once``: whatever the count)."""
        with self._lock:
            self.failures += 1
            if self.state == "half_open":
                self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            elif self.state == "open" or (self.failures < self.threshold and not at_once):
                return False
            self.state = "open"
            self.opened_at = self._clock()
            self.times_opened += 1
            return True
