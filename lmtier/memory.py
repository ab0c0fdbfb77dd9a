"""Host memory pool: one preallocated slab (pinned when CUDA exists), reused, refcounted.

Allocating pinned memory is 5-40x slower than copying into an existing buffer, and leaked pinned
memory is the most common complaint about KV offloading. So lmtier allocates one slab up front and
carves buffers out of it with a first-fit, coalescing free list.

Ownership is explicit: :meth:`HostMemoryPool.allocate` returns a :class:`HostBuffer` with a
refcount of 1; :meth:`HostBuffer.retain` / :meth:`HostBuffer.release` adjust it and the range goes
back to the pool when it reaches zero. :meth:`HostBuffer.lease_view` hands out a read-only
``memoryview`` that holds its own reference, released when the last view derived from it is
garbage collected, so zero-copy readers can never see a range that was recycled under them.

:meth:`HostMemoryPool.outstanding` counts live buffers; the test suite (and the conformance
suite, for every backend) fails a test that leaves any behind in a pool it created.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lmtier.errors import CapacityError, InvalidArgumentError, LmtierError

if TYPE_CHECKING:
    import torch

__all__ = ["HostBuffer", "HostMemoryPool", "empty_pinned_cache", "host_tensor_of", "lent_buffer", "live_pools",
           "release_all"]

_ALIGN = 256  # 16-byte vector access needs 16; 256 keeps every buffer on its own cache lines
# Why a WeakSet at module level: the leak checker must find pools created anywhere in a test
# without every constructor threading a registry through; weak refs keep it free of lifetimes.
_LIVE_POOLS: weakref.WeakSet[HostMemoryPool] = weakref.WeakSet()


def live_pools() -> list[HostMemoryPool]:
    """Pools not yet garbage collected, open or closed (for leak checks: closing a pool does not
    return the buffers still out, so a closed pool with outstanding buffers leaked them)."""
    return list(_LIVE_POOLS)


class HostMemoryPool:
    """A fixed slab of host memory handing out aligned, refcounted :class:`HostBuffer` ranges.

    Args:
        capacity_bytes: size of the slab, allocated once.
        pin: page-lock the slab (needed for async DMA); ``None`` pins iff CUDA is available.
            CPU-only torch cannot pin, so ``pin=True`` there raises :class:`LmtierError`.
        name: shows up in errors and leak reports.
        memory: carve the buffers out of this flat ``uint8`` CPU tensor (at least
            ``capacity_bytes`` long) instead of allocating a slab, e.g. a shared-memory segment
            mapped by the caller (``lmtier serve``'s slab). The caller keeps it alive and pins it
            (or not) itself; ``pin`` must then be left ``None``, and :attr:`pinned` is False.

    Thread-safe: the engine thread and the manager's loop allocate concurrently.
    """

    def __init__(self, capacity_bytes: int, *, pin: bool | None = None, name: str = "host",
                 memory: torch.Tensor | None = None) -> None:
        import torch

        if capacity_bytes <= 0:
            raise InvalidArgumentError(f"pool capacity must be positive, got {capacity_bytes}")
        if memory is not None:
            if pin is not None:
                raise InvalidArgumentError("pin applies to a slab the pool allocates; leave it None with memory=")
            if memory.dtype != torch.uint8 or memory.dim() != 1 or memory.device.type != "cpu":
                raise InvalidArgumentError("memory must be a flat uint8 CPU tensor")
            if memory.numel() < _round_up(capacity_bytes):
                raise InvalidArgumentError(
                    f"memory holds {memory.numel()} bytes, the pool needs {_round_up(capacity_bytes)}")
        elif pin is None:
            pin = torch.cuda.is_available()
        if pin and not torch.cuda.is_available():
            raise LmtierError("cannot pin host memory: this torch build has no CUDA; use pin=False")
        self.name = name
        self.capacity = _round_up(capacity_bytes)
        if memory is not None:
            self._slab = memory[: self.capacity]
            # not ours: its provider pins it, if at all, in the processes that copy to a GPU (asking
            # torch here could start a CUDA context in a process that must never touch the GPU)
            self.pinned = False
        else:
            self.pinned = bool(pin)
            self._slab = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self.pinned)
        self._owns_pinned = memory is None and self.pinned
        # numpy view and address of the slab, made once: slicing them costs ~0.2 us where a torch
        # slice costs ~2 us, which dominated small puts and gets
        self._slab_np = self._slab.numpy()
        self._base_ptr = int(self._slab.data_ptr())
        # reentrant: the cycle collector may run inside allocate (creating the buffer object is an
        # allocation) and finalize a lease caught in a reference cycle, whose release frees into
        # this pool from the thread already holding the lock (allocate has made its changes by
        # then: it only records and returns the buffer)
        self._lock = threading.RLock()
        # free list: sorted offsets with sizes; coalesced on release
        self._free_offsets: list[int] = [0]
        self._free_sizes: dict[int, int] = {0: self.capacity}
        self._used = 0
        self._live: dict[int, HostBuffer] = {}
        self.closed = False
        _LIVE_POOLS.add(self)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.capacity - self._used

    def outstanding(self) -> int:
        """Number of buffers allocated and not yet released."""
        return len(self._live)

    def allocate(self, nbytes: int) -> HostBuffer:
        """A buffer of exactly ``nbytes`` (refcount 1); CapacityError when the slab is full."""
        if nbytes <= 0:
            raise InvalidArgumentError(f"buffer size must be positive, got {nbytes}")
        size = _round_up(nbytes)
        with self._lock:
            if self.closed:
                raise LmtierError(f"pool {self.name!r} is closed")
            for i, off in enumerate(self._free_offsets):
                free = self._free_sizes[off]
                if free >= size:
                    del self._free_offsets[i]
                    del self._free_sizes[off]
                    if free > size:
                        bisect.insort(self._free_offsets, off + size)
                        self._free_sizes[off + size] = free - size
                    self._used += size
                    buf = HostBuffer(self, off, nbytes, size)
                    self._live[off] = buf
                    return buf
        raise CapacityError(
            f"host pool {self.name!r} cannot fit {nbytes} bytes "
            f"({self.free_bytes} of {self.capacity} free, fragmented or full); "
            "raise the tier's max_bytes or release buffers"
        )

    def try_allocate(self, nbytes: int) -> HostBuffer | None:
        """Like :meth:`allocate` but returns ``None`` when full."""
        try:
            return self.allocate(nbytes)
        except CapacityError:
            return None

    def _free(self, buf: HostBuffer) -> None:
        with self._lock:
            if self._live.pop(buf.offset, None) is None:
                return
            self._used -= buf.reserved
            self._merge_free(buf.offset, buf.reserved)
            if self.closed and not self._live:
                self._drop_slab()

    def _merge_free(self, off: int, size: int) -> None:
        i = bisect.bisect_left(self._free_offsets, off)
        # merge with the following free range
        if i < len(self._free_offsets) and self._free_offsets[i] == off + size:
            size += self._free_sizes.pop(self._free_offsets.pop(i))
        # merge with the preceding free range
        if i > 0:
            prev = self._free_offsets[i - 1]
            if prev + self._free_sizes[prev] == off:
                self._free_sizes[prev] += size
                return
        self._free_offsets.insert(i, off)
        self._free_sizes[off] = size

    def close(self) -> None:
        """Mark the pool closed and free the slab: now if no buffer is out, else when the last
        one is released (a closed pool must not hold its memory until the garbage collector
        finds the objects that still reference it)."""
        with self._lock:
            self.closed = True
            if not self._live:
                self._drop_slab()

    @property
    def released(self) -> bool:
        """True once a closed pool has let go of its slab."""
        return self._slab_np.size == 0 and self.capacity > 0

    def _drop_slab(self) -> None:
        """Let go of the slab (called with the lock held, once no buffer is out).

        Why empty torch's pinned cache too: torch's CUDA host allocator keeps a freed pinned
        block cached for reuse (and rounds each up to a power of two: an 18 GiB slab pins 32 GiB),
        so without it the memory of a closed cpu tier stays page-locked for the process' life.
        """
        if self._slab_np.size == 0:
            return
        import torch

        empty = torch.empty(0, dtype=torch.uint8)
        self._slab, self._slab_np, self._base_ptr = empty, empty.numpy(), 0
        if self._owns_pinned:
            empty_pinned_cache()

    def __repr__(self) -> str:
        return (f"HostMemoryPool({self.name!r}, {self._used}/{self.capacity} bytes used, "
                f"{len(self._live)} buffers, pinned={self.pinned})")


class HostBuffer:
    """A range of a :class:`HostMemoryPool` slab with an explicit refcount."""

    __slots__ = ("__weakref__", "_pool", "_refs", "_refs_lock", "nbytes", "offset", "reserved")

    def __init__(self, pool: HostMemoryPool, offset: int, nbytes: int, reserved: int) -> None:
        self._pool = pool
        self.offset = offset
        self.nbytes = nbytes
        self.reserved = reserved
        self._refs = 1
        self._refs_lock = threading.Lock()

    @property
    def pool(self) -> HostMemoryPool:
        return self._pool

    @property
    def pinned(self) -> bool:
        return self._pool.pinned

    @property
    def tensor(self) -> torch.Tensor:
        """A writable uint8 tensor view (valid while you hold a reference)."""
        self._check_alive()
        return self._pool._slab[self.offset : self.offset + self.nbytes]

    @property
    def data_ptr(self) -> int:
        return self._pool._base_ptr + self.offset

    def view(self) -> memoryview:
        """A writable memoryview (valid while you hold a reference)."""
        self._check_alive()
        return self._pool._slab_np[self.offset : self.offset + self.nbytes].data

    def retain(self) -> HostBuffer:
        with self._refs_lock:
            self._check_alive()
            self._refs += 1
        return self

    def release(self) -> None:
        with self._refs_lock:
            if self._refs <= 0:
                raise LmtierError("HostBuffer released more times than retained")
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._pool._free(self)

    @property
    def refcount(self) -> int:
        return self._refs

    def lease_view(self) -> memoryview:
        """A read-only view that holds one reference until the view (and views of it) die."""
        import numpy as np

        self.retain()
        return np.asarray(_Lease(self)).data  # the array's base is the lease: lifetimes are tied

    def _check_alive(self) -> None:
        if self._refs <= 0:
            raise LmtierError("use of a HostBuffer after its last release")

    def __enter__(self) -> HostBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"HostBuffer({self.nbytes} bytes @ {self.offset}, refs={self._refs})"


class _Lease:
    """Holds one reference on a HostBuffer for as long as numpy views reference it.

    Not an ndarray on purpose: numpy collapses a view's ``base`` to the first non-view owner, so
    slices of a lease's array keep the lease (not the slab) alive. ``__del__`` rather than
    ``weakref.finalize``: same moment (the last reference dies), half the cost per lease.
    """

    __slots__ = ("__array_interface__", "buffer")

    def __init__(self, buffer: HostBuffer) -> None:
        self.buffer = buffer
        self.__array_interface__: dict[str, Any] = {
            "shape": (buffer.nbytes,),
            "typestr": "|u1",
            "data": (buffer.data_ptr, True),  # read-only
            "version": 3,
        }

    def __del__(self) -> None:
        self.buffer.release()


def release_all(values: Iterable[object] | None, *, shared: bool = False) -> None:
    """Give back every borrowed buffer among ``values``: the one way to return what a call borrowed
    on the paths that end it early (an error, a cancellation, results handed on as copies).

    Borrowed buffers are :class:`HostBuffer` and the stores' lent chunks
    (:class:`~lmtier.store.HostChunk`: lmtier serve's slab slots too); anything else — a miss
    (``None``), bytes, a per-key exception — is passed over. Each listed buffer holds one
    reference of its own, unless ``shared``: then a buffer listed several times (a repeated key's
    reads sharing one) holds one, and is released once.
    """
    from lmtier.store import HostChunk  # the store's protocol (lmtier.store imports this module)

    seen: set[int] = set()
    for value in values or ():
        if value is None or (not isinstance(value, HostBuffer) and not isinstance(value, HostChunk)):
            continue  # (a protocol's isinstance costs microseconds: misses skip it)
        if shared:
            if id(value) in seen:
                continue
            seen.add(id(value))
        value.release()


def host_tensor_of(value: object) -> torch.Tensor | None:
    """The pool tensor behind a :meth:`HostBuffer.lease_view` (for zero-copy DMA), else None."""
    if isinstance(value, HostBuffer):
        return value.tensor
    obj = value.obj if isinstance(value, memoryview) else None
    base = getattr(obj, "base", None)
    if isinstance(base, _Lease):
        return base.buffer.tensor
    return None


def lent_buffer(value: object) -> HostBuffer | None:
    """The :class:`HostBuffer` behind ``value`` (a lease view or a HostBuffer), with one more
    reference for the caller to release; ``None`` for any other buffer.

    Turns a tier's zero-copy read (a lease view, whose reference dies with the view) into an
    explicit reference that outlives the view: how the manager lends the cpu tier's hits as they are.
    """
    if isinstance(value, HostBuffer):
        return value.retain()
    if not isinstance(value, memoryview):
        return None
    base = getattr(value.obj, "base", None)
    if isinstance(base, _Lease) and value.nbytes == base.buffer.nbytes:  # the whole range, not a slice
        return base.buffer.retain()
    return None


def empty_pinned_cache() -> bool:
    """Give torch's cached, unused pinned host blocks back to the system; False where this torch
    has no such call or no CUDA (nothing is cached then). Blocks still in use are kept."""
    import torch

    if not torch.cuda.is_available():
        return False
    # the name moved between releases: torch.accelerator (2.9+), then the older private bindings
    for owner, name in ((getattr(torch, "accelerator", None), "empty_host_cache"),
                        (torch._C, "_accelerator_emptyHostCache"), (torch._C, "_host_emptyCache"),
                        (torch._C, "_cuda_hostEmptyCache")):
        fn = getattr(owner, name, None)
        if callable(fn):
            fn()
            return True
    return False


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
