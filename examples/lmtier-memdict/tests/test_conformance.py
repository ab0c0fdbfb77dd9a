"""memdict against lmtier's conformance suite, plus its own LRU behaviour."""

from __future__ import annotations

import pytest
from lmtier.errors import CapacityError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.testing import BackendConformance

from lmtier_memdict.backend import MemDictBackend
from lmtier_memdict.config import MemDictConfig


class TestMemDict(BackendConformance):
    big_item_bytes = 8 << 20  # in-process: the suite's 64 MiB default proves nothing more

    @pytest.fixture
    def backend_factory(self):
        # memdict is neither persistent nor shared, so each handle may start empty
        config = MemDictConfig(max_bytes="32MiB")
        return lambda: MemDictBackend(config)


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="memdict")
    return [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(n)]


@pytest.mark.asyncio
async def test_least_recently_used_values_are_evicted_beyond_max_bytes() -> None:
    async with MemDictBackend(MemDictConfig(max_bytes=300)) as backend:
        a, b, c, d = _keys(4)
        await backend.put([(a, b"a" * 100), (b, b"b" * 100), (c, b"c" * 100)])
        await backend.get([a])  # a becomes the most recently used
        await backend.put([(d, b"d" * 100)])
        assert await backend.contains([a, b, c, d]) == [True, False, True, True]
        assert backend.stats() == {"objects": 3, "bytes": 300, "evictions": 1}
        with pytest.raises(CapacityError):
            await backend.put([(a, b"x" * 301)])
