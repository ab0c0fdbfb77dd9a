"""StorageManager behaviour on real in-process tiers, with a fault-injecting wrapper for failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from lmtier.errors import BackendUnavailableError, CapacityError, ConfigError, InvalidArgumentError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier.registry import BackendRegistry, BackendSpec


def keys(n: int, tag: str = "m") -> list[ChunkKey]:
    ns = make_namespace(test=tag)
    return [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(n)]


class FaultyBackend:
    """Wraps a real backend; raises an injected error from chosen operations (fault injection only)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.fail_with: dict[str, Exception] = {}
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    @property
    def capabilities(self):
        return self.inner.capabilities

    async def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if self.gate is not None:
            await self.gate.wait()
        if op in self.fail_with:
            raise self.fail_with[op]

    async def contains(self, keys):
        await self._maybe_fail("contains")
        return await self.inner.contains(keys)

    async def get(self, keys):
        await self._maybe_fail("get")
        return await self.inner.get(keys)

    async def put(self, items):
        await self._maybe_fail("put")
        return await self.inner.put(items)

    async def delete(self, keys):
        await self._maybe_fail("delete")
        return await self.inner.delete(keys)

    async def aclose(self):
        await self.inner.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


FAULTY: dict[str, FaultyBackend] = {}


def _faulty_factory(config):
    from lmtier_backends.cpu.backend import CpuBackend

    backend = FaultyBackend(CpuBackend(config))
    FAULTY[config.label] = backend
    return backend


from lmtier_backends.cpu.config import CpuConfig  # noqa: E402


class FaultyConfig(CpuConfig):
    label: str = "faulty"


class BytesDictBackend:
    """A minimal third-party-style tier that relies on the protocol's promise of buffer-protocol
    values: it copies each one with ``memoryview`` (no lmtier helpers)."""

    def __init__(self, config) -> None:
        self.data: dict[ChunkKey, bytes] = {}

    @property
    def capabilities(self):
        from lmtier.protocol import Capabilities

        return Capabilities()

    async def contains(self, keys):
        return [k in self.data for k in keys]

    async def get(self, keys):
        return [self.data.get(k) for k in keys]

    async def put(self, items):
        for k, v in items:
            self.data[k] = bytes(memoryview(v))

    async def delete(self, keys):
        for k in keys:
            self.data.pop(k, None)

    async def aclose(self):
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


@pytest.fixture
def registry() -> BackendRegistry:
    reg = BackendRegistry.discover()
    reg.register(BackendSpec("faulty", f"{__name__}:_faulty_factory", f"{__name__}:FaultyConfig"))
    reg.register(BackendSpec("bytesdict", f"{__name__}:BytesDictBackend", "lmtier_backends.cpu.config:CpuConfig"))
    return reg


def cfg(*tiers: dict) -> dict:
    return {"chunk_tokens": 16, "tiers": list(tiers)}


HOT = {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}}


@pytest_asyncio.fixture
async def two_tiers(registry, tmp_path):
    clock = Clock()
    mgr = await StorageManager.from_config(
        cfg(HOT, {"name": "cold", "backend": "faulty", "options": {"max_bytes": "4MiB", "pinned": False},
                  "breaker": {"failures": 2, "cooldown_s": 5}}),
        registry=registry, metrics_registry=CollectorRegistry(), clock=clock)
    yield mgr, FAULTY["faulty"], clock
    await mgr.aclose()


def sample(mgr: StorageManager, name: str, labels: dict[str, str]) -> float:
    return mgr.metrics.registry.get_sample_value(name, labels) or 0.0


def residency(mgr: StorageManager) -> list[tuple[str, ChunkKey, bool]]:
    """What the manager's residency listener hears from now on: (tier, key, held), in order."""
    heard: list[tuple[str, ChunkKey, bool]] = []
    mgr.add_residency_listener(lambda tier, ks, held: heard.extend((tier, k, held) for k in ks))
    return heard


