"""The cpu tier against the conformance suite, plus its own LRU and zero-copy behaviour."""

from __future__ import annotations

import gc

import pytest

from lmtier.keys import ChunkKey, make_namespace
from lmtier.memory import host_tensor_of
from lmtier.testing import BackendConformance
from lmtier_backends.cpu.backend import CpuBackend
from lmtier_backends.cpu.config import CpuConfig


class TestCpuBackend(BackendConformance):
    @pytest.fixture
    def backend_factory(self):
        return lambda: CpuBackend(CpuConfig(max_bytes=96 << 20, pinned=False))


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="cpu")
    return [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(n)]


@pytest.mark.asyncio
async def test_lru_eviction_keeps_the_tier_within_max_bytes_and_reports_evicted_entries() -> None:
    evicted: list[tuple[ChunkKey, bytes]] = []
    backend = CpuBackend(CpuConfig(max_bytes=4096, pinned=False))
    backend.add_eviction_listener(lambda k, v: evicted.append((k, bytes(v))))
    keys = _keys(5)
    await backend.put([(keys[0], b"a" * 1024), (keys[1], b"b" * 1024), (keys[2], b"c" * 1024)])
    await backend.get([keys[0]])  # key 0 becomes most recently used
    await backend.put([(keys[3], b"d" * 1024), (keys[4], b"e" * 1024)])
    assert [k for k, _ in evicted] == [keys[1]]
    assert evicted[0][1] == b"b" * 1024
    assert await backend.contains(keys) == [True, False, True, True, True]
    assert backend.stats()["bytes"] <= 4096
    await backend.aclose()


@pytest.mark.asyncio
async def test_gets_are_zero_copy_views_of_the_slab_that_pin_their_range() -> None:
    backend = CpuBackend(CpuConfig(max_bytes=1 << 20, pinned=False))
    (key,) = _keys(1)
    await backend.put([(key, b"z" * 1000)])
    (view,) = await backend.get([key])
    tensor = host_tensor_of(view)
    assert tensor is not None and tensor.numel() == 1000
    await backend.delete([key])
    assert backend.pool.outstanding() == 1  # the reader's view still holds the range
    del view, tensor
    gc.collect()
    assert backend.pool.outstanding() == 0
    await backend.aclose()


@pytest.mark.asyncio
async def test_put_of_a_buffer_carved_from_the_tier_adopts_it_without_copying() -> None:
    backend = CpuBackend(CpuConfig(max_bytes=1 << 20, pinned=False))
    (key,) = _keys(1)
    buf = backend.allocate(512)
    buf.tensor.fill_(9)
    await backend.put([(key, buf)])
    buf.release()
    (view,) = await backend.get([key])
    assert host_tensor_of(view).data_ptr() == backend.pool._slab.data_ptr() + buf.offset
    del view
    await backend.aclose()


@pytest.mark.gpu
@pytest.mark.asyncio
async def test_with_cuda_the_tier_slab_is_pinned_and_gets_copy_to_the_gpu_without_staging() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    backend = CpuBackend(CpuConfig(max_bytes=1 << 20))  # pinned: default None means "iff CUDA"
    assert backend.pool.pinned
    (key,) = _keys(1)
    data = bytes(range(256)) * 16
    await backend.put([(key, data)])
    (view,) = await backend.get([key])
    host = host_tensor_of(view)
    assert host is not None and host.is_pinned()
    on_gpu = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert bytes(on_gpu.cpu().numpy()) == data
    del view, host
    await backend.aclose()


@pytest.mark.asyncio
async def test_the_tier_can_live_in_a_pool_it_is_given_and_clear_drops_every_entry() -> None:
    from lmtier.memory import HostMemoryPool

    pool = HostMemoryPool(1 << 16, pin=False, name="given")
    evicted: list[ChunkKey] = []
    backend = CpuBackend(CpuConfig(max_bytes=1 << 16, pinned=False), pool=pool)
    backend.add_eviction_listener(lambda k, v: evicted.append(k))
    keys = _keys(3)
    await backend.put([(k, b"x" * 100) for k in keys])
    (view,) = await backend.get([keys[0]])
    assert host_tensor_of(view).data_ptr() >= pool._slab.data_ptr()
    assert await backend.clear() == 3
    assert await backend.contains(keys) == [False, False, False] and not evicted
    assert pool.outstanding() == 1, "a range still read stays until its reader lets go"
    del view
    gc.collect()
    assert pool.outstanding() == 0
    await backend.aclose()
