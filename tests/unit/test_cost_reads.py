"""The manager learns each tier's read cost from real reads; the throttling wrapper used to test it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier.protocol import optional_capabilities
from lmtier.registry import BackendRegistry
from lmtier_backends.cpu.backend import CpuBackend
from lmtier_backends.cpu.config import CpuConfig
from lmtier_backends.disk.backend import DiskBackend
from lmtier_backends.disk.config import DiskConfig
from tests.support import throttle
from tests.support.throttle import ThrottledBackend

CHUNK = 256 << 10
RATE = 4e6  # bytes/s: a 256 KiB chunk takes 65 ms


def keys(n: int, tag: str) -> list[ChunkKey]:
    ns = make_namespace(test=tag)
    return [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(n)]


@pytest.fixture
def registry() -> BackendRegistry:
    reg = BackendRegistry.discover()
    reg.register_plugin(throttle, name="throttle-test")
    return reg


@pytest.mark.asyncio
async def test_the_throttle_claims_exactly_what_it_wraps(tmp_path: Path) -> None:
    cpu = CpuBackend(CpuConfig(max_bytes=1 << 20, pinned=False))
    disk = DiskBackend(DiskConfig(root=tmp_path))
    try:
        for inner in (cpu, disk):
            wrapped = throttle.throttled(inner, bytes_per_s=RATE)
            assert optional_capabilities(wrapped) == optional_capabilities(inner)
        assert optional_capabilities(throttle.throttled(cpu)) == ("stats", "allocate", "eviction_listener", "clear")
        assert "get_into" in optional_capabilities(throttle.throttled(disk))
    finally:
        await cpu.aclose()
        await disk.aclose()


@pytest_asyncio.fixture
async def slow_tier(registry: BackendRegistry, tmp_path: Path,
                    caplog: pytest.LogCaptureFixture) -> AsyncIterator[StorageManager]:
    config = {"chunk_tokens": 16, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "16MiB", "pinned": False}, "promote": False},
        {"name": "slow", "backend": "throttled", "timeout_s": {"get": 30},
         "options": {"inner": {"backend": "disk", "options": {"root": str(tmp_path)}}}}]}
    with caplog.at_level(logging.INFO, logger="lmtier"):
        mgr = await StorageManager.from_config(config, registry=registry, metrics_registry=CollectorRegistry())
    assert "lmtier tier slow (throttled): optional capabilities: get_into, stats, eviction_listener, codecs" in caplog.text
    async with mgr:
        yield mgr


def gauge(mgr: StorageManager, name: str, tier: str) -> float | None:
    return mgr.metrics.registry.get_sample_value(name, {"tier": tier})


@pytest.mark.asyncio
async def test_a_tier_read_estimate_is_learned_and_moves_when_its_speed_changes(slow_tier: StorageManager) -> None:
    mgr = slow_tier
    slow = mgr.tier("slow")
    knob = slow.backend.throttle  # type: ignore[attr-defined]
    ks = keys(10, "reads")
    await slow.backend.put([(k, bytes([i]) * CHUNK) for i, k in enumerate(ks)])
    assert mgr.read_costs() == {"hot": None, "slow": None}  # nothing read yet, no seed

    async def read(k: ChunkKey) -> None:
        (buf,) = await mgr.fetch([k], [CHUNK])
        assert buf is not None
        buf.release()

    knob.set(bytes_per_s=RATE)
    for k in ks[:2]:
        await read(k)
    throttled = mgr.read_costs()["slow"]
    assert throttled is not None and throttled.samples == 2
    # the throttle sleeps at least bytes / RATE: the estimate cannot be faster than that
    assert throttled.bytes_per_s <= RATE * 1.01
    assert gauge(mgr, "lmtier_tier_read_bytes_per_second", "slow") == pytest.approx(throttled.bytes_per_s)

    knob.set(bytes_per_s=None)  # the tier is fast again: a handful of reads move the estimate
    for k in ks[2:]:
        await read(k)
    fast = mgr.read_costs()["slow"]
    assert fast is not None and fast.samples == 10
    assert fast.bytes_per_s > 5 * throttled.bytes_per_s

    knob.set(bytes_per_s=RATE)  # slow again: one read is enough to doubt it
    await read(ks[0])
    doubt = mgr.read_costs()["slow"]
    assert doubt is not None and doubt.bytes_per_s < fast.bytes_per_s / 2
    assert knob.reads == 11 and knob.bytes_read == 11 * CHUNK


@pytest.mark.asyncio
async def test_a_read_past_its_deadline_teaches_the_estimate_that_the_tier_is_slow(
        registry: BackendRegistry, tmp_path: Path) -> None:
    config = {"chunk_tokens": 16, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "16MiB", "pinned": False}},
        {"name": "slow", "backend": "throttled", "timeout_s": {"get": 0.05},
         "options": {"inner": {"backend": "disk", "options": {"root": str(tmp_path)}}, "bytes_per_s": 1e6}}]}
    async with await StorageManager.from_config(config, registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        (k,) = keys(1, "deadline")
        await mgr.tier("slow").backend.put([(k, b"x" * CHUNK)])
        assert await mgr.fetch([k], [CHUNK]) == [None]  # 262 ms of throttle > the 50 ms deadline
        assert await mgr.settle(5.0)
        cost = mgr.tier("slow").reads.cost()
        assert cost is not None and cost.samples == 1
        assert cost.bytes_per_s <= CHUNK / 0.05  # at least the deadline for one chunk


@pytest.mark.asyncio
async def test_seeds_from_the_config_answer_before_any_read(registry: BackendRegistry, tmp_path: Path) -> None:
    config = {"chunk_tokens": 16, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}},
        {"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path)},
         "read_bytes_per_s": "2GB", "read_latency_s": 0.0002}]}
    async with await StorageManager.from_config(config, registry=registry,
                                                metrics_registry=CollectorRegistry()) as mgr:
        cost = mgr.read_costs()["nvme"]
        assert cost is not None and cost.samples == 0
        assert cost.bytes_per_s == pytest.approx(2e9, rel=1e-3)
        assert cost.latency_s == pytest.approx(0.0002, rel=1e-3)
        assert gauge(mgr, "lmtier_tier_read_bytes_per_second", "nvme") == pytest.approx(2e9, rel=1e-3)
        assert isinstance(mgr.tier("nvme").backend, DiskBackend)
        assert not isinstance(mgr.tier("nvme").backend, ThrottledBackend)