@pytest.mark.asyncio
async def test_put_lands_in_every_through_tier_and_get_returns_it(two_tiers) -> None:
    mgr, cold, _ = two_tiers
    heard = residency(mgr)
    ks = keys(3)
    await mgr.put([(k, bytes([i]) * 100) for i, k in enumerate(ks)])
    assert await mgr.tier("hot").backend.contains(ks) == [True] * 3
    assert await cold.inner.contains(ks) == [True] * 3
    # each tier's write that landed is heard, key by key (hot first: it is written first)
    assert heard == [("hot", k, True) for k in ks] + [("cold", k, True) for k in ks]
    got = await mgr.get(ks)
    assert [bytes(g) for g in got] == [bytes([i]) * 100 for i in range(3)]
    assert sample(mgr, "lmtier_tier_hits_total", {"tier": "hot"}) == 3


@pytest.mark.asyncio
async def test_lookup_counts_leading_chunks_present_in_any_tier(two_tiers) -> None:
    mgr, cold, _ = two_tiers
    ks = keys(5)
    await mgr.tier("hot").backend.put([(ks[0], b"a"), (ks[3], b"d")])
    await cold.inner.put([(ks[1], b"b"), (ks[2], b"c")])
    assert await mgr.lookup(ks) == 4  # 0 hot, 1-2 cold, 3 hot, 4 missing
    assert await mgr.lookup(ks[1:]) == 3
    assert await mgr.lookup([]) == 0
    assert await mgr.contains(ks) == [True, True, True, True, False]


@pytest.mark.asyncio
async def test_a_hit_in_a_colder_tier_is_promoted_into_the_hotter_tier(two_tiers) -> None:
    mgr, cold, _ = two_tiers
    heard = residency(mgr)
    (k,) = keys(1)
    await cold.inner.put([(k, b"cold value")])
    assert bytes((await mgr.get([k]))[0]) == b"cold value"
    await mgr.flush()
    assert await mgr.tier("hot").backend.contains([k]) == [True]
    assert heard == [("hot", k, True)]  # the promotion (the back-door put is not the manager's)
    assert sample(mgr, "lmtier_tier_promotions_total", {"tier": "hot"}) == 1


