"""Deadlines: the manager answers when a tier's deadline passes, whatever the backend does.

The stuck tiers here are fault injectors around real tiers: one that never answers on the event
loop, one whose worker thread blocks where cancellation cannot reach it (a client library in a
connect handshake), and one that writes half of a get_into buffer and then blocks. Nothing here
asserts a duration: the tests assert what the caller got (a miss), what was counted and that the
breaker opened, and that buffers a stuck call may still touch stay out of use until it ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lmtier.config import load_config
from lmtier.errors import ConfigError, InvalidArgumentError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import MAX_DETACHED, StorageManager, _slices
from lmtier.registry import BackendRegistry, BackendSpec
from lmtier_backends.cpu.backend import CpuBackend
from lmtier_backends.disk.backend import DiskBackend

STUCK: dict[str, Stuck] = {}


class Stuck:
    """Wraps a real tier; ``hold(op, how)`` makes ``op`` hang until :meth:`free` (fault injection)."""

    def __init__(self, inner: Any, label: str) -> None:
        self.inner = inner
        self.hang: dict[str, str] = {}  # op -> "loop" (awaits an event) | "thread" (blocks a thread)
        self.loop_gate = asyncio.Event()
        self.thread_gate = threading.Event()
        self.entered = asyncio.Event()
        self.calls: list[str] = []
        STUCK[label] = self

    def hold(self, op: str, how: str) -> None:
        self.hang[op] = how
        self.loop_gate.clear()
        self.thread_gate.clear()

    def free(self) -> None:
        self.hang = {}
        self.loop_gate.set()
        self.thread_gate.set()

    async def _maybe_hang(self, op: str) -> None:
        self.calls.append(op)
        how = self.hang.get(op)
        if how is None:
            return
        self.entered.set()
        if how == "loop":
            await self.loop_gate.wait()
        else:  # a worker thread stuck where cancellation does not reach (shielded, like to_thread)
            await asyncio.shield(asyncio.to_thread(self.thread_gate.wait))

    @property
    def capabilities(self) -> Any:
        return self.inner.capabilities

    async def contains(self, keys: Any) -> Any:
        await self._maybe_hang("contains")
        return await self.inner.contains(keys)

    async def get(self, keys: Any) -> Any:
        await self._maybe_hang("get")
        return await self.inner.get(keys)

    async def put(self, items: Any) -> Any:
        await self._maybe_hang("put")
        return await self.inner.put(items)

    async def delete(self, keys: Any) -> Any:
        await self._maybe_hang("delete")
        return await self.inner.delete(keys)

    async def aclose(self) -> None:
        self.free()
        await self.inner.aclose()

    async def __aenter__(self) -> Stuck:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class StuckDisk(Stuck):
    """A disk tier whose get_into can write the first half of each buffer, then block a thread."""

    half_write = False

    async def get_into(self, keys: Any, outs: Any) -> Any:
        self.calls.append("get_into")
        if self.half_write:
            self.entered.set()

            def scribble_then_block() -> None:
                for out in outs:
                    view = memoryview(out.view() if hasattr(out, "view") else out).cast("B")
                    view[: len(view) // 2] = b"\xee" * (len(view) // 2)
                self.thread_gate.wait()

            await asyncio.shield(asyncio.to_thread(scribble_then_block))
        return await self.inner.get_into(keys, outs)


def _stuck_cpu(config: Any) -> Stuck:
    return Stuck(CpuBackend(config), "cpu")


def _stuck_disk(config: Any) -> StuckDisk:
    return StuckDisk(DiskBackend(config), "disk")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> BackendRegistry:
    reg = BackendRegistry.discover()
    reg.register(BackendSpec("stuck_cpu", f"{__name__}:_stuck_cpu", "lmtier_backends.cpu.config:CpuConfig"))
    reg.register(BackendSpec("stuck_disk", f"{__name__}:_stuck_disk", "lmtier_backends.disk.config:DiskConfig"))
    return reg


HOT = {"name": "hot", "backend": "cpu", "options": {"max_bytes": "4MiB", "pinned": False}}
FAST = {"lookup": 0.05, "get": 0.05, "put": 0.05, "delete": 0.05}


async def _manager(registry: BackendRegistry, cold: dict[str, Any], metrics: CollectorRegistry,
                   clock: Clock | None = None) -> StorageManager:
    cfg = {"chunk_tokens": 16, "tiers": [HOT, {"name": "cold", "timeout_s": FAST, **cold}]}
    return await StorageManager.from_config(cfg, registry=registry, metrics_registry=metrics,
                                            clock=clock or Clock())


def keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="deadlines")
    return [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(n)]


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("how", ["loop", "thread"])
@pytest.mark.parametrize("op", ["contains", "get"])
@pytest.mark.asyncio
async def test_a_tier_that_never_answers_is_a_miss_at_its_deadline_and_opens_the_circuit_at_once(
        registry: BackendRegistry, how: str, op: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmtier")
    metrics = CollectorRegistry()
    mgr = await _manager(registry, {"backend": "stuck_cpu", "options": {"pinned": False}}, metrics)
    try:
        stuck = STUCK["cpu"]
        ks = keys(2)
        await stuck.inner.put([(ks[0], b"cold")])
        stuck.hold(op, how)
        if op == "contains":
            assert await mgr.lookup(ks) == 0
        else:
            assert await mgr.get(ks) == [None, None]
        tier = mgr.tier("cold")
        assert tier.breaker.state == "open"  # the first missed deadline, not the third
        assert value(metrics, "lmtier_tier_deadline_misses_total", tier="cold", op=op) == 1
        assert value(metrics, "lmtier_tier_circuit_open", tier="cold") == 1
        assert "did not answer within" in caplog.text and "circuit opened after a missed deadline" in caplog.text
        calls = len(stuck.calls)
        assert await mgr.get(ks) == [None, None]  # open: skipped without a call
        assert len(stuck.calls) == calls
        stuck.free()
        assert await mgr.settle(30)
        assert value(metrics, "lmtier_tier_detached_calls", tier="cold") == 0
        assert "detached at its deadline ended" in caplog.text
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
async def test_the_probe_after_the_cooldown_closes_the_circuit_once_the_tier_answers(registry: BackendRegistry) -> None:
    metrics, clock = CollectorRegistry(), Clock()
    mgr = await _manager(registry, {"backend": "stuck_cpu", "options": {"pinned": False},
                                    "breaker": {"cooldown_s": 5}}, metrics, clock)
    try:
        stuck = STUCK["cpu"]
        (k,) = keys(1)
        await stuck.inner.put([(k, b"cold")])
        stuck.hold("get", "thread")
        assert await mgr.get([k]) == [None]
        clock.now += 5  # the probe goes out and misses its deadline too: open again, longer
        assert await mgr.get([k]) == [None]
        tier = mgr.tier("cold")
        assert tier.breaker.state == "open" and tier.breaker.cooldown == 10
        assert value(metrics, "lmtier_tier_deadline_misses_total", tier="cold", op="get") == 2
        stuck.free()
        clock.now += 10
        assert bytes((await mgr.get([k]))[0]) == b"cold"
        assert tier.breaker.state == "closed"
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_callers_shorter_budget_is_a_miss_without_blaming_the_tier(registry: BackendRegistry) -> None:
    metrics = CollectorRegistry()
    cold = {"backend": "stuck_cpu", "options": {"pinned": False}}
    cfg = {"chunk_tokens": 16, "tiers": [HOT, {"name": "cold", "timeout_s": 30, **cold}]}
    mgr = await StorageManager.from_config(cfg, registry=registry, metrics_registry=metrics)
    try:
        STUCK["cpu"].hold("contains", "loop")
        assert await mgr.lookup(keys(3), timeout_s=0.05) == 0
        assert mgr.tier("cold").breaker.state == "closed"
        assert value(metrics, "lmtier_tier_deadline_misses_total", tier="cold", op="contains") == 1
        with pytest.raises(InvalidArgumentError, match="timeout_s"):
            await mgr.get(keys(1), timeout_s=0)
    finally:
        STUCK["cpu"].free()
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_put_past_its_deadline_keeps_its_host_buffers_until_it_really_ends(registry: BackendRegistry) -> None:
    from lmtier.memory import HostMemoryPool

    metrics = CollectorRegistry()
    mgr = await _manager(registry, {"backend": "stuck_cpu", "options": {"pinned": False}}, metrics)
    pool = HostMemoryPool(1 << 20, pin=False, name="test-values")
    try:
        stuck = STUCK["cpu"]
        stuck.hold("put", "thread")
        buf = pool.allocate(4096)
        buf.view()[:] = b"\x07" * 4096
        (k,) = keys(1)
        await mgr.put([(k, buf)])  # the hot tier takes it; the cold write is skipped at the deadline
        assert value(metrics, "lmtier_tier_skipped_writes_total", tier="cold", reason="deadline") == 1
        buf.release()
        assert buf.refcount == 1 and pool.outstanding() == 1  # the stuck put still reads it
        stuck.free()
        assert await mgr.settle(30)
        assert pool.outstanding() == 0
        assert await stuck.inner.get([k]) != [None]  # the late put landed whole
    finally:
        await mgr.aclose()
        pool.close()


@pytest.mark.asyncio
async def test_a_tier_with_too_many_stuck_calls_gets_no_more(registry: BackendRegistry) -> None:
    metrics, clock = CollectorRegistry(), Clock()
    mgr = await _manager(registry, {"backend": "stuck_cpu", "options": {"pinned": False}}, metrics, clock)
    try:
        stuck = STUCK["cpu"]
        stuck.hold("put", "loop")  # a put holds its values, so it is left running, not cancelled
        for i in range(MAX_DETACHED + 3):
            clock.now += 3600  # every call finds the cooldown over: it would be the probe
            await mgr.put([(keys(1)[0], bytes([i]) * 64)])
        assert len(mgr.tier("cold").detached) == MAX_DETACHED
        assert stuck.calls.count("put") == MAX_DETACHED
        assert value(metrics, "lmtier_tier_skipped_writes_total", tier="cold", reason="stuck") == 3
    finally:
        STUCK["cpu"].free()
        await mgr.aclose()


@pytest.mark.parametrize("read", ["lookup", "get", "fetch"])
@pytest.mark.asyncio
async def test_tiers_frozen_together_cost_a_read_one_deadline_not_one_each(
        registry: BackendRegistry, read: str, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A partition freezes Redis and S3 at once: the first frozen tier spends the caller's
    deadline, so the next one is not asked at all in that call (a miss, no verdict on it). The
    next call skips the first (its circuit is open) and gives the second its whole deadline."""
    metrics = CollectorRegistry()
    cfg = {"chunk_tokens": 16, "tiers": [
        HOT, {"name": "cold", "backend": "stuck_cpu", "options": {"pinned": False}, "timeout_s": FAST},
        {"name": "colder", "backend": "stuck_disk", "options": {"root": str(tmp_path / "d")}, "timeout_s": FAST}]}
    mgr = await StorageManager.from_config(cfg, registry=registry, metrics_registry=metrics, clock=Clock())
    cold, colder = STUCK["cpu"], STUCK["disk"]
    try:
        ks = keys(2)
        await colder.inner.put([(k, b"c" * 64) for k in ks])  # only the colder tier holds them
        op = {"lookup": "contains", "get": "get", "fetch": "get_into"}[read]
        cold.hold("get" if read == "fetch" else op, "thread")  # stuck_cpu has no get_into: read with get
        colder.hold(op, "thread")
        colder.half_write = read == "fetch"

        async def call() -> bool:  # True: a miss
            if read == "lookup":
                return await mgr.lookup(ks) == 0
            if read == "get":
                return await mgr.get(ks) == [None, None]
            got = await mgr.fetch(ks, [64, 64])
            return got == [None, None]

        caplog.set_level(logging.WARNING, logger="lmtier")
        assert await call()
        assert mgr.tier("cold").breaker.state == "open"
        assert mgr.tier("colder").breaker.state == "closed"  # not blamed for the silence before it
        assert op not in colder.calls  # and not even asked: nothing was left of the deadline
        assert value(metrics, "lmtier_tier_deadline_misses_total", tier="colder", op=op) == 0

        assert await call()  # the cold tier is skipped now; the colder one gets its own deadline
        assert op in colder.calls
        assert mgr.tier("colder").breaker.state == "open"
        assert value(metrics, "lmtier_tier_deadline_misses_total", tier="colder", op=op) == 1
    finally:
        cold.free()
        colder.free()
        assert await mgr.settle(30)
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_tier_asked_after_one_that_answered_gets_its_whole_deadline_and_the_blame(
        registry: BackendRegistry, tmp_path: Any) -> None:
    """Only silence is inherited: after the cold tier answers (a miss), a frozen colder tier is
    waited on for its own deadline and its circuit opens."""
    metrics = CollectorRegistry()
    cfg = {"chunk_tokens": 16, "tiers": [
        HOT, {"name": "cold", "backend": "stuck_cpu", "options": {"pinned": False}, "timeout_s": FAST},
        {"name": "colder", "backend": "stuck_disk", "options": {"root": str(tmp_path / "d")}, "timeout_s": FAST}]}
    mgr = await StorageManager.from_config(cfg, registry=registry, metrics_registry=metrics, clock=Clock())
    try:
        STUCK["disk"].hold("contains", "thread")
        assert await mgr.lookup(keys(2)) == 0
        assert mgr.tier("cold").breaker.state == "closed"
        assert mgr.tier("colder").breaker.state == "open"
        assert value(metrics, "lmtier_tier_deadline_misses_total", tier="colder", op="contains") == 1
    finally:
        STUCK["disk"].free()
        assert await mgr.settle(30)
        await mgr.aclose()


