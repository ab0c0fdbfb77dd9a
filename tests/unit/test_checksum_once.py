"""Hash each value once: the checksum the first tier computes travels with the value to the others
(write-through and background tiers, and a disk tier's evictions to the next tier)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lmtier.framing import checksum
from lmtier.keys import ChunkKey, make_namespace
from lmtier.kit import Payload
from lmtier.kit import values as kit_values
from lmtier.manager import StorageManager
from lmtier_backends.disk.backend import open_disk_backend
from lmtier_backends.disk.config import DiskConfig


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the payloads the kit computes a checksum of."""
    seen: list[int] = []

    def counting(data: object) -> int:
        seen.append(memoryview(data).nbytes)  # type: ignore[arg-type]
        return checksum(data)  # type: ignore[arg-type]

    monkeypatch.setattr(kit_values, "checksum", counting)
    return seen


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="checksum-once")
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


@pytest.mark.asyncio
async def test_a_value_put_through_two_disk_tiers_and_a_background_one_is_hashed_once(
    tmp_path: Path, hashed: list[int]
) -> None:
    config = {"tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "16MiB", "pinned": False}},
        {"name": "a", "backend": "disk", "options": {"root": str(tmp_path / "a")}, "write": "through"},
        {"name": "b", "backend": "disk", "options": {"root": str(tmp_path / "b")}, "write": "through"},
        {"name": "c", "backend": "disk", "options": {"root": str(tmp_path / "c")}, "write": "async"},
    ]}
    keys = _keys(4)
    values = [bytearray(os.urandom(100_000 + i)) for i in range(4)]  # the caller's own buffers
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        await mgr.put(list(zip(keys, values, strict=True)))
        await mgr.flush()
        for name in ("a", "b", "c"):
            got = await mgr.tier(name).backend.get(keys)
            assert [bytes(g) for g in got] == [bytes(v) for v in values]  # type: ignore[arg-type]
    assert sorted(hashed) == sorted(len(v) for v in values)  # three tiers, one checksum pass each


@pytest.mark.asyncio
async def test_the_disk_tier_hands_an_evicted_value_over_with_the_checksum_it_verified(
    tmp_path: Path, hashed: list[int]
) -> None:
    tier = await open_disk_backend(DiskConfig(root=tmp_path / "tier", max_bytes=250_000))
    evicted: list[tuple[ChunkKey, object]] = []
    tier.add_eviction_listener(lambda key, value: evicted.append((key, Payload.copy_of(value))))
    try:
        keys = _keys(3)
        values = [os.urandom(100_000) for _ in keys]
        for key, value in zip(keys, values, strict=True):
            await tier.put([(key, value)])
        hashed.clear()
        assert [k for k, _ in evicted] == keys[:1]
        carried = evicted[0][1]
        assert isinstance(carried, Payload) and carried.known_checksum == checksum(values[0])
        assert bytes(memoryview(carried)) == values[0]  # type: ignore[arg-type]
        assert hashed == []  # nothing hashed again on the way out
    finally:
        await tier.aclose()
