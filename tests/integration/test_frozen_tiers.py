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


# -- a tier whose server is down or frozen when the manager opens --------------------------------
DOWN_KINDS = [pytest.param(kind, marks=MARKS[kind]) for kind in ("redis", "s3")]


def _wait_up(mgr: StorageManager, name: str, timeout_s: float = 90.0) -> None:
    """Poll (bounded) until the tier's background re-open has adopted its backend."""
    import time

    deadline = time.monotonic() + timeout_s
    while not mgr.tier(name).up:
        assert time.monotonic() < deadline, f"tier {name} was not re-opened within {timeout_s}s"
        time.sleep(0.05)  # the polling interval of the condition, not a synchronisation


async def _poll_up(mgr: StorageManager, name: str, timeout_s: float = 90.0) -> None:
    import asyncio

    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, _wait_up, mgr, name, timeout_s),
                           timeout_s + 5)


@pytest.mark.parametrize("kind", DOWN_KINDS)
@pytest.mark.asyncio
async def test_a_server_that_is_down_at_open_starts_the_tier_down_then_it_serves(
        kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The engine must start while Redis/S3 is down: the tier opens *down* (calls are misses and
    skipped writes at once, ``lmtier_tier_up`` 0, one warning), and once the server is back the
    background re-open adopts it and it serves."""
    why = remote_available(kind)
    if why:
        pytest.skip(why)
    metrics = CollectorRegistry()
    with RemoteTier(kind, tmp_path) as remote:
        config = {"tiers": [remote.tier(timeout_s=DEADLINES)]}
        remote.kill()
        with caplog.at_level("INFO", logger="lmtier"):
            mgr = await StorageManager.from_config(config, metrics_registry=metrics)
        try:
            tier = mgr.tier("remote")
            assert not tier.up and mgr.stats()["remote"]["up"] is False
            assert _value(metrics, "lmtier_tier_up", tier="remote") == 0
            warned = [r for r in caplog.records if r.levelname == "WARNING" and "starts down" in r.message]
            assert len(warned) == 1 and "remote" in warned[0].message and "retried" in warned[0].message
            ks = _keys(2)
            assert await mgr.lookup(ks) == 0
            assert await mgr.get(ks) == [None, None]
            assert await mgr.put([(ks[0], b"while down")]) == 0
            assert _value(metrics, "lmtier_tier_skipped_writes_total", tier="remote", reason="down") == 1
            assert _value(metrics, "lmtier_tier_deadline_misses_total", tier="remote", op="contains") == 0

            remote.revive()
            caplog.clear()
            with caplog.at_level("INFO", logger="lmtier"):
                await _poll_up(mgr, "remote")
            assert _value(metrics, "lmtier_tier_up", tier="remote") == 1
            assert any("serving now" in r.message for r in caplog.records if r.levelname == "INFO")
            await mgr.put([(ks[1], b"after")])
            assert await mgr.get(ks) == [None, b"after"]
        finally:
            await mgr.aclose()
        assert tier.reopener is not None and tier.reopener.done() and tier.opening is None


@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_redis_frozen_at_open_does_not_hold_the_start_then_the_tier_serves(tmp_path: Path) -> None:
    """A frozen server accepts the connection and never answers the handshake: the open returns
    at its deadline while the server is still frozen, the handshake goes on in the background,
    and the tier serves once the server is thawed."""
    why = remote_available("redis")
    if why:
        pytest.skip(why)
    metrics = CollectorRegistry()
    with RemoteTier("redis", tmp_path) as remote:
        remote.freeze()
        try:
            mgr = await StorageManager.from_config({"tiers": [remote.tier(timeout_s={**DEADLINES, "open": 0.5})]},
                                                   metrics_registry=metrics)
            try:
                assert remote.frozen and not mgr.tier("remote").up  # returned before the server answered
                ks = _keys(2)
                assert await mgr.lookup(ks) == 0
                assert await mgr.get(ks) == [None, None]
                remote.thaw()
                await _poll_up(mgr, "remote")
                await mgr.put([(ks[0], b"thawed")])
                assert await mgr.get(ks) == [b"thawed", None]
            finally:
                await mgr.aclose()
        finally:
            remote.thaw()


@pytest.mark.redis
@pytest.mark.s3
@pytest.mark.asyncio
async def test_a_wrong_config_still_raises_at_open_and_a_tier_opening_down_is_reclaimed(tmp_path: Path) -> None:
    """A missing bucket is the user's to fix: ConfigError from from_config, as before — even after
    a hotter tier started down (its frozen open still running), which is stopped and closed."""
    import asyncio

    from lmtier.errors import ConfigError

    for kind in ("redis", "s3"):
        why = remote_available(kind)
        if why:
            pytest.skip(why)
    with RemoteTier("redis", tmp_path / "r") as redis, RemoteTier("s3", tmp_path / "s") as s3:
        redis.freeze()
        try:
            config = {"tiers": [redis.tier(name="redis", timeout_s={**DEADLINES, "open": 0.5}),
                                s3.tier(name="s3", options={"bucket": "no-such-bucket"})]}
            with pytest.raises(ConfigError, match="bucket"):
                await StorageManager.from_config(config, metrics_registry=CollectorRegistry())
            assert redis.frozen  # it raised without waiting for the frozen tier
            left = [t for t in asyncio.all_tasks() if t.get_name().startswith("lmtier-")]
            assert left == []
        finally:
            redis.thaw()
