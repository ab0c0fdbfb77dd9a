"""LocalStore: the KVStore seam over a StorageManager on its loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from lmtier.errors import InvalidArgumentError, LmtierError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier.store import KVStore, LocalStore, LookupResult


def config(tmp_path: Path) -> dict[str, Any]:
    return {"chunk_tokens": 16, "host_pool_bytes": 1 << 20, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}},
        {"name": "local", "backend": "disk", "options": {"root": str(tmp_path / "disk")}}]}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    with LocalStore.open(config(tmp_path), metrics_registry=CollectorRegistry()) as s:
        yield s


def keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="store")
    return [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(n)]


def test_a_local_store_is_a_kvstore(store: LocalStore) -> None:
    assert isinstance(store, KVStore)


def test_put_then_lookup_names_the_tier_of_each_leading_chunk(store: LocalStore, tmp_path: Path) -> None:
    ks = keys(3)
    assert store.put([(k, b"v" * 100) for k in ks[:2]]).result() == 2
    store.flush()
    assert store.lookup(ks).result() == LookupResult(2, ("hot", "hot"))
    assert store.contains(ks) == [True, True, False]
    with LocalStore.open(config(tmp_path), metrics_registry=CollectorRegistry()) as fresh:  # RAM is empty
        assert fresh.lookup(ks).result() == LookupResult(2, ("local", "local"))


def test_lookup_answers_where_each_tail_is_only_when_the_whole_prefix_is_stored(store: LocalStore) -> None:
    ks = keys(5)
    prefix, tails = ks[:2], ks[2:]
    assert store.put([(k, b"v" * 100) for k in [*prefix, tails[1]]]).result() == 3
    store.flush()
    assert store.lookup(prefix, tails=tails).result() == LookupResult(2, ("hot", "hot"), (None, "hot", None))
    assert store.lookup([ks[0], tails[0]], tails=tails).result() == LookupResult(1, ("hot",))  # a gap: no tails
    assert store.lookup([], tails=tails).result() == LookupResult(0, (), (None, "hot", None))  # the tails alone
    assert store.lookup(prefix).result() == LookupResult(2, ("hot", "hot"))


def test_put_copies_the_callers_buffer_before_it_returns(store: LocalStore) -> None:
    (k,) = keys(1)
    value = bytearray(b"a" * 4096)
    fut = store.put([(k, value)])
    value[:] = b"b" * 4096
    assert fut.result() == 1
    (chunk,) = store.fetch([k], [4096]).result()
    assert chunk is not None and bytes(chunk.view()) == b"a" * 4096
    chunk.release()


def test_reserve_skips_keys_the_hot_tier_holds_and_commit_takes_the_chunks_over(store: LocalStore) -> None:
    ks = keys(2)
    store.put([(ks[0], b"x" * 64)]).result()
    held, fresh = store.reserve([64, 64], keys=ks)
    assert held is None and fresh is not None and fresh.nbytes == 64
    fresh.view()[:] = b"y" * 64
    assert store.commit([(ks[1], fresh)]).result() == 1  # the store releases it: the caller must not
    out = np.zeros(64, dtype=np.uint8)
    assert store.fetch_into([ks[1]], [out]) == [True] and out.tobytes() == b"y" * 64
    with pytest.raises(InvalidArgumentError, match="reserve"):
        store.commit([(ks[0], bytearray(64))])  # type: ignore[list-item]


def test_reserve_asks_only_an_in_memory_hot_tier_whether_it_holds_a_chunk(tmp_path: Path) -> None:
    """A hot tier that does not lend memory (disk first) is never asked on the store path: every
    chunk gets a buffer, and the commit skips the ones stored already, behind the call."""
    cfg = {"chunk_tokens": 16, "host_pool_bytes": 1 << 20,
           "tiers": [{"name": "local", "backend": "disk", "options": {"root": str(tmp_path / "disk")}}]}
    with LocalStore.open(cfg, metrics_registry=CollectorRegistry()) as store:
        ks = keys(2)
        assert store.put([(ks[0], b"x" * 64)]).result() == 1
        store.flush()
        bufs = store.reserve([64, 64], keys=ks)
        assert all(b is not None for b in bufs)
        for b in bufs:
            assert b is not None
            b.view()[:] = b"y" * 64
        assert store.commit([(k, b) for k, b in zip(ks, bufs, strict=True) if b is not None]).result() == 1
        out = np.zeros(64, dtype=np.uint8)
        assert store.fetch_into([ks[0]], [out]) == [True] and out.tobytes() == b"x" * 64  # not overwritten


@pytest.mark.parametrize("when", ["before it starts", "right away", "after it completed"])
def test_a_cancelled_fetch_leaks_no_chunk(store: LocalStore, when: str) -> None:
    """Whenever the caller cancels, every chunk the fetch took is returned (the autouse leak check)."""
    ks = keys(4)
    store.put([(k, b"z" * 256) for k in ks]).result()
    gate = threading.Event()
    if when == "before it starts":  # the loop is busy: the fetch has not begun when it is cancelled
        store.loop.call_soon_threadsafe(gate.wait)
    fut = store.fetch(ks, [256] * 4)
    if when == "after it completed":
        concurrent.futures.wait([fut])
    cancelled = fut.cancel()
    gate.set()
    if when == "before it starts":
        assert cancelled
    if not cancelled:  # it had completed: the chunks are the caller's to return
        for chunk in fut.result():
            assert chunk is not None
            chunk.release()
    store.flush()  # the loop has run whatever the cancellation left to do


def test_bad_arguments_raise_and_faults_do_not(store: LocalStore) -> None:
    with pytest.raises(InvalidArgumentError):
        store.fetch(keys(1), [0])
    with pytest.raises(InvalidArgumentError):
        store.fetch(keys(2), [8])
    with pytest.raises(InvalidArgumentError):
        store.lookup(["not a key"])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError):
        store.lookup(keys(1), timeout_s=0)
    with pytest.raises(InvalidArgumentError):
        store.fetch_into(keys(1), [b"read-only"])
    with pytest.raises(InvalidArgumentError, match="empty"):
        store.put([(keys(1)[0], b"")])
    assert store.fetch(keys(1), [8]).result() == [None]


def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    s = LocalStore.open(config(tmp_path), metrics_registry=CollectorRegistry())
    s.close()
    s.close()
    with pytest.raises(LmtierError, match="closed"):
        s.lookup(keys(1))


def test_attach_wraps_a_running_manager_and_leaves_it_open(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        mgr = asyncio.run_coroutine_threadsafe(
            StorageManager.from_config(config(tmp_path), metrics_registry=CollectorRegistry()), loop).result()
        with LocalStore.attach(mgr, loop) as s:
            s.put([(keys(1)[0], b"kept")]).result()
        assert asyncio.run_coroutine_threadsafe(mgr.contains(keys(1)), loop).result() == [True]
        asyncio.run_coroutine_threadsafe(mgr.aclose(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_methods_called_on_the_loop_thread_are_refused(store: LocalStore) -> None:
    def on_loop() -> None:
        store.lookup(keys(1))

    fut: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        try:
            on_loop()
            fut.set_result(None)
        except LmtierError as exc:
            fut.set_exception(exc)

    store.loop.call_soon_threadsafe(run)
    with pytest.raises(LmtierError, match="another thread"):
        fut.result(30)


def test_clear_drops_the_namespaces_chunks_from_every_tier_and_keeps_the_others(store: LocalStore) -> None:
    mine = keys(3)
    other = ChunkKey(make_namespace(test="store-other"), b"o" * 16)
    assert store.put([(k, b"v" * 100) for k in [*mine, other]]).result() == 4
    assert store.clear([mine[0].namespace]) == {"hot": 3, "local": 3}, "queued disk writes flushed first"
    assert store.contains([*mine, other]) == [False, False, False, True]
    assert store.clear([mine[0].namespace]) == {"hot": 0, "local": 0}
    for bad in ("0123456789abcdef", ["XYZ"], [b"0123456789abcdef"]):
        with pytest.raises(InvalidArgumentError, match="namespace"):
            store.clear(bad)  # type: ignore[arg-type]
    assert store.contains([other]) == [True]


def test_residency_reports_what_each_tier_took_and_dropped(store: LocalStore) -> None:
    k0, k1, k2 = keys(3)
    assert store.take_residency() == ([], 0)  # starts recording
    size = 400 << 10  # the hot tier (1 MiB) holds two of these
    store.put([(k0, b"a" * size), (k1, b"b" * size)]).result()
    store.flush()
    events, dropped = store.take_residency()
    assert dropped == 0
    assert {(e.tier, e.key, e.held) for e in events} == {
        ("hot", k0, True), ("hot", k1, True), ("local", k0, True), ("local", k1, True)}  # disk: write-through
    store.put([(k2, b"c" * size)]).result()  # the hot tier evicts k0 (the disk tier has it already)
    store.flush()
    events, _ = store.take_residency()
    assert {(e.tier, e.key, e.held) for e in events} == {("hot", k2, True), ("local", k2, True), ("hot", k0, False)}
    assert store.lookup([k0]).result() == LookupResult(1, ("local",))
    store.delete([k1])
    events, _ = store.take_residency()
    assert {(e.tier, e.key, e.held) for e in events} == {("hot", k1, False), ("local", k1, False)}


def test_residency_beyond_the_backlog_is_dropped_and_counted(store: LocalStore,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import lmtier.store

    monkeypatch.setattr(lmtier.store, "RESIDENCY_BACKLOG", 3)
    ks = keys(4)
    store.take_residency()
    store.put([(k, b"v" * 64) for k in ks]).result()
    store.flush()
    events, dropped = store.take_residency()  # 8 changes (2 tiers x 4 keys): the newest 3 kept
    assert dropped == 5 and len(events) == 3
    assert store.take_residency() == ([], 0)


class StuckPuts:
    """A fault: a tier whose puts block until the test lets them go, and that cannot be stopped
    (no cancellation reaches a blocked client); it closes only once they are done."""

    def __init__(self, config: Any) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def capabilities(self) -> Any:
        from lmtier import Capabilities

        return Capabilities(shared=True)

    async def contains(self, keys: Any) -> list[bool]:
        return [False] * len(keys)

    async def get(self, keys: Any) -> list[Any]:
        return [None] * len(keys)

    async def put(self, items: Any) -> None:
        self.entered.set()
        done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def blocked() -> None:
            self.release.wait()
            loop.call_soon_threadsafe(done.set_result, None)

        thread = threading.Thread(target=blocked, daemon=True)
        self._threads.append(thread)
        thread.start()
        await asyncio.shield(done)  # a blocked client: cancelling the call does not stop it

    async def delete(self, keys: Any) -> None:
        return None

    async def aclose(self) -> None:
        for thread in self._threads:  # a client's close waits for its calls, as a WorkerPool does
            await asyncio.get_running_loop().run_in_executor(None, thread.join)

    async def __aenter__(self) -> StuckPuts:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def test_a_close_abandons_calls_it_cannot_stop_and_their_buffers_go_back_when_they_end(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from lmtier import BackendSpec
    from lmtier.registry import BackendRegistry

    registry = BackendRegistry.discover()
    registry.register(BackendSpec("stuck", f"{__name__}:StuckPuts", "lmtier_backends.cpu.config:CpuConfig"))
    cfg = {"chunk_tokens": 16, "host_pool_bytes": 1 << 20, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}},
        {"name": "stuck", "backend": "stuck", "write": "through", "timeout_s": 0.05}]}
    metrics = CollectorRegistry()
    store = LocalStore.open(cfg, registry=registry, metrics_registry=metrics)
    stuck = store.manager.tier("stuck").backend
    assert isinstance(stuck, StuckPuts)
    hot_pool = store.manager.tier("hot").backend.pool  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO, logger="lmtier")
    try:
        assert store.put([(keys(1)[0], b"v" * 4096)]).result() == 1  # the stuck tier's put is detached
        assert stuck.entered.is_set() and hot_pool.outstanding() >= 1  # its value is held for it
        store.close(0.2)
        assert not stuck.release.is_set()  # closed while the call is still running
        assert "tier call(s) still running at the close's deadline were abandoned (stuck)" in caplog.text
        assert metrics.get_sample_value("lmtier_tier_abandoned_calls_total", {"tier": "stuck"}) == 1
        assert not store.wait_closed(0.0)  # its loop thread waits for the call
    finally:
        stuck.release.set()
    assert store.wait_closed(30.0)
    assert hot_pool.outstanding() == 0
