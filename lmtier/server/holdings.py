"""What one client connection holds: leases and reservations on slab ranges, by slot id.

Ownership is per connection on purpose: when the connection closes, :meth:`Holdings.close`
releases everything at once — there is no reaper and no lease timeout, so a client that is alive
keeps what it holds and a dead one (exit, crash, ``kill -9``) holds nothing a moment later.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lmtier.server.protocol import E_NOT_HELD, ServerError

if TYPE_CHECKING:
    from lmtier.memory import HostBuffer

__all__ = ["Holdings"]


class Holdings:
    """Slot id → held range, for one connection. Not thread-safe: the server's loop owns it.

    A held range is one reference on a :class:`~lmtier.memory.HostBuffer` of the slab: a
    reservation, or a lease (the hot tier's own range, retained, or a range a colder tier's hit was
    read into); ``release()`` gives it back.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._leases: dict[int, HostBuffer] = {}
        self._reservations: dict[int, HostBuffer] = {}
        self.closed = False

    @property
    def leases(self) -> int:
        return len(self._leases)

    @property
    def reservations(self) -> int:
        return len(self._reservations)

    def add_lease(self, held: HostBuffer) -> int | None:
        """Hold ``held`` as a lease; its slot id, or None (released at once) when closed."""
        if self.closed:
            _release(held)
            return None
        slot = next(self._ids)
        self._leases[slot] = held
        return slot

    def add_reservation(self, buf: HostBuffer) -> int | None:
        """Hold ``buf`` as a reservation; its slot id, or None (released at once) when closed."""
        if self.closed:
            buf.release()
            return None
        slot = next(self._ids)
        self._reservations[slot] = buf
        return slot

    def take_reservations(self, slots: Sequence[int]) -> list[HostBuffer]:
        """Remove and return the reservations ``slots`` (all of them, or none: ServerError)."""
        _check_distinct(slots)
        missing = [s for s in slots if s not in self._reservations]
        if missing:
            leased = [s for s in missing if s in self._leases]
            why = f"slot(s) {leased[:8]} are leases, not reservations" if leased else (
                f"slot(s) {missing[:8]} are not reservations this connection holds (never reserved, "
                "released or committed already)")
            raise ServerError(E_NOT_HELD, f"commit refused: {why}; nothing was committed")
        return [self._reservations.pop(s) for s in slots]

    def release(self, slots: Sequence[int]) -> int:
        """Give back leases and reservations ``slots`` (all of them, or none: ServerError)."""
        _check_distinct(slots)
        missing = [s for s in slots if s not in self._leases and s not in self._reservations]
        if missing:
            raise ServerError(E_NOT_HELD, f"release refused: slot(s) {missing[:8]} are not held by this "
                                          "connection (never handed out, or released/committed already); "
                                          "nothing was released")
        for s in slots:
            held = self._leases.pop(s, None)
            if held is None:
                held = self._reservations.pop(s)
            _release(held)
        return len(slots)

    def close(self) -> int:
        """Release everything (the connection closed); later additions are released at once."""
        self.closed = True
        held = [*self._leases.values(), *self._reservations.values()]
        self._leases.clear()
        self._reservations.clear()
        for h in held:
            _release(h)
        return len(held)


def _check_distinct(slots: Sequence[int]) -> None:
    if len(set(slots)) != len(slots):
        raise ServerError(E_NOT_HELD, "a slot is named twice in one request; nothing was done")


def _release(held: HostBuffer) -> None:
    held.release()
