"""Counting the checksum passes over stored values: every xxh3 pass lmtier.framing makes over more
than a header's bytes, one-shot or streamed, wherever a tier or the manager makes it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash
from prometheus_client import CollectorRegistry

from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager

__all__ = ["assert_the_disk_tiers_hash_travels_to", "payload_hashes"]

_HEADER_CHECK = 64  # the header's own check hashes its first 60 bytes: not a payload pass


@contextlib.contextmanager
def payload_hashes() -> Iterator[list[int]]:
    """Yields a list that receives the byte count of each payload hashed meanwhile (a streamed
    pass is counted when its digest is taken). Patches the ``xxhash`` functions lmtier.framing
    calls, so every path is seen, not only the kit's."""
    passes: list[int] = []
    one_shot = xxhash.xxh3_64_intdigest
    stream = xxhash.xxh3_64

    def counted(data: Any, *args: Any) -> int:
        n = memoryview(data).nbytes
        if n > _HEADER_CHECK:
            passes.append(n)
        return one_shot(data, *args)

    class CountedStream:
        def __init__(self, *args: Any) -> None:
            self._inner = stream(*args)
            self._bytes = 0

        def update(self, data: Any) -> None:
            self._bytes += memoryview(data).nbytes
            self._inner.update(data)

        def intdigest(self) -> int:
            if self._bytes > _HEADER_CHECK:
                passes.append(self._bytes)
            return self._inner.intdigest()

    xxhash.xxh3_64_intdigest = counted  # type: ignore[assignment]
    xxhash.xxh3_64 = CountedStream  # type: ignore[assignment,misc]
    try:
        yield passes
    finally:
        xxhash.xxh3_64_intdigest = one_shot  # type: ignore[assignment]
        xxhash.xxh3_64 = stream  # type: ignore[misc]


async def assert_the_disk_tiers_hash_travels_to(tier: dict[str, Any], tmp_path: Path, *, values: int = 4) -> None:
    """Issue 13's "hash each value once", on a real ``tier`` (a config entry, named ``tier["name"]``)
    behind a cpu tier and a write-through disk tier: each value put is hashed exactly once (the
    checksum computed for the disk tier travels with it), and ``tier`` holds bytes that verify
    against that checksum."""
    config = {"tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "64MiB", "pinned": False}},
        {"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path / "disk")}, "write": "through"},
        tier,
    ]}
    ns = make_namespace(test=f"{tier['name']}-hash-once")
    keys = [ChunkKey(ns, os.urandom(16)) for _ in range(values)]
    data = [bytearray(os.urandom((1 << 20) + i)) for i in range(values)]  # the caller's buffers
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        with payload_hashes() as passes:
            await mgr.put(list(zip(keys, data, strict=True)))
            await mgr.flush()
        assert sorted(passes) == sorted(len(v) for v in data), "a value was hashed more than once"
        got = await mgr.tier(tier["name"]).backend.get(keys)
        assert [bytes(g) for g in got] == [bytes(v) for v in data]  # type: ignore[arg-type]
        del got  # lease views of the tier's receive slab, returned before it closes
