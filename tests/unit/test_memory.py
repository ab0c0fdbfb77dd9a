"""The host pool: reuse, coalescing, refcounts, lease views that outlive their owner."""

from __future__ import annotations

import gc

import pytest

from lmtier.errors import CapacityError, LmtierError
from lmtier.memory import HostMemoryPool, host_tensor_of, release_all


def test_buffers_are_carved_from_one_slab_and_reused_after_release() -> None:
    pool = HostMemoryPool(1 << 16, pin=False)
    a = pool.allocate(1000)
    b = pool.allocate(1000)
    assert a.data_ptr != b.data_ptr and pool.outstanding() == 2
    ptr = a.data_ptr
    a.release()
    c = pool.allocate(900)
    assert c.data_ptr == ptr, "a freed range is reused"
    b.release()
    c.release()
    assert pool.outstanding() == 0 and pool.used_bytes == 0


def test_freed_neighbours_coalesce_so_a_large_buffer_fits_again() -> None:
    pool = HostMemoryPool(4096, pin=False)
    parts = [pool.allocate(1024) for _ in range(4)]
    with pytest.raises(CapacityError):
        pool.allocate(1)
    for p in (parts[1], parts[3], parts[0], parts[2]):
        p.release()
    whole = pool.allocate(4096)
    whole.release()


def test_refcount_keeps_a_buffer_until_the_last_release() -> None:
    pool = HostMemoryPool(4096, pin=False)
    buf = pool.allocate(10)
    buf.retain()
    buf.release()
    assert pool.outstanding() == 1
    buf.release()
    assert pool.outstanding() == 0
    with pytest.raises(LmtierError):
        buf.release()
    with pytest.raises(LmtierError):
        _ = buf.tensor


def test_release_all_gives_back_each_borrowed_buffer_and_passes_over_everything_else() -> None:
    pool = HostMemoryPool(4096, pin=False)
    a, b = pool.allocate(10), pool.allocate(10)
    a.retain()  # listed twice below, each time with a reference of its own
    release_all([a, None, b"miss", a, OSError("a key's error"), b])
    assert pool.outstanding() == 0
    release_all(None)


def test_release_all_of_shared_results_releases_a_buffer_listed_twice_once() -> None:
    pool = HostMemoryPool(4096, pin=False)
    a = pool.allocate(10)
    a.retain()  # someone else's reference: must survive
    release_all([a, None, a], shared=True)  # a repeated key's reads share one buffer and one reference
    assert pool.outstanding() == 1
    a.release()
    assert pool.outstanding() == 0


def test_a_lease_view_holds_its_range_until_garbage_collected() -> None:
    pool = HostMemoryPool(4096, pin=False)
    buf = pool.allocate(100)
    buf.tensor.fill_(5)
    view = buf.lease_view()
    buf.release()
    assert pool.outstanding() == 1 and view.readonly and bytes(view[:2]) == b"\x05\x05"
    assert host_tensor_of(view) is not None
    sub = view[10:20]
    del view
    gc.collect()
    assert pool.outstanding() == 1, "a slice of the view still holds the range"
    del sub
    gc.collect()
    assert pool.outstanding() == 0


def test_pinning_without_cuda_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning works")
    with pytest.raises(LmtierError, match="pin"):
        HostMemoryPool(4096, pin=True)
    assert HostMemoryPool(4096).pinned is False


def test_view_writes_into_the_slab_and_is_refused_after_the_last_release() -> None:
    pool = HostMemoryPool(4096, pin=False)
    a, b = pool.allocate(10), pool.allocate(20)
    a.view()[:] = b"0123456789"
    b.view()[:] = b"x" * 20
    assert bytes(a.tensor.numpy()) == b"0123456789" and bytes(b.view()) == b"x" * 20
    assert a.data_ptr == a.tensor.data_ptr() and b.data_ptr == b.tensor.data_ptr()
    lease = a.lease_view()
    assert lease.readonly and bytes(lease) == b"0123456789"
    with pytest.raises(TypeError):
        lease[0] = 1  # type: ignore[index]
    del lease
    a.release()
    b.release()
    with pytest.raises(LmtierError, match="after its last release"):
        a.view()
    assert pool.outstanding() == 0


@pytest.mark.gpu
def test_with_cuda_the_pool_pins_by_default_and_lease_views_are_pinned_for_dma() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pool = HostMemoryPool(1 << 20)  # pin=None: pinned iff CUDA is available
    assert pool.pinned
    buf = pool.allocate(4096)
    buf.tensor.copy_(torch.arange(4096, dtype=torch.int64).to(torch.uint8))
    assert buf.tensor.is_pinned()
    view = buf.lease_view()
    buf.release()
    host = host_tensor_of(view)
    assert host is not None and host.is_pinned() and host.data_ptr() == buf.data_ptr
    on_gpu = host.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), host)
    del view, host
    gc.collect()
    assert pool.outstanding() == 0