def test_large_batches_are_cut_into_slices_of_bounded_bytes() -> None:
    assert _slices([10, 10, 10, 10], 25) == [(0, 2), (2, 4)]
    assert _slices([30, 5, 5], 25) == [(0, 1), (1, 3)]  # an item larger than the limit goes alone
    assert _slices([], 25) == []


@pytest.mark.parametrize(
    ("timeout_s", "message"),
    [
        (0, r"tiers\[1\]\.timeout_s: .*finite number of seconds > 0"),
        (-0.5, r"tiers\[1\]\.timeout_s: .*> 0"),
        ("soon", r"tiers\[1\]\.timeout_s: .*number of seconds"),
        (True, r"tiers\[1\]\.timeout_s: .*number of seconds"),
        ({"get": 0}, r"tiers\[1\]\.timeout_s\.get: .*greater than 0"),
        ({"get": "fast"}, r"tiers\[1\]\.timeout_s\.get: .*valid number"),
        ({"get": True}, r"tiers\[1\]\.timeout_s\.get: .*not the boolean"),
        ({"lookup": float("inf")}, r"tiers\[1\]\.timeout_s\.lookup: .*finite"),
        ({"gets": 0.2}, r"tiers\[1\]\.timeout_s\.gets: unknown key; allowed keys: delete, get, lookup, open, put"),
        ([0.2], r"tiers\[1\]\.timeout_s: "),
    ],
)
def test_bad_deadlines_are_config_errors_naming_the_key_path(timeout_s: object, message: str) -> None:
    cfg = {"tiers": [{"name": "hot", "backend": "cpu"}, {"name": "r", "backend": "redis", "timeout_s": timeout_s}]}
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, env={})


def test_deadlines_default_below_a_second_and_take_one_number_or_some_kinds() -> None:
    def deadlines(timeout_s: object, env: dict[str, str] | None = None) -> Any:
        cfg = {"tiers": [{"name": "hot", "backend": "cpu"}, {"name": "r", "backend": "redis", "timeout_s": timeout_s}]}
        return load_config(cfg, env=env or {}).tiers[1].timeout_s

    d = deadlines(None)
    assert d.lookup < 1 and d.get < 1
    assert deadlines(0.3).model_dump() == {"lookup": 0.3, "get": 0.3, "put": 0.3, "delete": 0.3, "open": 0.3}
    assert deadlines({"get": 2}).get == 2 and deadlines({"get": 2}).lookup == d.lookup
    assert deadlines(None, {"LMTIER_TIERS__R__TIMEOUT_S__LOOKUP": "0.1"}).lookup == 0.1
