"""Faults are misses per key: one key a tier refuses must not cost the rest of its batch.

The tier is a real one (redis-server, SeaweedFS for s3) behind a fault injector that fails every
call whose batch holds a *poisoned* key — as a tier fails a whole batch when one value is too
large, one name unreadable, one entry refused — and answers calls without it as the tier does.
The manager asks such a batch again key by key, so the other keys still hit, land or answer; a
tier that is *down* (``BackendUnavailableError``) is not asked again (that would cost its
callers more deadlines). Through :class:`KVCacheEngine`: a lookup and a retrieve over a poisoned
chunk still answer the chunks before it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from lmtier.config import load_config
from lmtier.engine import KVCacheEngine
from lmtier.errors import BackendError, BackendUnavailableError
from lmtier.keys import ChunkKey, KVNamespace, chunk_keys, make_namespace
from lmtier.manager import StorageManager
from lmtier.protocol import Buffer, Capabilities
from lmtier.registry import BackendRegistry, BackendSpec
from tests.support.remote_tiers import RemoteTier, remote_available

KINDS = [pytest.param("redis", marks=pytest.mark.redis), pytest.param("s3", marks=pytest.mark.s3)]
HOT = {"name": "hot", "backend": "cpu", "options": {"max_bytes": "8MiB", "pinned": False}}
#: the injectors of the running test, by label (the registry's factory builds them)
POISONED: dict[str, Poisoned] = {}


class Poisoned:
    """Wraps a real tier: a call whose batch holds a key of :attr:`poison` raises :attr:`error`
    (for all its keys); any other call is the tier's own. Counts the calls and their batch sizes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.poison: set[ChunkKey] = set()
        self.error: type[BackendError] = BackendError
        self.calls: list[tuple[str, int]] = []

    def _check(self, op: str, keys: Sequence[ChunkKey]) -> None:
        self.calls.append((op, len(keys)))
        bad = [k for k in keys if k in self.poison]
        if bad:
            raise self.error(f"poisoned: the tier refuses {bad[0]} (a fault injected for the whole batch)")

    def batches(self, op: str) -> list[int]:
        return [n for o, n in self.calls if o == op]

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities  # type: ignore[no-any-return]

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._check("contains", keys)
        return await self.inner.contains(keys)  # type: ignore[no-any-return]

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        self._check("get", keys)
        return await self.inner.get(keys)  # type: ignore[no-any-return]

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        self._check("get_into", keys)
        return await self.inner.get_into(keys, outs)  # type: ignore[no-any-return]

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        self._check("put", [k for k, _ in items])
        await self.inner.put(items)

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check("delete", keys)
        await self.inner.delete(keys)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Poisoned:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class PoisonedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    backend: str
    options: dict[str, Any] = Field(default_factory=dict)


async def _make(config: PoisonedConfig) -> Poisoned:
    inner = await BackendRegistry.discover().create(config.backend, config.options, path="options.options")
    POISONED[config.label] = wrapper = Poisoned(inner)
    return wrapper


@pytest.fixture(params=KINDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RemoteTier]:
    why = remote_available(request.param)
    if why:
        pytest.skip(why)
    POISONED.clear()
    with RemoteTier(request.param, tmp_path) as server:
        yield server
    POISONED.clear()


def _registry() -> BackendRegistry:
    reg = BackendRegistry.discover()
    reg.register(BackendSpec("poisoned", f"{__name__}:_make", f"{__name__}:PoisonedConfig"))
    return reg


def _tier(remote: RemoteTier, label: str, **entry: Any) -> dict[str, Any]:
    inner = remote.tier("remote")
    return {"name": "remote", "backend": "poisoned", **entry,
            "options": {"label": label, "backend": inner["backend"], "options": inner["options"]}}


async def _manager(remote: RemoteTier, metrics: CollectorRegistry, **entry: Any) -> tuple[StorageManager, Poisoned]:
    cfg = load_config({"chunk_tokens": 16, "tiers": [HOT, _tier(remote, "m", **entry)]})
    mgr = await StorageManager.from_config(cfg, registry=_registry(), metrics_registry=metrics)
    return mgr, POISONED["m"]


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="per-key", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


