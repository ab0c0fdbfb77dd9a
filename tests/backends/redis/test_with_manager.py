"""The redis tier behind a real StorageManager: faults are misses, capacity is a skipped write,
credentials fail loudly at open, and two processes share one Redis."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lmtier.errors import ConfigError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from tests.backends.redis.conftest import options_for
from tests.support.hashing import assert_the_disk_tiers_hash_travels_to

pytestmark = pytest.mark.redis


class FakeClock:
    """The manager's injectable clock: the breaker's cooldown passes when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="redis-manager", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _config(options: dict[str, Any], **tier: Any) -> dict[str, Any]:
    # generous deadlines: these tests are about faults the server reports, and a first call may
    # pay for lazy imports (torch for the receive pool) on a busy machine
    tier.setdefault("timeout_s", 30)
    return {"chunk_tokens": 256,
            "tiers": [{"name": "shared", "backend": "redis", "options": options, **tier}]}


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def _until(condition, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_a_server_killed_mid_batch_gives_misses_and_skipped_writes_then_the_tier_recovers(own_redis) -> None:
    server = own_redis()
    clock = FakeClock()
    registry = CollectorRegistry()
    mgr = await StorageManager.from_config(
        _config(options_for(server.url, read_timeout_s=5, max_connections=2),
                breaker={"failures": 2, "cooldown_s": 5.0}),
        metrics_registry=registry, clock=clock)
    try:
        tier = mgr.tier("shared")
        keys = _keys(26)
        items = [(k, os.urandom(2 << 20)) for k in keys]
        await mgr.put(items[:2])
        assert await mgr.lookup(keys[:2]) == 2

        # the server stops answering, a 48 MiB batch starts (and blocks once the socket buffers
        # are full), and the server dies while that batch is on the wire
        os.kill(server.pid, signal.SIGSTOP)
        batch = asyncio.ensure_future(mgr.put(items[2:]))
        await _until(lambda: tier.backend.stats()["jobs_running"] > 0)
        server.kill()
        await batch  # no exception reaches the caller
        assert _sample(registry, "lmtier_tier_skipped_writes_total", tier="shared", reason="unavailable") == 24

        assert await mgr.get(keys[:2]) == [None, None]  # a fault is a miss
        assert tier.breaker.state == "open"
        assert _sample(registry, "lmtier_tier_circuit_open", tier="shared") == 1
        await mgr.put(items[:1])  # skipped without touching the dead server
        assert _sample(registry, "lmtier_tier_skipped_writes_total", tier="shared", reason="circuit_open") == 1

        server.start()  # back on the same port (empty: it persists nothing)
        clock.advance(5.0)  # the cooldown passes: the next call is the probe
        await mgr.put(items[:2])
        assert tier.breaker.state == "closed"
        assert _sample(registry, "lmtier_tier_circuit_open", tier="shared") == 0
        got = await mgr.get(keys[:3])
        assert [None if g is None else bytes(g) for g in got] == [items[0][1], items[1][1], None]
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_server_killed_during_a_get_batch_gives_misses_and_opens_the_circuit(own_redis) -> None:
    server = own_redis()
    registry = CollectorRegistry()
    mgr = await StorageManager.from_config(
        _config(options_for(server.url, read_timeout_s=5, max_connections=2), breaker={"failures": 1}),
        metrics_registry=registry, clock=FakeClock())
    try:
        tier = mgr.tier("shared")
        keys = _keys(12)
        await mgr.put([(k, os.urandom(2 << 20)) for k in keys])
        assert await mgr.lookup(keys) == 12

        os.kill(server.pid, signal.SIGSTOP)  # the GETs go out and their replies never come...
        batch = asyncio.ensure_future(mgr.get(keys))
        await _until(lambda: tier.backend.stats()["jobs_running"] > 0)
        server.kill()  # ...the server dies with the batch in flight
        assert await batch == [None] * 12  # misses, no exception
        assert _sample(registry, "lmtier_tier_misses_total", tier="shared") == 12
        assert _sample(registry, "lmtier_tier_errors_total", tier="shared", op="get", kind="backendunavailable") == 1
        assert tier.breaker.state == "open"
        assert await mgr.lookup(keys) == 0  # the open circuit is a miss too, without a connection
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_cluster_primary_killed_mid_batch_is_a_fault_and_the_tier_recovers_once_it_is_back(
    tmp_path,
) -> None:
    from tests.support.redis_server import start_cluster

    cluster = start_cluster(tmp_path / "cluster")  # private: one of its nodes is killed
    try:
        clock = FakeClock()
        registry = CollectorRegistry()
        mgr = await StorageManager.from_config(
            _config(options_for(cluster.url, cluster=True, read_timeout_s=5), breaker={"failures": 1}),
            metrics_registry=registry, clock=clock)
        try:
            tier = mgr.tier("shared")
            keys = _keys(30)  # spread over the three primaries' slots
            items = [(k, os.urandom(100_000)) for k in keys]
            victim = cluster.nodes[1]
            os.kill(victim.pid, signal.SIGSTOP)  # its share of the next batch hangs on the wire...
            batch = asyncio.ensure_future(mgr.put(items))
            await _until(lambda: tier.backend.stats()["jobs_running"] > 0)
            victim.kill()  # ...until the node dies
            await batch  # no exception reaches the caller
            assert _sample(registry, "lmtier_tier_skipped_writes_total", tier="shared", reason="unavailable") == 30
            assert tier.breaker.state == "open"
            assert await mgr.get(keys) == [None] * 30

            victim.start()  # same port and nodes.conf: it rejoins with its slots
            await asyncio.to_thread(cluster.wait_ok)
            clock.advance(60.0)  # past the cooldown: the next call is the probe
            await mgr.put(items)
            assert tier.breaker.state == "closed"
            got = await mgr.get(keys)
            assert [None if g is None else bytes(g) for g in got] == [v for _, v in items]
        finally:
            await mgr.aclose()
    finally:
        cluster.stop()


@pytest.mark.asyncio
async def test_maxmemory_reached_is_a_skipped_write_that_keeps_the_circuit_closed(own_redis) -> None:
    server = own_redis(maxmemory="4mb", maxmemory_policy="noeviction")
    registry = CollectorRegistry()
    mgr = await StorageManager.from_config(
        _config(options_for(server.url), breaker={"failures": 1}), metrics_registry=registry)
    try:
        keys = _keys(8)
        for k in keys:
            await mgr.put([(k, os.urandom(1 << 20))])  # never raises
        assert _sample(registry, "lmtier_tier_skipped_writes_total", tier="shared", reason="full") >= 1
        assert _sample(registry, "lmtier_tier_errors_total", tier="shared", op="put", kind="capacity") >= 1
        assert mgr.tier("shared").breaker.state == "closed"  # full is not down
        assert (await mgr.get(keys[:1]))[0] is not None  # what fitted is still served
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
async def test_a_wrong_password_fails_the_manager_at_open_with_a_clear_error(redis_with_password) -> None:
    with pytest.raises(ConfigError, match="refused our credentials") as info:
        await StorageManager.from_config(
            _config(options_for(redis_with_password.url, password="wrong-pw-31c")),
            metrics_registry=CollectorRegistry())
    assert "wrong-pw-31c" not in str(info.value)


@pytest.mark.asyncio
async def test_a_bad_option_names_its_key_path(redis_server) -> None:
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.options\.url"):
        await StorageManager.from_config(_config({"url": "http://127.0.0.1:1"}), metrics_registry=CollectorRegistry())


_PEER = textwrap.dedent("""
    import asyncio, json, random, sys
    from prometheus_client import CollectorRegistry
    from lmtier.keys import chunk_keys, make_namespace
    from lmtier.manager import StorageManager

    async def main(options, run, mode):
        keys = chunk_keys(list(range(2048)), make_namespace(test="two-processes", run=run), 256)
        mine, theirs = (keys[:4], keys[4:]) if mode == "second" else (keys[4:], keys[:4])
        value = lambda k: random.Random(k.digest).randbytes(300_000)
        cfg = {"tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20, "pinned": False}},
                         {"name": "shared", "backend": "redis", "options": options}]}
        mgr = await StorageManager.from_config(cfg, metrics_registry=CollectorRegistry())
        try:
            got = await mgr.get(theirs)
            seen = [g is not None and bytes(g) == value(k) for k, g in zip(theirs, got)]
            await mgr.put([(k, value(k)) for k in mine])
        finally:
            await mgr.aclose()
        print(json.dumps({"seen": seen}))

    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]))
""")


@pytest.mark.asyncio
async def test_two_managers_in_two_processes_see_each_others_chunks(redis_server, tmp_path) -> None:
    from lmtier.keys import chunk_keys

    options = options_for(redis_server.url)
    run = os.urandom(4).hex()
    keys = chunk_keys(list(range(2048)), make_namespace(test="two-processes", run=run), 256)

    def value(k: ChunkKey) -> bytes:
        return random.Random(k.digest).randbytes(300_000)

    cfg = {"tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20, "pinned": False}},
                     {"name": "shared", "backend": "redis", "options": options}]}
    mgr = await StorageManager.from_config(cfg, metrics_registry=CollectorRegistry())
    try:
        await mgr.put([(k, value(k)) for k in keys[4:]])  # this process writes chunks 4..7
        script = tmp_path / "peer.py"
        script.write_text(_PEER)
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(script), json.dumps(options), run, "second"],
            capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"seen": [True] * 4}  # it saw ours
        assert await mgr.lookup(keys) == 8  # and we see the chunks 0..3 it wrote
        got = await mgr.get(keys[:4])
        assert [bytes(g) for g in got] == [value(k) for k in keys[:4]]
    finally:
        await mgr.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("redis_write", ["through", "async"])
