"""The ``cpu`` tier: values live in one preallocated host slab (pinned when CUDA exists).

Puts copy into the slab (or adopt a buffer already carved from it: zero copy); gets return
read-only lease views of the slab, so reads are zero-copy and the transfer layer can DMA straight
from them. A view holds its range until it is garbage collected, so eviction never recycles
memory a reader still sees. Over ``max_bytes``, least-recently-used entries are evicted and
offered to the eviction listener (the manager demotes them to the next tier).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from lmtier.errors import CapacityError
from lmtier.keys import ChunkKey
from lmtier.kit import AsyncClosing, put_items
from lmtier.limits import check_available_now
from lmtier.memory import HostBuffer, HostMemoryPool, host_tensor_of
from lmtier.protocol import Buffer, Capabilities

if TYPE_CHECKING:

    from lmtier_backends.cpu.config import CpuConfig

__all__ = ["CpuBackend"]

EvictionListener = Callable[[ChunkKey, memoryview], None]


class CpuBackend(AsyncClosing):
    """In-process, byte-bounded LRU store over a :class:`HostMemoryPool` slab.

    ``pool``: keep the values in this pool instead of a slab of ``max_bytes`` allocated here
    (``lmtier serve`` passes a pool over its shared-memory slab); the tier closes it with itself.
    """

    def __init__(self, config: CpuConfig, *, pool: HostMemoryPool | None = None) -> None:
        self.config = config
        if pool is None:  # a slab this large is allocated now: refuse what the machine cannot give
            check_available_now(int(config.max_bytes), "cpu tier")
        self.pool = pool if pool is not None else HostMemoryPool(int(config.max_bytes), pin=config.pinned,
                                                                 name="cpu-tier")
        self._entries: OrderedDict[ChunkKey, HostBuffer] = OrderedDict()
        self._listeners: list[EvictionListener] = []
        self._evictions = 0
        self._closed = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=False, shared=False, evicts=True, max_item_bytes=self.pool.capacity)

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(key, view)`` for each LRU eviction, before the range is reused."""
        self._listeners.append(listener)

    def allocate(self, nbytes: int) -> HostBuffer:
        """A buffer inside this tier's slab; ``put`` of it adopts it without copying."""
        return self._reserve(nbytes)

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [k in self._entries for k in keys]

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        for k in keys:
            buf = self._entries.get(k)
            if buf is None:
                out.append(None)
            else:
                self._entries.move_to_end(k)
                out.append(buf.lease_view())
        return out

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        # the whole batch checked first; a key given twice is stored once, with its last value
        for item in put_items(items, tier="cpu tier (max_bytes)", max_item_bytes=self.pool.capacity):
            value, view = item.value, item.view
            if isinstance(value, HostBuffer) and value.pool is self.pool:
                buf = value.retain()  # adopt: the caller keeps its own reference
            else:
                buf = self._reserve(view.nbytes)
                source = _torch_source(value, view)
                if source is not None:
                    buf.tensor.copy_(source)
                else:
                    buf.view()[:] = view
            old = self._entries.pop(item.key, None)
            self._entries[item.key] = buf
            if old is not None:
                old.release()

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        for k in keys:
            buf = self._entries.pop(k, None)
            if buf is not None:
                buf.release()

    async def clear(self, namespaces: Collection[str] | None = None) -> int:
        """Drop every entry, or those of ``namespaces`` (:class:`~lmtier.protocol.SupportsClear`;
        not offered to the eviction listener); returns how many were dropped.

        Ranges still leased to readers are freed when their leases are released.
        """
        if namespaces is None:
            dropped, self._entries = self._entries, OrderedDict()
        else:
            wanted = set(namespaces)
            dropped = OrderedDict((k, b) for k, b in self._entries.items() if k.namespace in wanted)
            for k in dropped:
                del self._entries[k]
        for buf in dropped.values():
            buf.release()
        return len(dropped)

    def stats(self) -> dict[str, Any]:
        return {"objects": len(self._entries), "bytes": self.pool.used_bytes,
                "capacity_bytes": self.pool.capacity, "evictions": self._evictions}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        entries, self._entries = self._entries, OrderedDict()
        for buf in entries.values():
            buf.release()
        self.pool.close()


    def _reserve(self, nbytes: int) -> HostBuffer:
        if nbytes > self.pool.capacity:
            raise CapacityError(f"cpu tier: a {nbytes}-byte item exceeds max_bytes={self.pool.capacity}")
        while True:
            buf = self.pool.try_allocate(nbytes)
            if buf is not None:
                return buf
            if not self._entries:
                raise CapacityError(
                    f"cpu tier: no room for {nbytes} bytes: the slab is held by outstanding readers; "
                    "release views or raise max_bytes"
                )
            self._evict_one()

    def _evict_one(self) -> None:
        key, buf = self._entries.popitem(last=False)
        self._evictions += 1
        if self._listeners:
            view = buf.lease_view()
            for listener in self._listeners:
                listener(key, view)
        buf.release()


#: From this size on, values are copied with torch, which splits a large copy over several threads
#: (1.3x a memcpy on 2 cores, 4.9x on 16); below it torch's fixed cost (~3 us) is not worth it.
_TORCH_COPY_MIN = 256 << 10


def _torch_source(value: object, view: memoryview) -> Any:
    """``value`` as a uint8 tensor over the same memory, when a torch copy pays off; else None."""
    tensor = host_tensor_of(value)  # a HostBuffer of another pool, or a lease view
    if tensor is not None:
        return tensor if tensor.numel() == view.nbytes else None
    if view.nbytes < _TORCH_COPY_MIN or view.readonly:  # torch warns on read-only buffers
        return None
    import torch

    return torch.frombuffer(view, dtype=torch.uint8)
