"""Splits a store's batch calls into pieces of at most ``batch_descriptors`` items.

Each piece is one round of NIXL requests: bounding it bounds the files held open (posix), the
descriptors registered and the requests in flight, whatever batch the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from lmtier.keys import ChunkKey
from lmtier.memory import HostBuffer, release_all
from lmtier_backends.nixl._xfer import CallerBuffer

__all__ = ["Batched"]

T = TypeVar("T")


class Batched:
    """The store interface of :class:`PosixStore` / :class:`ObjStore`, piece by piece."""

    def __init__(self, store: Any, size: int) -> None:
        self.store = store
        self.size = size

    def usable(self, keys: Sequence[ChunkKey]) -> list[bool | OSError]:
        return self._gather(keys, lambda lo, hi: self.store.usable(keys[lo:hi]))

    def read(self, keys: Sequence[ChunkKey]) -> list[HostBuffer | bytes | BaseException | None]:
        return self._gather(keys, lambda lo, hi: self.store.read(keys[lo:hi]))

    def read_into(self, keys: Sequence[ChunkKey], outs: Sequence[CallerBuffer]
                  ) -> list[HostBuffer | bytes | BaseException | None]:
        return self._gather(keys, lambda lo, hi: self.store.read_into(keys[lo:hi], outs[lo:hi]))

    def write(self, items: Sequence[tuple[ChunkKey, HostBuffer, CallerBuffer | None]]) -> None:
        for lo in range(0, len(items), self.size):
            self.store.write(items[lo:lo + self.size])

    def remove(self, keys: Sequence[ChunkKey]) -> None:
        for lo in range(0, len(keys), self.size):
            self.store.remove(keys[lo:lo + self.size])

    def close(self) -> None:
        self.store.close()

    def stats(self) -> dict[str, Any]:
        return self.store.stats()  # type: ignore[no-any-return]

    def _gather(self, keys: Sequence[ChunkKey], piece: Callable[[int, int], list[T]]) -> list[T]:
        out: list[T] = []
        try:
            for lo in range(0, len(keys), self.size):
                out.extend(piece(lo, min(lo + self.size, len(keys))))
        except BaseException:
            release_all(out, shared=True)  # a later piece failed: the buffers of earlier pieces go back
            raise
        return out
