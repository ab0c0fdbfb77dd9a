"""Faults of a real S3 server seen through the nixl tier (obj plugin) and the StorageManager.

Each test owns its SeaweedFS server and kills it (SIGKILL by PID) while the tier works: the tier's
calls become misses and skipped writes, the circuit opens, and the tier recovers after a restart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from tests.backends.nixl._helpers import needs_nixl, obj_options
from tests.support.seaweedfs import SeaweedFS, create_bucket, find_weed

pytestmark = [*needs_nixl, pytest.mark.s3,
              pytest.mark.skipif(find_weed() is None, reason="SeaweedFS `weed` binary not found")]

MiB = 1 << 20
BUCKET = "lmtier-nixl-faults"
RECOVERY_DEADLINE_S = 60.0  # a first PUT after a restart has been seen to take 5 s


class FakeClock:
    """The manager's clock, advanced by hand so breaker cooldowns need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="nixl-faults", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def own_seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path / "seaweedfs")
    server.start()
    try:
        create_bucket(server.endpoint, BUCKET)
        yield server
    finally:
        server.close()


def _manager_config(server: SeaweedFS) -> dict[str, Any]:
    options = {"plugin": "obj", "obj": obj_options(server, BUCKET, max_attempts=1),
               "staging_slab_bytes": "16MiB", "max_staging_bytes": "256MiB"}
    return {
        "chunk_tokens": 256,
        "tiers": [
            {"name": "hot", "backend": "cpu", "options": {"max_bytes": "256MiB", "pinned": False}},
            {"name": "shared", "backend": "nixl", "options": options, "write": "through",
             "breaker": {"failures": 2, "cooldown_s": 5.0}},
        ],
    }


@pytest_asyncio.fixture
async def managers(own_seaweed: SeaweedFS) -> AsyncIterator[tuple[StorageManager, StorageManager, FakeClock,
                                                                  CollectorRegistry]]:
    """A writer and a reader (its own empty cpu tier) sharing the bucket through the nixl tier."""
    clock, registry = FakeClock(), CollectorRegistry()
    writer = await StorageManager.from_config(_manager_config(own_seaweed), metrics_registry=registry, clock=clock)
    try:
        reader = await StorageManager.from_config(_manager_config(own_seaweed), metrics_registry=CollectorRegistry(),
                                                  clock=clock)
        try:
            yield writer, reader, clock, registry
        finally:
            await reader.aclose()
    finally:
        await writer.aclose()


@pytest.mark.asyncio
async def test_a_server_killed_mid_batch_gives_misses_and_skipped_writes_then_opens_the_circuit(
    own_seaweed: SeaweedFS,
    managers: tuple[StorageManager, StorageManager, FakeClock, CollectorRegistry],
) -> None:
    writer, reader, _, registry = managers
    shared = writer.tier("shared")
    seen, unread = _keys(2), _keys(2)
    await writer.put([(k, os.urandom(1000)) for k in seen + unread])
    assert [v is not None for v in await reader.get(seen)] == [True, True]  # served by nixl (and promoted)

    batch = [(k, os.urandom(4 * MiB)) for k in _keys(24)]
    task = asyncio.create_task(writer.put(batch))
    deadline = time.monotonic() + 30
    while shared.backend.stats()["staging_outstanding"] == 0 and not task.done():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the batch never reached the nixl tier"
        await asyncio.sleep(0.0005)  # poll interval, not synchronisation
    assert not task.done(), "the batch finished before the server could be killed"
    own_seaweed.stop()  # SIGKILL: what a crash looks like
    await task  # no exception: the failed nixl writes are skipped writes
    assert _sample(registry, "lmtier_tier_skipped_writes_total", tier="shared", reason="unavailable") == len(batch)
    assert await writer.get([k for k, _ in batch[:2]]) != [None, None]  # the hot tier still has them

    assert await reader.get(unread) == [None, None]  # the store is down: misses, no exception
    assert [v is not None for v in await reader.get(seen)] == [True, True]  # the reader's hot tier
    for mgr in (writer, reader):
        await mgr.get(_keys(1))
        await mgr.put([(_keys(1)[0], b"while down")])
        assert mgr.tier("shared").breaker.state == "open"
    assert _sample(registry, "lmtier_tier_circuit_open", tier="shared") == 1
    assert _sample(registry, "lmtier_tier_skipped_writes_total", tier="shared", reason="circuit_open") >= 1
    assert shared.backend.stats()["staging_outstanding"] == 0  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_the_tier_recovers_after_the_server_restarts(
    own_seaweed: SeaweedFS,
    managers: tuple[StorageManager, StorageManager, FakeClock, CollectorRegistry],
) -> None:
    writer, reader, clock, registry = managers
    (old,) = _keys(1)
    await writer.put([(old, b"written before the crash")])
    own_seaweed.stop()
    for _ in range(3):
        await writer.put([(_keys(1)[0], b"lost")])
    assert writer.tier("shared").breaker.state == "open"

    own_seaweed.restart()
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    (probe,) = _keys(1)
    while True:  # poll: each round lets one probe through the breaker
        clock.now += 60
        await writer.put([(probe, b"after the restart")])
        (got,) = await reader.get([probe])
        if got is not None:
            break
        assert time.monotonic() < deadline, "the nixl tier did not recover after the server restarted"
        await asyncio.sleep(0.05)  # poll interval, not synchronisation
    assert bytes(got) == b"after the restart"
    assert writer.tier("shared").breaker.state == "closed"
    assert _sample(registry, "lmtier_tier_circuit_open", tier="shared") == 0
    (kept,) = await reader.get([old])  # data written before the crash survived it
    assert kept is not None and bytes(kept) == b"written before the crash"
