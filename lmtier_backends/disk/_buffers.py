"""Reusable read buffers for the disk tier's ``get``.

``get`` hands out private copies (never views of the files: a view of a file would change or
fault if the file were touched behind the tier's back). But fresh memory for every large read is
expensive: a new 37 MB buffer costs ~9,000 page faults, and on the machines measured that made
``get`` 20-80% slower than a read into a reused buffer. So large buffers are recycled: ``get``
returns a read-only view whose lifetime owner (a small lease object) puts the buffer back on a
free list when the last view derived from it is garbage collected. KV chunks of one model all
have the same size, so an exact-size free list hits almost always. The free list is bounded in
bytes; beyond that, returned buffers are simply freed.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

__all__ = ["BufferRecycler"]

#: Smaller buffers come from malloc's heap, which already reuses memory cheaply.
MIN_RECYCLED_BYTES = 1 << 20


class BufferRecycler:
    """Exact-size free lists of uint8 arrays, holding at most ``max_bytes`` while idle."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[np.ndarray[Any, Any]]] = {}
        self._idle_bytes = 0
        # RLock: a lease may be collected (and give back) by the GC while this thread holds the lock
        self._lock = threading.RLock()
        self._closed = False

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, nbytes: int) -> np.ndarray[Any, Any]:
        """A writable array of exactly ``nbytes`` (recycled when possible, content unspecified)."""
        if nbytes >= MIN_RECYCLED_BYTES:
            with self._lock:
                spare = self._free.get(nbytes)
                if spare:
                    self._idle_bytes -= nbytes
                    return spare.pop()
        return np.empty(nbytes, dtype=np.uint8)

    def lend(self, array: np.ndarray[Any, Any]) -> memoryview:
        """A read-only view of ``array`` that gives it back here once no view of it is alive."""
        if array.nbytes < MIN_RECYCLED_BYTES or self.max_bytes <= 0:
            array.flags.writeable = False
            return array.data
        readonly = np.asarray(_Lease(array, self))  # its .base is the lease: lifetimes are tied
        return readonly.data

    def give_back(self, array: np.ndarray[Any, Any]) -> None:
        """Return an array nobody references any more (also used for reads that failed)."""
        n = array.nbytes
        if n < MIN_RECYCLED_BYTES:
            return
        with self._lock:
            if self._closed or self._idle_bytes + n > self.max_bytes:
                return
            self._free.setdefault(n, []).append(array)
            self._idle_bytes += n

    def close(self) -> None:
        """Free the idle buffers; buffers still lent out are freed when their views die."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self._idle_bytes = 0


class _Lease:
    """Owns a lent array for as long as numpy views (and memoryviews of them) reference it."""

    __slots__ = ("__array_interface__", "__weakref__")

    def __init__(self, array: np.ndarray[Any, Any], recycler: BufferRecycler) -> None:
        self.__array_interface__: dict[str, Any] = {
            "shape": (array.nbytes,),
            "typestr": "|u1",
            "data": (array.ctypes.data, True),  # read-only
            "version": 3,
        }
        # the finalizer holds the array itself, so the memory stays valid until the lease dies
        weakref.finalize(self, recycler.give_back, array)