@pytest.mark.asyncio
async def test_lru_eviction_from_the_hot_tier_demotes_to_the_next_tier(registry) -> None:
    small = {"name": "hot", "backend": "cpu", "options": {"max_bytes": "4KiB", "pinned": False}}
    cold = {"name": "cold", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False},
            "write": "async", "queue_depth": 8}
    async with await StorageManager.from_config(cfg(small, cold), registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        ks = keys(8)
        for k in ks[:4]:  # 4 x 1 KiB fill the hot tier exactly
            await mgr.put([(k, k.digest * 64)])
            await mgr.flush()
        await mgr.tier("cold").backend.delete(ks[:2])  # as if two async copies had been dropped
        heard = residency(mgr)
        for k in ks[4:]:  # each put evicts the oldest hot entry
            await mgr.put([(k, k.digest * 64)])
            await mgr.flush()
        # per put: the hot tier drops the oldest (demoted to cold only where cold lacks it), takes
        # the new one, and the new one's background write lands in cold
        assert sorted(heard, key=lambda e: (ks.index(e[1]), e[0], e[2])) == [
            ("cold", ks[0], True), ("hot", ks[0], False), ("cold", ks[1], True), ("hot", ks[1], False),
            ("hot", ks[2], False), ("hot", ks[3], False),
            *((t, k, True) for k in ks[4:] for t in ("cold", "hot"))]
        assert await mgr.tier("hot").backend.contains(ks) == [False] * 4 + [True] * 4
        assert await mgr.tier("cold").backend.contains(ks) == [True] * 8
        assert sample(mgr, "lmtier_tier_demotions_total", {"tier": "cold"}) == 2  # only the missing ones
        assert sample(mgr, "lmtier_tier_evictions_total", {"tier": "hot"}) == 4
        assert [bytes(v) for v in await mgr.get(ks)] == [k.digest * 64 for k in ks]


@pytest.mark.asyncio
async def test_an_unavailable_tier_is_a_miss_then_its_circuit_opens_and_later_recovers(two_tiers, caplog) -> None:
    mgr, cold, clock = two_tiers
    ks = keys(2)
    await cold.inner.put([(ks[0], b"only in cold")])
    cold.fail_with = {op: BackendUnavailableError("connection refused") for op in ("get", "put", "contains")}
    with caplog.at_level(logging.WARNING, logger="lmtier"):
        assert await mgr.get([ks[0]]) == [None]
        await mgr.put([(ks[1], b"x")])  # hot write succeeds; cold write is skipped
    assert mgr.tier("cold").breaker.state == "open"
    assert "circuit opened" in caplog.text
    calls = len(cold.calls)
    assert await mgr.get([ks[0]]) == [None]
    assert len(cold.calls) == calls, "an open circuit must not call the tier"
    assert sample(mgr, "lmtier_tier_skipped_writes_total", {"tier": "cold", "reason": "unavailable"}) == 1
    assert sample(mgr, "lmtier_tier_circuit_open", {"tier": "cold"}) == 1

    cold.fail_with = {}
    clock.now += 5  # cooldown over: the next call is the probe
    assert bytes((await mgr.get([ks[0]]))[0]) == b"only in cold"
    assert mgr.tier("cold").breaker.state == "closed"
    assert sample(mgr, "lmtier_tier_circuit_open", {"tier": "cold"}) == 0


@pytest.mark.asyncio
async def test_a_failed_probe_reopens_the_circuit_with_a_longer_cooldown(two_tiers) -> None:
    mgr, cold, clock = two_tiers
    (k,) = keys(1)
    cold.fail_with = {"get": BackendUnavailableError("down")}
    for _ in range(2):
        await mgr.get([k])
    assert mgr.tier("cold").breaker.state == "open"
    clock.now += 5
    await mgr.get([k])
    assert mgr.tier("cold").breaker.state == "open"
    assert mgr.tier("cold").breaker.cooldown == 10
    clock.now += 5
    calls = len(cold.calls)
    await mgr.get([k])
    assert len(cold.calls) == calls


@pytest.mark.asyncio
async def test_a_full_tier_is_a_skipped_write_not_an_error(two_tiers) -> None:
    mgr, cold, _ = two_tiers
    cold.fail_with = {"put": CapacityError("maxmemory reached")}
    (k,) = keys(1)
    await mgr.put([(k, b"v")])
    assert sample(mgr, "lmtier_tier_skipped_writes_total", {"tier": "cold", "reason": "full"}) == 1
    assert mgr.tier("cold").breaker.state == "closed"
    assert bytes((await mgr.get([k]))[0]) == b"v"


@pytest.mark.asyncio
async def test_an_unexpected_exception_from_a_backend_is_contained(two_tiers) -> None:
    mgr, cold, _ = two_tiers
    cold.fail_with = {"get": RuntimeError("third-party bug")}
    (k,) = keys(1, "x")
    assert await mgr.get([k]) == [None]
    assert sample(mgr, "lmtier_tier_errors_total", {"tier": "cold", "op": "get", "kind": "unexpected"}) == 1


@pytest.mark.asyncio
async def test_a_slow_tier_times_out_into_a_miss(registry) -> None:
    slow = {"name": "cold", "backend": "faulty", "options": {"label": "slow", "pinned": False}, "timeout_s": 0.01}
    async with await StorageManager.from_config(cfg(HOT, slow), registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        FAULTY["slow"].gate = asyncio.Event()  # never set: the call hangs until the deadline
        (k,) = keys(1)
        assert await mgr.get([k]) == [None]
        assert sample(mgr, "lmtier_tier_errors_total", {"tier": "cold", "op": "get", "kind": "backendtimeout"}) == 1
        FAULTY["slow"].gate.set()


@pytest.mark.asyncio
async def test_async_writes_drop_instead_of_blocking_when_the_queue_is_full(registry) -> None:
    slow = {"name": "cold", "backend": "faulty", "options": {"label": "gated", "pinned": False},
            "write": "async", "queue_depth": 2}
    async with await StorageManager.from_config(cfg(HOT, slow), registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        gated = FAULTY["gated"]
        gated.gate = asyncio.Event()
        heard = residency(mgr)
        ks = keys(6)
        for k in ks:
            await mgr.put([(k, b"v")])  # returns although the cold tier is stuck
        dropped = sample(mgr, "lmtier_tier_skipped_writes_total", {"tier": "cold", "reason": "queue_full"})
        assert dropped >= 3
        assert [e for e in heard if e[0] == "cold"] == []  # nothing has landed there yet
        gated.gate.set()
        await mgr.flush()
        landed = [k for k, there in zip(ks, await gated.inner.contains(ks), strict=True) if there]
        assert len(landed) == 6 - dropped
        # a dropped write is never heard as held; a queued one once it landed
        assert sorted((e for e in heard if e[0] == "cold"), key=lambda e: ks.index(e[1])) == \
            [("cold", k, True) for k in landed]


@pytest.mark.asyncio
async def test_aclose_drains_queued_async_writes(registry) -> None:
    cold = {"name": "cold", "backend": "faulty", "options": {"label": "drain", "pinned": False}, "write": "async"}
    mgr = await StorageManager.from_config(cfg(HOT, cold), registry=registry, metrics_registry=CollectorRegistry())
    ks = keys(5)
    inner = FAULTY["drain"].inner
    for k in ks:
        await mgr.put([(k, b"v" * 10)])
    written: list[bool] = []
    real_aclose = inner.aclose

    async def check_then_close() -> None:
        written.extend(await inner.contains(ks))
        await real_aclose()

    inner.aclose = check_then_close
    await mgr.aclose()
    await mgr.aclose()  # idempotent
    assert written == [True] * 5


@pytest.mark.asyncio
async def test_async_writes_are_isolated_from_later_mutation_of_the_callers_buffer(registry) -> None:
    cold = {"name": "cold", "backend": "faulty", "options": {"label": "iso", "pinned": False}, "write": "async"}
    async with await StorageManager.from_config(cfg(HOT, cold), registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        FAULTY["iso"].gate = asyncio.Event()
        (k,) = keys(1)
        data = bytearray(b"original")
        await mgr.put([(k, data)])
        data[:] = b"MUTATED!"
        FAULTY["iso"].gate.set()
        await mgr.flush()
        assert bytes((await FAULTY["iso"].inner.get([k]))[0]) == b"original"


@pytest.mark.asyncio
async def test_bad_input_is_a_typed_error_and_nothing_is_written(two_tiers) -> None:
    mgr, _, _ = two_tiers
    ks = keys(2)
    with pytest.raises(InvalidArgumentError):
        await mgr.put([(ks[0], b"ok"), (ks[1], "not bytes")])
    assert await mgr.contains(ks) == [False, False]
    with pytest.raises(InvalidArgumentError):
        await mgr.get(["deadbeef"])
    with pytest.raises(InvalidArgumentError):
        await mgr.lookup("deadbeef")


@pytest.mark.parametrize("bad_batch", [
    pytest.param(lambda k: 42, id="not-a-sequence"),
    pytest.param(lambda k: "ab", id="a-string"),
    pytest.param(lambda k: [b"xy"], id="item-not-a-pair"),
    pytest.param(lambda k: [(k,)], id="item-of-one"),
    pytest.param(lambda k: [(k, b"v", b"w")], id="item-of-three"),
    pytest.param(lambda k: [(str(k), b"v")], id="key-as-string"),
    pytest.param(lambda k: [(k, b"new"), (k, None)], id="second-value-not-a-buffer"),
    pytest.param(lambda k: [(k, memoryview(bytes(8))[::2])], id="non-contiguous"),
])
@pytest.mark.asyncio
async def test_a_malformed_put_is_a_typed_error_and_loses_nothing_already_stored(two_tiers, bad_batch) -> None:
    mgr, cold, _ = two_tiers
    (k,) = keys(1, "malformed")
    await mgr.put([(k, b"stored before")])
    with pytest.raises(InvalidArgumentError) as info:
        await mgr.put(bad_batch(k))
    assert isinstance(info.value, TypeError)
    assert bytes((await mgr.tier("hot").backend.get([k]))[0]) == b"stored before"
    assert bytes((await cold.inner.get([k]))[0]) == b"stored before"
    assert cold.calls.count("put") == 1, "the bad batch reached a tier"


@pytest.mark.asyncio
async def test_host_buffers_reach_other_tiers_as_buffers_and_the_cpu_tier_adopts_its_own(registry) -> None:
    from lmtier.memory import HostMemoryPool, host_tensor_of

    tiers = cfg(HOT, {"name": "strict", "backend": "bytesdict"},
                {"name": "later", "backend": "bytesdict", "write": "async"})
    async with await StorageManager.from_config(tiers, registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        hot = mgr.tier("hot").backend
        own, foreign = keys(2, "hostbuf")
        mine = hot.allocate(1000)  # carved from the cpu tier's slab, as the engine stages chunks
        mine.tensor.fill_(7)
        pool = HostMemoryPool(4096, pin=False, name="elsewhere")
        other = pool.allocate(500)
        other.tensor.fill_(9)
        await mgr.put([(own, mine), (foreign, other)])
        await mgr.flush()
        (view,) = await hot.get([own])
        assert host_tensor_of(view).data_ptr() == mine.data_ptr, "the cpu tier copied its own buffer"
        mine.release()
        other.release()
        for name in ("strict", "later"):
            data = mgr.tier(name).backend.data
            assert data[own] == b"\x07" * 1000 and data[foreign] == b"\x09" * 500, name
            assert sample(mgr, "lmtier_tier_errors_total", {"tier": name, "op": "put", "kind": "unexpected"}) == 0
        assert bytes((await hot.get([foreign]))[0]) == b"\x09" * 500
        del view
        pool.close()


@pytest.mark.asyncio
async def test_cpu_torch_tensors_are_values_for_every_tier(registry) -> None:
    import torch

    tiers = cfg({"name": "hot", "backend": "cpu", "options": {"max_bytes": "4MiB", "pinned": False}},
                {"name": "strict", "backend": "bytesdict"},
                {"name": "later", "backend": "bytesdict", "write": "async"})
    async with await StorageManager.from_config(tiers, registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        small, big = keys(2, "tensors")
        values = {small: torch.arange(100, dtype=torch.bfloat16),  # 200 bytes: memcpy path
                  big: torch.randint(0, 255, (512 << 10,), dtype=torch.uint8)}  # torch copy path
        expected = {k: v.view(torch.uint8).numpy().tobytes() for k, v in values.items()}
        await mgr.put(list(values.items()))
        values[big].zero_()  # the tiers copied: later changes to the caller's tensor do not leak in
        await mgr.flush()
        for name in ("strict", "later"):
            assert mgr.tier(name).backend.data == expected, name
        assert {k: bytes(v) for k, v in zip(values, await mgr.tier("hot").backend.get(list(values)),
                                           strict=True)} == expected
        with pytest.raises(InvalidArgumentError, match="host memory"):
            await mgr.put([(small, torch.zeros(4, device="meta"))])


@pytest.mark.asyncio
async def test_an_unknown_backend_names_the_tier_and_the_known_backends(registry) -> None:
    with pytest.raises(ConfigError) as info:
        await StorageManager.from_config(cfg(HOT, {"name": "x", "backend": "nope"}), registry=registry)
    assert "tiers[1].backend" in str(info.value) and "cpu" in str(info.value) and "disk" in str(info.value)


@pytest.mark.asyncio
async def test_an_unwritable_disk_root_fails_at_open_and_closes_the_tiers_already_opened(registry, tmp_path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    first = {"name": "hot", "backend": "faulty", "options": {"label": "opened-first", "pinned": False}}
    disk = {"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path / "a-file" / "tier")}}
    with pytest.raises(ConfigError, match=r"root '.*a-file/tier' is not a writable directory.*set options\.root"):
        await StorageManager.from_config(cfg(first, disk), registry=registry, metrics_registry=CollectorRegistry())
    opened = FAULTY["opened-first"].inner
    assert opened._closed and opened.pool.closed


@pytest.mark.asyncio
async def test_a_bad_backend_option_names_its_path(registry) -> None:
    bad = {"name": "x", "backend": "cpu", "options": {"max_bytes": "lots"}}
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.options\.max_bytes"):
        await StorageManager.from_config(cfg(HOT, bad), registry=registry)


def test_manager_methods_reject_non_sequence_keys() -> None:
    async def run() -> None:
        async with StorageManager([(_tier_cfg(), _cpu())], metrics=None) as mgr:
            with pytest.raises(InvalidArgumentError):
                await mgr.contains(42)  # type: ignore[arg-type]

    asyncio.run(run())


def _tier_cfg():
    from lmtier.config import TierConfig

    return TierConfig(name="hot", backend="cpu")


def _cpu():
    from lmtier_backends.cpu.backend import CpuBackend

    return CpuBackend(CpuConfig(max_bytes=1 << 20, pinned=False))


async def _unused(_: Sequence[int]) -> None:  # keeps the Sequence import honest for type checkers
    return None


@pytest.mark.asyncio
async def test_every_tier_call_is_counted_in_prometheus_and_logged_in_greppable_lines(
    registry, tmp_path, caplog
) -> None:
    disk = {"name": "cold", "backend": "disk", "options": {"root": str(tmp_path / "disk")}}
    with caplog.at_level(logging.DEBUG, logger="lmtier"):
        async with await StorageManager.from_config(cfg(HOT, disk), registry=registry,
                                                    metrics_registry=CollectorRegistry()) as mgr:
            ks = keys(4, "metrics")
            await mgr.put([(k, bytes([i]) * 1000) for i, k in enumerate(ks[:3])])
            assert [v is not None for v in await mgr.get([ks[0], ks[1], ks[3]])] == [True, True, False]
            assert await mgr.lookup(ks) == 3

            def value(name: str, **labels: str) -> float:
                return sample(mgr, name, labels)

            for tier in ("hot", "cold"):
                assert value("lmtier_tier_written_bytes_total", tier=tier) == 3000
                assert value("lmtier_tier_written_objects_total", tier=tier) == 3
                assert value("lmtier_tier_latency_seconds_count", tier=tier, op="put") == 1
            assert value("lmtier_tier_hits_total", tier="hot") == 2
            assert value("lmtier_tier_misses_total", tier="hot") == 1
            assert value("lmtier_tier_misses_total", tier="cold") == 1  # only the key hot lacked is asked
            assert value("lmtier_tier_read_bytes_total", tier="hot") == 2000
            assert value("lmtier_tier_latency_seconds_count", tier="cold", op="get") == 1
            assert value("lmtier_lookup_chunks_total") == 4 and value("lmtier_lookup_hit_chunks_total") == 3
            # the backends' own stats, exported as gauges at scrape time
            assert value("lmtier_backend_objects", tier="hot") == 3
            assert value("lmtier_backend_objects", tier="cold") == 3
            assert value("lmtier_backend_bytes", tier="cold") == 3 * (1000 + 64)
            assert value("lmtier_tier_circuit_open", tier="cold") == 0
    lines = [r.getMessage() for r in caplog.records]
    assert "lmtier storage ready: hot(cpu) -> cold(disk)" in lines
    assert "get: hit 2 of 3 chunks" in lines and "lookup: hit 3 of 4 chunks" in lines