async def test_a_value_the_disk_tier_hashed_reaches_redis_without_another_hash(
    redis_server, tmp_path, redis_write: str
) -> None:
    # issue 13: one xxh3 pass is ~12% of a raw 1 MiB SET; the checksum computed for the disk tier
    # travels with the value, so the Redis put sends its header without hashing the payload again
    await assert_the_disk_tiers_hash_travels_to(
        {"name": "redis", "backend": "redis", "options": options_for(redis_server.url), "write": redis_write},
        tmp_path, values=6)


def test_a_store_closes_within_its_budget_while_redis_is_frozen(own_redis, caplog: pytest.LogCaptureFixture) -> None:
    """A ``write: async`` Redis tier frozen (SIGSTOP) with writes queued and one in flight: the
    store's close keeps its budget — it returns while the server is still stopped, though neither
    the tier's deadline nor the socket's would end the write for minutes — drops what is queued,
    logs it, and gives every buffer back once the frozen call ends."""
    import logging
    import threading

    from lmtier.store import LocalStore

    server = own_redis()
    assert server.pid is not None
    shared = {"name": "shared", "backend": "redis", "write": "async", "timeout_s": 120.0,
              "breaker": {"failures": 1000, "cooldown_s": 1.0},
              "options": options_for(server.url, read_timeout_s=120.0)}
    cfg = {"chunk_tokens": 16, "host_pool_bytes": 1 << 20, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "8MiB", "pinned": False}}, shared]}
    registry = CollectorRegistry()
    store = LocalStore.open(cfg, metrics_registry=registry)
    ns = make_namespace(test="close-frozen")
    resumed = threading.Event()

    def resume() -> None:  # the bound of a close that waits for the frozen server: the test then fails
        resumed.set()
        os.kill(server.pid, signal.SIGCONT)  # type: ignore[arg-type]

    watchdog = threading.Timer(60.0, resume)
    os.kill(server.pid, signal.SIGSTOP)
    watchdog.start()
    try:
        caplog.set_level(logging.INFO, logger="lmtier")
        for i in range(4):
            store.put([(ChunkKey(ns, i.to_bytes(16, "big")), os.urandom(512 << 10))]).result()
        store.close(0.5)
        assert not resumed.is_set(), "the close waited for the frozen server"
        assert "background write(s) not done by the close's deadline were dropped (shared:" in caplog.text
    finally:
        watchdog.cancel()
        if not resumed.is_set():
            os.kill(server.pid, signal.SIGCONT)
    assert store.wait_closed(60.0)  # what the close abandoned has ended: its buffers are back


