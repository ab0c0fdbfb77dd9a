"""fetch / get_into / reserve: one host copy per hit at most, promotion by adoption, and no
half-written buffer ever served or reused when a tier misses its deadline mid-read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from lmtier.errors import InvalidArgumentError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier.memory import HostMemoryPool, host_tensor_of
from lmtier.registry import BackendRegistry, BackendSpec
from tests.unit.test_deadlines import STUCK, StuckDisk

HOT = {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}}


class NoGetInto:
    """A third-party-style tier without get_into (bytes in a dict)."""

    def __init__(self, config: Any) -> None:
        self.data: dict[ChunkKey, bytes] = {}

    @property
    def capabilities(self) -> Any:
        from lmtier.protocol import Capabilities

        return Capabilities()

    async def contains(self, keys: Any) -> list[bool]:
        return [k in self.data for k in keys]

    async def get(self, keys: Any) -> list[Any]:
        return [self.data.get(k) for k in keys]

    async def put(self, items: Any) -> None:
        for k, v in items:
            self.data[k] = bytes(memoryview(v))

    async def delete(self, keys: Any) -> None:
        for k in keys:
            self.data.pop(k, None)

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> NoGetInto:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def registry() -> BackendRegistry:
    reg = BackendRegistry.discover()
    reg.register(BackendSpec("stuck_disk", "tests.unit.test_deadlines:_stuck_disk", "lmtier_backends.disk.config:DiskConfig"))
    reg.register(BackendSpec("nogetinto", f"{__name__}:NoGetInto", "lmtier_backends.cpu.config:CpuConfig"))
    return reg


def keys(n: int, tag: str = "fetch") -> list[ChunkKey]:
    ns = make_namespace(test=tag)
    return [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(n)]


def value(k: ChunkKey, size: int = 4096) -> bytes:
    return (k.digest * (size // 16 + 1))[:size]


@pytest_asyncio.fixture
async def mgr(registry: BackendRegistry, tmp_path: Path) -> AsyncIterator[StorageManager]:
    cold = {"name": "cold", "backend": "stuck_disk", "options": {"root": str(tmp_path / "disk")},
            # long enough for a 4 KiB read on a loaded 2-core machine (0.05 s missed it at load ~10: a
            # flaky miss); the stuck tests wait it once each
            "timeout_s": {"get": 1.0}}
    m = await StorageManager.from_config({"chunk_tokens": 16, "host_pool_bytes": 1 << 20, "tiers": [HOT, cold]},
                                         registry=registry, metrics_registry=CollectorRegistry())
    yield m
    STUCK["disk"].free()
    await m.aclose()


def ptr(buf: Any) -> int:
    tensor = host_tensor_of(buf)
    assert tensor is not None
    return int(tensor.data_ptr())


@pytest.mark.asyncio
async def test_a_hot_hit_is_lent_as_the_tiers_own_memory(mgr: StorageManager) -> None:
    (k,) = keys(1)
    await mgr.put([(k, value(k))])
    (buf,) = await mgr.fetch([k], [4096])
    try:
        assert buf is not None and bytes(buf.view()) == value(k)
        (lease,) = await mgr.tier("hot").backend.get([k])
        assert ptr(buf) == ptr(lease)  # zero copies: the same memory
        del lease
    finally:
        assert buf is not None
        buf.release()


@pytest.mark.asyncio
async def test_a_cold_hit_is_written_once_into_hot_memory_which_the_hot_tier_adopts(mgr: StorageManager) -> None:
    ks = keys(3)
    await mgr.tier("cold").backend.inner.put([(k, value(k)) for k in ks])
    got = await mgr.fetch(ks, [4096] * 3)
    try:
        hot = mgr.tier("hot").backend
        assert [bytes(b.view()) for b in got if b is not None] == [value(k) for k in ks]
        assert all(b is not None and b.pool is hot.pool for b in got)  # read into the hot tier's memory
        leases = await hot.get(ks)  # promoted by adoption: the very same ranges, no second copy
        assert [ptr(v) for v in leases] == [ptr(b) for b in got]
        del leases
        assert mgr.metrics.registry.get_sample_value("lmtier_tier_promotions_total", {"tier": "hot"}) == 3
    finally:
        for b in got:
            if b is not None:
                b.release()


@pytest.mark.asyncio
async def test_a_value_of_another_size_is_a_miss_and_is_deleted(mgr: StorageManager) -> None:
    k, other = keys(2)
    await mgr.put([(k, b"short")])
    assert await mgr.fetch([k, other], [4096, 4096]) == [None, None]
    assert await mgr.contains([k]) == [False]


@pytest.mark.asyncio
async def test_get_into_fills_caller_buffers_from_every_tier_and_promotes(mgr: StorageManager) -> None:
    a, b, c = keys(3)
    await mgr.put([(a, value(a))])
    await mgr.tier("cold").backend.inner.put([(b, value(b))])
    outs = [bytearray(4096), np.zeros(4096, dtype=np.uint8), bytearray(4096)]
    assert await mgr.get_into([a, b, c], outs) == [True, True, False]
    assert bytes(outs[0]) == value(a) and outs[1].tobytes() == value(b)
    assert await mgr.tier("hot").backend.contains([b]) == [True]
    with pytest.raises(InvalidArgumentError):
        await mgr.get_into([a], [b"read-only"])


@pytest.mark.asyncio
async def test_reserve_carves_buffers_from_the_hot_tier_or_gives_none_when_full(mgr: StorageManager) -> None:
    bufs = mgr.reserve([4096, 2 << 20])
    try:
        assert bufs[0] is not None and bufs[0].pool is mgr.tier("hot").backend.pool
        assert bufs[1] is None  # larger than the hot tier and the host pool
    finally:
        for b in bufs:
            if b is not None:
                b.release()
    with pytest.raises(InvalidArgumentError, match="positive"):
        mgr.reserve([0])


@pytest.mark.asyncio
async def test_put_with_skip_present_writes_only_what_a_tier_lacks(mgr: StorageManager) -> None:
    ks = keys(3)
    await mgr.tier("cold").backend.inner.put([(ks[0], value(ks[0]))])
    stuck = STUCK["disk"]
    assert await mgr.put([(k, value(k)) for k in ks], skip_present=True) == 3
    assert await mgr.put([(k, value(k)) for k in ks], skip_present=True) == 0  # all present now
    written = mgr.metrics.registry.get_sample_value("lmtier_tier_written_objects_total", {"tier": "cold"})
    assert written == 2 and stuck.calls.count("put") == 1


@pytest.mark.asyncio
async def test_a_tier_without_get_into_is_read_with_one_copy(registry: BackendRegistry) -> None:
    cold = {"name": "cold", "backend": "nogetinto"}
    async with await StorageManager.from_config({"tiers": [HOT, cold]}, registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        (k,) = keys(1)
        await mgr.tier("cold").backend.put([(k, value(k))])
        (buf,) = await mgr.fetch([k], [4096])
        assert buf is not None and bytes(buf.view()) == value(k)
        buf.release()
        out = bytearray(4096)
        assert await mgr.get_into([k], [out]) == [True] and bytes(out) == value(k)


@pytest.mark.parametrize("how", ["fetch", "get_into"])
@pytest.mark.asyncio
async def test_a_tier_that_times_out_mid_get_into_leaves_no_half_written_buffer_visible_as_a_hit(
        mgr: StorageManager, how: str) -> None:
    """The stuck read has written half of its buffer and goes on: that buffer is neither served,
    nor adopted by the hot tier, nor handed out again until the read really ends."""
    (k,) = keys(1)
    stuck = STUCK["disk"]
    assert isinstance(stuck, StuckDisk)
    await stuck.inner.put([(k, value(k))])
    stuck.half_write = True
    pool = mgr.tier("hot").backend.pool if how == "fetch" else HostMemoryPool(1 << 20, pin=False, name="outs")
    try:
        before = pool.outstanding()
        if how == "fetch":
            assert await mgr.fetch([k], [4096]) == [None]
        else:
            out = pool.allocate(4096)
            assert await mgr.get_into([k], [out]) == [False]
            out.release()
        assert mgr.tier("cold").breaker.state == "open"
        assert await mgr.tier("hot").backend.contains([k]) == [False]  # never adopted as a hit
        assert pool.outstanding() == before + 1  # the half-written range is still lent to the stuck read
        scribbled = list(pool._live.values())  # the pool's bookkeeping: the ranges lent now
        fresh = pool.allocate(4096)
        assert all(fresh.offset != b.offset for b in scribbled)  # never handed out again meanwhile
        fresh.release()
        stuck.free()
        assert await mgr.settle(30)
        assert pool.outstanding() == before
        assert await mgr.tier("hot").backend.contains([k]) == [False]
    finally:
        if how == "get_into":
            pool.close()


@pytest.mark.asyncio
async def test_get_into_of_a_foreign_buffer_never_lends_it_to_a_late_tier(mgr: StorageManager) -> None:
    (k,) = keys(1)
    stuck = STUCK["disk"]
    assert isinstance(stuck, StuckDisk)
    await stuck.inner.put([(k, value(k))])
    stuck.half_write = True
    out = bytearray(b"\x00" * 4096)
    assert await mgr.get_into([k], [out]) == [False]
    stuck.free()
    assert await mgr.settle(30)  # the late read has ended: whatever it wrote went elsewhere
    assert bytes(out) == b"\x00" * 4096