@pytest.mark.asyncio
async def test_one_refused_key_is_a_miss_and_the_rest_of_its_batch_is_served(remote: RemoteTier) -> None:
    metrics = CollectorRegistry()
    mgr, tier = await _manager(remote, metrics, promote=False)
    try:
        ks = _keys(5)
        values = [os.urandom(4096 + i) for i in range(5)]
        await tier.inner.put(list(zip(ks, values, strict=True)))  # stored in the remote tier only
        tier.poison = {ks[2]}
        assert await mgr.contains(ks) == [True, True, False, True, True]
        assert await mgr.lookup(ks) == 2  # the prefix before the refused key
        assert await mgr.get(ks) == [values[0], values[1], None, values[3], values[4]]
        outs = [bytearray(len(v)) for v in values]
        assert await mgr.get_into(ks, outs) == [True, True, False, True, True]
        assert [bytes(o) for o in outs] == [values[0], values[1], bytes(len(values[2])), values[3], values[4]]
        got = await mgr.fetch(ks, [len(v) for v in values])
        try:
            assert [None if b is None else bytes(b.view()) for b in got] == [
                values[0], values[1], None, values[3], values[4]]
        finally:
            for b in got:
                if b is not None:
                    b.release()
        # each batch failed once, then went key by key; the tier answered, so its circuit is closed
        assert tier.batches("contains")[:2] == [5, 1]
        assert mgr.tier("remote").breaker.state == "closed"
        assert _value(metrics, "lmtier_tier_errors_total", tier="remote", op="get", kind="backend") == 2
        assert _value(metrics, "lmtier_tier_per_key_retries_total", tier="remote", op="contains") >= 5
        assert _value(metrics, "lmtier_tier_per_key_retries_total", tier="remote", op="get") == 5
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_put_lands_every_item_but_the_refused_one(remote: RemoteTier) -> None:
    metrics = CollectorRegistry()
    mgr, tier = await _manager(remote, metrics, write="through")
    try:
        ks = _keys(4)
        values = [os.urandom(2048) for _ in ks]
        tier.poison = {ks[1]}
        heard: list[tuple[str, ChunkKey, bool]] = []
        mgr.add_residency_listener(lambda name, keys, held: heard.extend((name, k, held) for k in keys))
        await mgr.put(list(zip(ks, values, strict=True)))
        tier.poison = set()
        # residency (KV events): each key the remote tier took, once; not the refused one
        assert sorted((n, ks.index(k), h) for n, k, h in heard) == [
            *(("hot", i, True) for i in range(4)), *(("remote", i, True) for i in (0, 2, 3))]
        assert await tier.inner.contains(ks) == [True, False, True, True]
        assert await tier.inner.get([ks[0], ks[2], ks[3]]) == [values[0], values[2], values[3]]
        assert tier.batches("put") == [4, 1, 1, 1, 1]
        assert _value(metrics, "lmtier_tier_skipped_writes_total", tier="remote", reason="error") == 1
        assert _value(metrics, "lmtier_tier_written_objects_total", tier="remote") == 3
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_tier_that_is_down_is_not_asked_again_key_by_key(remote: RemoteTier) -> None:
    metrics = CollectorRegistry()
    mgr, tier = await _manager(remote, metrics)
    try:
        ks = _keys(4)
        await tier.inner.put([(k, b"v" * 512) for k in ks])
        tier.poison, tier.error = {ks[3]}, BackendUnavailableError
        assert await mgr.contains(ks) == [False] * 4
        assert await mgr.get(ks) == [None] * 4
        assert tier.batches("contains") == [4] and tier.batches("get") == [4]
        assert _value(metrics, "lmtier_tier_per_key_retries_total", tier="remote", op="get") == 0
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_background_write_dropped_by_a_failed_presence_check_is_counted(remote: RemoteTier) -> None:
    metrics = CollectorRegistry()
    mgr, tier = await _manager(remote, metrics, write="async")
    try:
        ks = _keys(3)
        tier.poison, tier.error = set(ks), BackendUnavailableError
        await mgr.put([(k, b"w" * 1024) for k in ks], skip_present=True)
        await mgr.flush()
        assert tier.batches("contains") == [3] and tier.batches("put") == []
        assert _value(metrics, "lmtier_tier_skipped_writes_total", tier="remote", reason="unavailable") == 3
    finally:
        await mgr.aclose()


LAYERS, BLOCKS, HEADS, BLK, HEAD, CHUNK = 2, 32, 2, 4, 8, 16


def _namespace() -> KVNamespace:
    return KVNamespace(model="per-key", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=LAYERS,
                       block_size=BLK, num_kv_heads=HEADS, head_size=HEAD, page_bytes=HEADS * BLK * 2 * HEAD * 2,
                       chunk_tokens=CHUNK)


def _cache(fill: bool) -> list[torch.Tensor]:
    buf = torch.zeros(LAYERS, BLOCKS, HEADS, BLK, 2 * HEAD, dtype=torch.bfloat16)
    if fill:
        buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16))
    return list(buf.unbind(0))


def test_the_engine_loads_the_chunks_before_a_refused_one(remote: RemoteTier) -> None:
    cfg = {"chunk_tokens": CHUNK, "host_pool_bytes": 4 << 20, "load_policy": "always",
           "tiers": [HOT, _tier(remote, "e", write="through")]}
    toks = torch.randint(3, 30000, (4 * CHUNK,), generator=torch.Generator().manual_seed(9)).tolist()
    src, dst = _cache(True), _cache(False)
    blocks = list(range(4 * CHUNK // BLK))
    with KVCacheEngine(cfg, _namespace(), registry=_registry(), metrics_registry=CollectorRegistry()) as first:
        assert first.store(toks, src, blocks).wait() == 4 * CHUNK
        first.flush()
    keys = chunk_keys(toks, first.namespace, CHUNK)
    # a fresh engine (empty RAM tier): everything comes from the remote tier, chunk 2 refused there
    with KVCacheEngine(cfg, _namespace(), registry=_registry(), metrics_registry=CollectorRegistry()) as second:
        tier = POISONED["e"]
        tier.poison = {keys[2]}
        assert second.lookup(toks) == 2 * CHUNK
        assert second.retrieve(toks, dst, blocks) == 2 * CHUNK
        loaded = blocks[: 2 * CHUNK // BLK]
        assert all(torch.equal(s[loaded], d[loaded]) for s, d in zip(src, dst, strict=True))
        assert all(int(d[blocks[len(loaded):]].abs().sum()) == 0 for d in dst)
        assert 4 in tier.batches("get_into") or 4 in tier.batches("get")  # one batch, then key by key