def test_a_pool_can_carve_its_buffers_out_of_memory_the_caller_provides() -> None:
    import mmap

    import torch

    from lmtier.errors import InvalidArgumentError

    region = mmap.mmap(-1, 1 << 16)
    memory = torch.frombuffer(region, dtype=torch.uint8)
    pool = HostMemoryPool(1 << 16, memory=memory, name="provided")
    buf = pool.allocate(100)
    buf.tensor.fill_(7)
    assert region[buf.offset: buf.offset + 100] == b"\x07" * 100, "the buffer is a view of the caller's memory"
    assert not pool.pinned
    buf.release()
    assert pool.outstanding() == 0
    with pytest.raises(InvalidArgumentError, match="needs"):
        HostMemoryPool(1 << 17, memory=memory)
    with pytest.raises(InvalidArgumentError, match="pin"):
        HostMemoryPool(1 << 16, memory=memory, pin=False)
    del pool, buf, memory
    gc.collect()
    region.close()


def test_a_lease_collected_while_the_same_thread_allocates_does_not_deadlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cycle collector can run inside ``allocate`` (creating the buffer object is an
    allocation) and finalize a lease caught in a reference cycle (an exception's traceback
    holding a view), whose release takes the pool's lock: the same thread, already holding it.
    Seen as a hung nixl get_into. The pool's lock is reentrant."""
    import threading

    from lmtier import memory

    pool = HostMemoryPool(1 << 16, pin=False)
    try:
        leased = pool.allocate(4096)
        cycle: list[object] = [leased.lease_view()]
        cycle.append(cycle)  # only the cycle collector frees it
        leased.release()
        del cycle
        real_init = memory.HostBuffer.__init__

        def init_with_a_collection(self: memory.HostBuffer, *args: object) -> None:
            gc.collect()  # what an allocation may trigger at any time
            real_init(self, *args)

        monkeypatch.setattr(memory.HostBuffer, "__init__", init_with_a_collection)
        done: list[memory.HostBuffer] = []
        worker = threading.Thread(target=lambda: done.append(pool.allocate(4096)), daemon=True)
        worker.start()
        worker.join(10)
        assert done, "allocate deadlocked on its own lock while a lease was collected"
        done[0].release()
        assert pool.outstanding() == 0
    finally:
        pool.close()


def test_closing_a_pool_frees_its_slab_though_the_pool_object_lives_on() -> None:
    # the engine's objects reference each other in cycles: a closed cpu tier's pool was only
    # collected by the garbage collector, and on an H100 run three closed 18 GiB tiers (32 GiB
    # pinned each) starved the next pass. Closing must let go of the memory itself.
    pool = HostMemoryPool(1 << 20, pin=False, name="closing")
    buf = pool.allocate(1000)
    buf.view()[:3] = b"abc"
    keep = [pool]  # as a reference cycle would
    pool.close()
    assert not pool.released  # a buffer is out: its bytes stay valid
    assert bytes(buf.view()[:3]) == b"abc"
    buf.release()
    assert pool.released and keep[0]._slab.numel() == 0
    with pytest.raises(LmtierError, match="closed"):
        pool.allocate(10)
    idle = HostMemoryPool(1 << 20, pin=False)
    idle.close()
    assert idle.released


def test_a_closed_store_frees_its_cpu_tier_before_any_garbage_collection(tmp_path: object) -> None:
    from prometheus_client import CollectorRegistry

    from lmtier.memory import live_pools
    from lmtier.store import LocalStore

    cfg = {"chunk_tokens": 16, "host_pool_bytes": 1 << 20, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "2MiB", "pinned": False}}]}
    gc.disable()  # what a pass of the GPU benchmark met: close, and no collection for a while
    try:
        before = set(live_pools())
        store = LocalStore.open(cfg, metrics_registry=CollectorRegistry())
        store.close()
        del store
        mine = [p for p in live_pools() if p not in before]
        assert mine and all(p.released for p in mine), mine
    finally:
        gc.enable()


@pytest.mark.gpu
def test_with_cuda_a_closed_pool_gives_its_pinned_memory_back() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        pytest.skip("this torch has no host_memory_stats")
    from lmtier.memory import empty_pinned_cache

    key = "allocated_bytes.current"  # pinned bytes torch owns, in use or cached
    if key not in stats():
        pytest.skip(f"this torch's host_memory_stats has no {key!r}")
    torch.cuda.synchronize()
    assert empty_pinned_cache()  # a free cached block would serve the slab without growing the count
    before = stats()[key]
    pool = HostMemoryPool(96 << 20)  # rounds up to 128 MiB in torch's pinned allocator
    assert pool.pinned and stats()[key] >= before + (96 << 20)
    pool.close()
    assert pool.released
    assert stats()[key] <= before  # not kept in torch's cache


def test_emptying_the_pinned_cache_without_cuda_is_a_no_op() -> None:
    import torch

    from lmtier.memory import empty_pinned_cache

    if torch.cuda.is_available():
        pytest.skip("with CUDA it empties torch's cache (checked on the GPU run)")
    assert empty_pinned_cache() is False
