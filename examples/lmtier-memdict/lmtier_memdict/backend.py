"""The ``memdict`` tier: each value copied into an immutable ``bytes`` in a dict, byte-bounded LRU.

Why ``bytes``: ``put`` must not keep the caller's buffer (the caller may reuse it), and a value
returned by ``get`` must not change when the key is overwritten later. An immutable copy gives
both for free, and makes every put atomic: the dict slot switches from the old object to the new.

Arguments arrive checked by lmtier's manager; the :mod:`lmtier.kit` helpers used here
(``put_items``, ``into_views``) turn values into byte views and refuse what is not a host buffer
or is too big with the same typed errors, for callers that use the backend directly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from lmtier.buffers import as_bytes_view
from lmtier.errors import BackendUnavailableError
from lmtier.keys import ChunkKey
from lmtier.kit import into_views, put_items
from lmtier.protocol import Buffer, Capabilities

if TYPE_CHECKING:
    from types import TracebackType

    from lmtier_memdict.config import MemDictConfig

__all__ = ["MemDictBackend"]


class MemDictBackend:
    """In-process, byte-bounded LRU store. Not persistent, not shared between processes."""

    def __init__(self, config: MemDictConfig) -> None:
        self.max_bytes = int(config.max_bytes)
        self._data: OrderedDict[ChunkKey, bytes] = OrderedDict()  # least recently used first
        self._used = 0
        self._evictions = 0
        self._closed = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=False, shared=False, evicts=True, max_item_bytes=self.max_bytes)

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._check_open()
        return [k in self._data for k in keys]

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        self._check_open()
        out: list[Buffer | None] = []
        for k in keys:
            value = self._data.get(k)
            if value is not None:
                self._data.move_to_end(k)
            out.append(value)
        return out

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        """Optional zero-copy protocol (SupportsGetInto): fill caller buffers of the exact size."""
        self._check_open()
        filled = []
        for k, view in zip(keys, into_views(keys, outs), strict=True):  # writable byte views
            value = self._data.get(k)
            if value is None or len(value) != view.nbytes:
                filled.append(False)
                continue
            self._data.move_to_end(k)
            view[:] = value
            filled.append(True)
        return filled

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        self._check_open()
        # every value checked (a host buffer, at most max_bytes) before anything is written
        checked = put_items(items, tier="memdict (max_bytes)", max_item_bytes=self.max_bytes)
        frozen = [(item.key, self._freeze(item.view)) for item in checked]
        for key, value in frozen:
            old = self._data.pop(key, None)
            self._used -= 0 if old is None else len(old)
            while self._data and self._used + len(value) > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._used -= len(evicted)
                self._evictions += 1
            self._data[key] = value
            self._used += len(value)

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check_open()
        for k in keys:
            old = self._data.pop(k, None)
            self._used -= 0 if old is None else len(old)

    async def clear(self, namespaces: Collection[str] | None = None) -> int:
        """Optional protocol (SupportsClear): drop every value, or those of ``namespaces``."""
        self._check_open()
        doomed = [k for k in self._data if namespaces is None or k.namespace in namespaces]
        await self.delete(doomed)
        return len(doomed)

    def stats(self) -> dict[str, Any]:
        """Optional protocol (SupportsStats): exported as lmtier_backend_<name>{tier=...} gauges."""
        return {"objects": len(self._data), "bytes": self._used, "evictions": self._evictions}

    async def aclose(self) -> None:
        self._closed = True
        self._data.clear()
        self._used = 0

    async def __aenter__(self) -> MemDictBackend:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- machinery -------------------------------------------------------------------------------
    @staticmethod
    def _freeze(value: object) -> bytes:
        """An immutable copy of any C-contiguous buffer."""
        return bytes(as_bytes_view(value))

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailableError("memdict tier is closed")
