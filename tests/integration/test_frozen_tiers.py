"""A remote tier that is frozen (SIGSTOP) or killed costs a caller its deadline, never more.

Real servers (redis-server, SeaweedFS for s3 and NIXL's OBJ plugin). A frozen server keeps its
sockets open and never answers — the case a client library's socket timeouts do not bound: the
manager answers at the deadline, counts the miss, opens the circuit at once, and leaves the
stuck call to end in the background (here: when the server is thawed). Nothing asserts a
duration: benchmarks/frozen_tiers.py measures how long each call took.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from tests.support.remote_tiers import RemoteTier, remote_available

MARKS = {"redis": [pytest.mark.redis], "s3": [pytest.mark.s3], "nixl-obj": [pytest.mark.nixl, pytest.mark.s3]}
KINDS = [pytest.param(kind, marks=marks) for kind, marks in MARKS.items()]
DEADLINES = {"lookup": 0.2, "get": 0.3, "put": 1.0, "delete": 0.5}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=KINDS)
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RemoteTier]:
    why = remote_available(request.param)
    if why:
        pytest.skip(why)
    # as in an engine process: the tiers' receive pools import torch on first use, which would
    # otherwise cost the first large get its deadline here
    import torch  # noqa: F401
    with RemoteTier(request.param, tmp_path) as server:
        yield server


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="frozen", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


@pytest.mark.asyncio
async def test_a_frozen_server_is_a_miss_at_the_deadline_then_the_tier_recovers(remote: RemoteTier) -> None:
    metrics, clock = CollectorRegistry(), Clock()
    tier_cfg = remote.tier(timeout_s=DEADLINES, breaker={"cooldown_s": 5})
    mgr = await StorageManager.from_config({"tiers": [tier_cfg]}, metrics_registry=metrics, clock=clock)
    try:
        ks = _keys(4)
        items = [(k, os.urandom(256 << 10)) for k in ks[:3]]
        await mgr.put(items)
        assert await mgr.lookup(ks) == 3
        tier = mgr.tier("remote")

        remote.freeze()
        assert await mgr.lookup(ks) == 0
        assert tier.breaker.state == "open"  # after one missed deadline
        assert _value(metrics, "lmtier_tier_deadline_misses_total", tier="remote", op="contains") == 1
        clock.now += 5  # the next call is the probe: still frozen
        assert await mgr.get(ks[:3]) == [None] * 3
        assert _value(metrics, "lmtier_tier_deadline_misses_total", tier="remote", op="get") == 1
        clock.now += 10
        await mgr.put([(ks[3], b"late")])
        assert _value(metrics, "lmtier_tier_skipped_writes_total", tier="remote", reason="deadline") == 1
        assert tier.breaker.state == "open"

        remote.thaw()
        assert await mgr.settle(120)  # the stuck calls end once the server answers again
        clock.now += 60
        got = await mgr.get(ks[:3])
        assert [None if g is None else bytes(g) for g in got] == [v for _, v in items]
        assert tier.breaker.state == "closed"
    finally:
        remote.thaw()
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_killed_server_is_a_miss_and_opens_the_circuit(remote: RemoteTier) -> None:
    metrics = CollectorRegistry()
    tier_cfg = remote.tier(timeout_s=DEADLINES, breaker={"failures": 3})
    mgr = await StorageManager.from_config({"tiers": [tier_cfg]}, metrics_registry=metrics, clock=Clock())
    try:
        ks = _keys(2)
        await mgr.put([(k, os.urandom(64 << 10)) for k in ks])
        remote.kill()
        for _ in range(3):  # refused connections (or deadlines, whichever comes first)
            assert await mgr.lookup(ks) == 0
            assert await mgr.get(ks) == [None, None]
        assert mgr.tier("remote").breaker.state == "open"
        assert _value(metrics, "lmtier_tier_circuit_open", tier="remote") == 1
    finally:
        await mgr.aclose()


def test_through_the_engine_a_frozen_tier_costs_store_nothing_and_lookup_retrieve_a_deadline(
        remote: RemoteTier) -> None:
    import torch

    from lmtier.engine import KVCacheEngine
    from lmtier.keys import KVNamespace

    layers, heads, block, head = 2, 2, 16, 32
    kv = KVNamespace(model="frozen", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=layers,
                     block_size=block, num_kv_heads=heads, head_size=head, page_bytes=heads * block * 2 * head * 2,
                     chunk_tokens=64)
    cache = list(torch.randn(layers, 64, heads, block, 2 * head).to(torch.bfloat16).unbind(0))
    config = {"chunk_tokens": 64, "tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": "64MiB"}},
                                            remote.tier(timeout_s=DEADLINES)]}
    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 30000, (256,), generator=rng).tolist() for _ in range(3)]
    with KVCacheEngine(config, kv, metrics_registry=CollectorRegistry()) as seeder:
        seeder.store(prompts[0], cache, list(range(16))).wait()  # in the remote tier for the next engine
    metrics = CollectorRegistry()
    with KVCacheEngine(config, kv, metrics_registry=metrics) as engine:
        remote.freeze()
        try:
            handle = engine.store(prompts[1], cache, list(range(16)))
            assert handle.copied.done()  # returned at once: no tier was asked
            assert engine.lookup(prompts[0]) == 0  # held by the frozen tier only: a miss
            assert engine.retrieve(prompts[0], cache, list(range(16, 32))) == 0
            assert handle.wait() == 256  # the hot tier took it; the frozen tier's write was skipped
            assert engine.lookup(prompts[1]) == 256
            assert _value(metrics, "lmtier_tier_circuit_open", tier="remote") == 1
            assert _value(metrics, "lmtier_tier_deadline_misses_total", tier="remote", op="contains") >= 1
        finally:
            remote.thaw()


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_first_connect_to_a_frozen_redis_is_a_miss_at_the_deadline(tmp_path: Path) -> None:
    """The case socket timeouts alone left at 10 s per call: the tier opens without contacting
    the server (connect_at_open off), the server is frozen, and the first call's connect handshake
    never gets an answer (the kernel accepts the TCP connection; redis-py then waits for a reply
    inside the pool, where cancellation does not reach). The caller gets its miss at the deadline,
    the circuit opens at once, and the stuck handshake ends once the server answers again."""
    why = remote_available("redis")
    if why:
        pytest.skip(why)
    metrics = CollectorRegistry()
    with RemoteTier("redis", tmp_path) as remote:
        tier_cfg = remote.tier(timeout_s=DEADLINES, options={"connect_at_open": False}, breaker={"cooldown_s": 5})
        mgr = await StorageManager.from_config({"tiers": [tier_cfg]}, metrics_registry=metrics, clock=Clock())
        try:
            ks = _keys(2)
            remote.freeze()
            assert await mgr.lookup(ks) == 0
            assert mgr.tier("remote").breaker.state == "open"
            assert _value(metrics, "lmtier_tier_deadline_misses_total", tier="remote", op="contains") == 1
            assert await mgr.get(ks) == [None, None]  # skipped: the circuit is open
            assert _value(metrics, "lmtier_tier_deadline_misses_total", tier="remote", op="get") == 0
            remote.thaw()
            assert await mgr.settle(60)
        finally:
            remote.thaw()
            await mgr.aclose()


@pytest.mark.redis
@pytest.mark.s3
def test_two_remote_tiers_frozen_together_cost_each_call_one_deadline(tmp_path: Path) -> None:
    """A partition: redis-server and SeaweedFS stopped at once behind a cpu tier. The engine's
    lookup (its chunk lookup, then tail probes) waits on Redis for its deadline and does not ask
    S3 in what is left of it (no verdict on S3); the next call (a retrieve) skips Redis, whose
    circuit is open, and gives S3 its own deadline. No call waits on both."""
    import torch

    from lmtier.engine import KVCacheEngine
    from lmtier.keys import KVNamespace

    for kind in ("redis", "s3"):
        why = remote_available(kind)
        if why:
            pytest.skip(why)
    layers, heads, block, head = 2, 2, 16, 32
    kv = KVNamespace(model="partition", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=layers,
                     block_size=block, num_kv_heads=heads, head_size=head, page_bytes=heads * block * 2 * head * 2,
                     chunk_tokens=64)
    cache = list(torch.randn(layers, 64, heads, block, 2 * head).to(torch.bfloat16).unbind(0))
    prompt = torch.randint(3, 30000, (256,), generator=torch.Generator().manual_seed(5)).tolist()
    with RemoteTier("redis", tmp_path / "r") as redis, RemoteTier("s3", tmp_path / "s") as s3:
        # one lookup deadline for every tier (as by default): the engine's lookup budget is the longest
        config = {"chunk_tokens": 64, "tiers": [
            {"name": "hot", "backend": "cpu", "options": {"max_bytes": "64MiB"}, "timeout_s": DEADLINES},
            redis.tier(name="redis", timeout_s=DEADLINES), s3.tier(name="s3", timeout_s=DEADLINES)]}
        metrics = CollectorRegistry()
        with KVCacheEngine(config, kv, metrics_registry=metrics) as engine:
            redis.freeze()
            s3.freeze()
            try:
                assert engine.lookup(prompt) == 0
                assert _value(metrics, "lmtier_tier_circuit_open", tier="redis") == 1
                assert _value(metrics, "lmtier_tier_deadline_misses_total", tier="s3", op="contains") == 0
                assert _value(metrics, "lmtier_tier_circuit_open", tier="s3") == 0
                assert engine.retrieve(prompt, cache, list(range(16))) == 0
                assert _value(metrics, "lmtier_tier_deadline_misses_total", tier="s3", op="get_into") == 1
                assert _value(metrics, "lmtier_tier_circuit_open", tier="s3") == 1
            finally:
                redis.thaw()
                s3.thaw()
