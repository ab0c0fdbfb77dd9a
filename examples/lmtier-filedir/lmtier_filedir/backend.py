"""The ``filedir`` tier: one file per chunk, header and checksum included, built on lmtier.kit.

What the kit does here: ``WorkerPool`` runs the blocking file calls (bounded, cancel-safe),
``FileLayout`` names the files exactly as lmtier's ``disk`` tier does, ``put_items`` checks a put
batch and makes each item's header (reusing a checksum another tier already computed),
``Rejections`` counts and logs what reads refuse, ``ErrorMap`` turns ``OSError`` into the lmtier
error tree with advice, and ``AsyncClosing`` gives ``async with``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtier.framing import decode
from lmtier.keys import ChunkKey
from lmtier.kit import (
    OS_ERROR_RULES,
    AsyncClosing,
    CancelToken,
    ErrorMap,
    FileLayout,
    Rejections,
    StoreItem,
    WorkerPool,
    put_items,
)
from lmtier.protocol import Buffer, Capabilities

if TYPE_CHECKING:
    from lmtier_filedir.plugin import FileDirConfig

__all__ = ["FileDirBackend"]


class FileDirBackend(AsyncClosing):
    """Persistent (files outlive the process), not shared (no locking between processes)."""

    def __init__(self, config: FileDirConfig) -> None:
        self.layout = FileLayout(config.root)
        self.workers = WorkerPool(config.threads, "filedir")
        self.rejects = Rejections(f"filedir tier {config.root}")
        self.errors = ErrorMap(f"filedir tier {config.root}", OS_ERROR_RULES)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=True, shared=False, evicts=False)

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [v is not None for v in await self.get(keys)]  # a small tier: read what get would serve

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        outcomes = await self.workers.run([lambda token, k=k: self._read(k) for k in keys])
        values: list[Buffer | None] = []
        for key, outcome in zip(keys, outcomes, strict=True):
            if outcome.ok:
                values.append(outcome.value)
                continue
            kind = self.rejects.note(key, outcome.error)  # corrupt, newer format, or a fault
            if kind is None:
                raise self.errors(outcome.error, op="get", where=self.layout.path_of(key))
            if kind == "corrupt":
                await self.delete([key])
            values.append(None)
        return values

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        batch = put_items(items, tier="filedir tier")  # every value checked before any is written
        self._raise_first("put", await self.workers.run([lambda token, it=it: self._write(token, it) for it in batch]))

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._raise_first("delete", await self.workers.run([lambda token, k=k: self._remove(k) for k in keys]))

    def stats(self) -> dict[str, Any]:
        return self.rejects.stats()

    async def aclose(self) -> None:
        await self.workers.aclose()  # waits for running calls; later calls raise BackendUnavailableError

    # -- blocking, on the pool's threads ---------------------------------------------------------
    def _read(self, key: ChunkKey) -> memoryview | None:
        try:
            data = Path(self.layout.path_of(key)).read_bytes()
        except FileNotFoundError:
            return None
        return decode(key, data)  # raises CorruptDataError or NewerFormatError: get sorts them out

    def _write(self, token: CancelToken, item: StoreItem) -> None:
        final = self.layout.path_of(item.key)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        temp = FileLayout.temp_path(final)
        with token.touching_caller_memory(), open(temp, "wb") as f:  # reads the caller's buffer
            f.write(item.header())
            f.write(item.view)
        os.replace(temp, final)  # atomic: readers see the old file, the new one, or none

    def _remove(self, key: ChunkKey) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.path_of(key))

    def _raise_first(self, op: str, outcomes: Sequence[Any]) -> None:
        for outcome in outcomes:
            if not outcome.ok:
                raise self.errors(outcome.error, op=op)
