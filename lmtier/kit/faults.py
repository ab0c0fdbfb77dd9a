"""Faults are misses, key by key: one failing server or object does not sink a read batch.

A batch of reads often spans several independent failure domains: the primaries of a Redis
Cluster, the objects of a bucket (one of which the server cannot serve), the files of a
directory (one on a bad sector). A backend reads each key (or each node's share of keys) and gets,
per key, either an answer (a value, or a miss) or the fault that stopped it. :class:`KeyFaults`
settles such a batch the one way every tier should:

* keys that answered keep their answer (hits are served);
* a key whose read faulted is a **miss**: counted (``stats()["key_faults"]``, exported as a
  metric) and logged once per batch with how many keys and the first fault;
* only when **no key of the batch answered** is the batch a fault of the tier: the first fault is
  mapped to the lmtier error tree and raised, so the manager degrades the whole call and its
  circuit breaker learns that the tier is down.

Corrupt and newer-format values are not faults (they are answers: :class:`~lmtier.kit.Rejections`
handles them), and a cancellation is never a per-key outcome: it propagates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from lmtier.kit.errors import describe

if TYPE_CHECKING:
    from lmtier.errors import LmtierError
    from lmtier.keys import ChunkKey

__all__ = ["KeyFaults"]

log = logging.getLogger("lmtier.kit")
T = TypeVar("T")
M = TypeVar("M")


class KeyFaults:
    """Settles the per-key outcomes of a tier's read batches (see the module docstring).

    Args:
        tier: how log lines name the tier (``"redis tier redis://10.0.0.5:6379/0"``).
        to_error: ``to_error(exc, op=op)`` maps a client exception to the lmtier error raised when
            the whole batch faulted: the tier's :class:`~lmtier.kit.ErrorMap`, typically.

    Thread-safe; one per backend.
    """

    def __init__(self, tier: str, to_error: Callable[..., LmtierError]) -> None:
        self.tier = tier
        self._to_error = to_error
        self.count = 0
        self._lock = threading.Lock()

    def settle(self, op: str, keys: Sequence[ChunkKey], outcomes: Sequence[T | BaseException],
               miss: M) -> list[T | M]:
        """``outcomes[i]`` is ``keys[i]``'s answer, or the exception its read faulted with.

        Returns the answers with each fault replaced by ``miss`` (``None`` for ``get``, ``False``
        for ``get_into`` and ``contains``), counted and logged. Raises the mapped first fault when
        every key of a non-empty batch faulted.
        """
        faults = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
        if not faults:
            return list(outcomes)  # type: ignore[arg-type]
        first = outcomes[faults[0]]
        assert isinstance(first, BaseException)
        if len(faults) == len(outcomes):
            error = self._to_error(first, op=op)
            if error is not first and error.__cause__ is None:
                error.__cause__ = first
            raise error
        with self._lock:
            self.count += len(faults)
        log.warning("%s: %s: %d of %d keys faulted and are misses (first: %s: %s); the other keys were "
                    "answered", self.tier, op, len(faults), len(outcomes), keys[faults[0]], describe(first))
        return [miss if isinstance(o, BaseException) else o for o in outcomes]  # type: ignore[misc]

    def stats(self) -> dict[str, Any]:
        """``key_faults``: keys answered as misses because their own read faulted."""
        return {"key_faults": self.count}
