"""NIXL-registered staging memory: slabs registered once, carved per call, grown in bounded steps.

NIXL moves bytes only between registered regions, and registering memory is expensive (it may
pin pages and build per-plugin metadata). So the tier registers whole slabs - each a
:class:`~lmtier.memory.HostMemoryPool` - once, and carves per-item :class:`HostBuffer` ranges out
of them for every transfer. When no slab has room the pool adds one of ``slab_bytes`` (or the
smallest multiple of it that fits the item), up to ``max_bytes`` in all; past that, allocation
raises :class:`CapacityError`.

A buffer whose transfer could not be stopped (a timed-out request NIXL cannot cancel) may still be
written by the plugin later, so it is *quarantined*: kept referenced forever instead of going back
to the pool, and counted. Everything is deregistered in :meth:`StagingPool.close`, which the tier
calls only once no transfer is running.
"""

from __future__ import annotations

import threading
from typing import Any

from lmtier.errors import CapacityError
from lmtier.memory import HostBuffer, HostMemoryPool

__all__ = ["StagingPool"]


class _Slab:
    __slots__ = ("pool", "registration")

    def __init__(self, pool: HostMemoryPool, registration: Any) -> None:
        self.pool = pool
        self.registration = registration


class StagingPool:
    """Thread-safe carving of NIXL-registered host memory for one agent and one plugin.

    Args:
        agent: the ``nixl_agent`` that registers the slabs.
        plugin: the NIXL backend name the slabs are registered with (``POSIX``, ``OBJ``).
        slab_bytes: size of one registration step.
        max_bytes: bound of all slabs together.
        pinned: page-lock the slabs (``None``: iff CUDA is available).
        name: prefix of the slabs' pool names (shows up in leak reports).
    """

    def __init__(self, agent: Any, plugin: str, *, slab_bytes: int, max_bytes: int,
                 pinned: bool | None, name: str) -> None:
        self._agent = agent
        self._plugin = plugin
        self.slab_bytes = slab_bytes
        self.max_bytes = max_bytes
        self._pinned = pinned
        self._name = name
        self._slabs: list[_Slab] = []
        self._quarantined: list[HostBuffer] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def registered_bytes(self) -> int:
        return sum(s.pool.capacity for s in self._slabs)

    @property
    def slabs(self) -> int:
        """Slabs registered so far (each one NIXL registration)."""
        return len(self._slabs)

    @property
    def quarantined_bytes(self) -> int:
        return sum(b.nbytes for b in self._quarantined)

    def outstanding(self) -> int:
        """Carved buffers not yet released (quarantined ones included)."""
        return sum(s.pool.outstanding() for s in self._slabs)

    def allocate(self, nbytes: int) -> HostBuffer:
        """A registered buffer of exactly ``nbytes`` (refcount 1); CapacityError past ``max_bytes``."""
        with self._lock:
            if self._closed:
                raise CapacityError("nixl tier: staging memory is closed")
            for slab in self._slabs:
                buf = slab.pool.try_allocate(nbytes)
                if buf is not None:
                    return buf
            size = -(-nbytes // self.slab_bytes) * self.slab_bytes
            if self.registered_bytes + size > self.max_bytes:
                raise CapacityError(
                    f"nixl tier: no staging memory for {nbytes} bytes ({self.registered_bytes} of "
                    f"max_staging_bytes={self.max_bytes} registered and in use, "
                    f"{self.quarantined_bytes} quarantined); raise max_staging_bytes, or drop "
                    "values returned by get sooner (they are views of staging memory)"
                )
            slab = self._add_slab(size)
            return slab.pool.allocate(nbytes)

    def prime(self) -> None:
        """Register the first slab now (at open), so the first call pays no registration."""
        with self._lock:
            if not self._slabs and not self._closed:
                self._add_slab(self.slab_bytes)

    def quarantine(self, buf: HostBuffer) -> None:
        """Never reuse ``buf``'s range: a transfer that could not be stopped may still write it."""
        with self._lock:
            self._quarantined.append(buf.retain())

    def close(self) -> None:
        """Deregister every slab and close its pool. Call once no transfer is in flight.

        Buffers still referenced (views returned by ``get``) stay valid: deregistering does not
        free memory, and a pool frees its slab only when its last buffer is gone.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slabs, self._slabs = self._slabs, []
        errors = []
        for slab in slabs:
            try:
                self._agent.deregister_memory(slab.registration, backends=[self._plugin])
            except Exception as exc:  # keep going: every slab must be closed
                errors.append(exc)
            slab.pool.close()
        if errors:
            raise errors[0]

    def _add_slab(self, size: int) -> _Slab:
        pool = HostMemoryPool(size, pin=self._pinned, name=f"{self._name}-{len(self._slabs)}")
        try:
            # The whole slab as one buffer gives its base address through the public API.
            with pool.allocate(pool.capacity) as whole:
                base = whole.data_ptr
            registration = self._agent.register_memory(
                [(base, pool.capacity, 0, "")], "DRAM", backends=[self._plugin]
            )
        except BaseException:
            pool.close()
            raise
        slab = _Slab(pool, registration)
        self._slabs.append(slab)
        return slab
