"""A Redis Cluster with one primary killed: its keys are misses, the other primaries' keys hit.

A private 3-primary Cluster (no replicas, so nothing takes over the dead primary's slots) per
module, configured to serve while a primary is down; the primary is killed with SIGKILL, so every call that reaches it fails at once
(connection refused), and the other nodes keep answering.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from lmtier.errors import BackendUnavailableError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier_backends.redis.backend import RedisBackend, open_redis_backend
from lmtier_backends.redis.config import RedisConfig
from tests.backends.redis.conftest import options_for
from tests.support.redis_server import RedisCluster, redis_available, start_cluster

pytestmark = pytest.mark.redis

N = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A private Cluster whose second node the tests kill (and start again). Its nodes serve their
    own slots while another primary is down (``cluster-require-full-coverage no``, what a cache
    wants; with Redis's default every node answers CLUSTERDOWN once the dead one is marked
    failed, and every key is a miss)."""
    if not redis_available():
        pytest.skip("redis-server / redis-cli not on PATH: apt-get install -y redis-server")
    c = start_cluster(tmp_path_factory.mktemp("redis-dead-primary"),
                      extra_args=["--cluster-require-full-coverage", "no"])
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def victim(cluster: RedisCluster) -> Iterator[Any]:
    """The node to kill; back up and the Cluster healthy after the test."""
    node = cluster.nodes[1]  # not the seed node the tier discovers the Cluster through
    try:
        yield node
    finally:
        if not node.running:
            node.start()
        cluster.wait_ok()


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="redis-dead-primary", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _on(node: Any, backend: RedisBackend, keys: list[ChunkKey]) -> set[ChunkKey]:
    """The keys whose value lives on ``node`` (asked of the node itself)."""
    raw = redis.Redis(host="127.0.0.1", port=node.port)

    def here(key: ChunkKey) -> bool:
        try:
            return bool(raw.exists(backend.config.key_prefix + str(key)))
        except redis.exceptions.MovedError:  # another node owns its slot
            return False

    try:
        return {k for k in keys if here(k)}
    finally:
        raw.close()


async def _stored(cluster: RedisCluster, victim: Any) -> tuple[RedisBackend, list[tuple[ChunkKey, bytes]], set[ChunkKey]]:
    backend = await open_redis_backend(RedisConfig(**options_for(cluster.url, cluster=True, read_timeout_s=5)))
    items = [(k, os.urandom(300_000)) for k in _keys(N)]
    await backend.put(items)
    dead = _on(victim, backend, [k for k, _ in items])
    assert 0 < len(dead) < N, "the keys must span the killed primary and the others"
    return backend, items, dead


@pytest.mark.asyncio
async def test_get_serves_every_key_of_the_live_primaries_and_misses_the_dead_ones(
    cluster: RedisCluster, victim: Any, caplog: pytest.LogCaptureFixture
) -> None:
    backend, items, dead = await _stored(cluster, victim)
    try:
        victim.kill()
        with caplog.at_level(logging.WARNING, logger="lmtier.kit"):
            got = await backend.get([k for k, _ in items])
        for (key, data), value in zip(items, got, strict=True):
            if key in dead:
                assert value is None
            else:
                assert value is not None and bytes(value) == data
        assert backend.stats()["key_faults"] == len(dead)
        assert f"get: {len(dead)} of {N} keys faulted and are misses" in caplog.text
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_get_into_and_contains_answer_per_key_with_a_dead_primary(cluster: RedisCluster, victim: Any) -> None:
    backend, items, dead = await _stored(cluster, victim)
    try:
        victim.kill()
        outs = [bytearray(len(data)) for _, data in items]
        filled = await backend.get_into([k for k, _ in items], outs)
        assert filled == [k not in dead for k, _ in items]
        assert all(bytes(out) == data for out, (k, data), f in zip(outs, items, filled, strict=True) if f)
        assert await backend.contains([k for k, _ in items]) == [k not in dead for k, _ in items]
        assert backend.stats()["key_faults"] == 2 * len(dead)
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_a_batch_only_on_the_dead_primary_is_the_tiers_fault_and_it_answers_again_after_a_restart(
    cluster: RedisCluster, victim: Any
) -> None:
    backend, items, dead = await _stored(cluster, victim)
    try:
        victim.kill()
        only_dead = [k for k, _ in items if k in dead]
        with pytest.raises(BackendUnavailableError, match="redis tier"):
            await backend.get(only_dead)
        with pytest.raises(BackendUnavailableError):
            await backend.get_into(only_dead, [bytearray(300_000) for _ in only_dead])
        victim.start()  # empty: the test servers persist nothing
        cluster.wait_ok()
        fresh = [(k, os.urandom(1000)) for k in only_dead]
        await backend.put(fresh)
        assert [bytes(v) for v in await backend.get(only_dead)] == [d for _, d in fresh]
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_under_the_manager_a_dead_primary_costs_its_keys_only_and_the_circuit_stays_closed(
    cluster: RedisCluster, victim: Any
) -> None:
    registry = CollectorRegistry()
    options = options_for(cluster.url, cluster=True, read_timeout_s=5)
    mgr = await StorageManager.from_config(
        {"chunk_tokens": 256, "tiers": [{"name": "shared", "backend": "redis", "options": options,
                                         "timeout_s": 30, "breaker": {"failures": 1}}]},
        metrics_registry=registry)
    try:
        tier = mgr.tier("shared")
        items = [(k, os.urandom(300_000)) for k in _keys(N)]
        await mgr.put(items)
        dead = _on(victim, tier.backend, [k for k, _ in items])
        victim.kill()
        for _ in range(3):  # every round: the live primaries' keys hit, the circuit stays closed
            got = await mgr.get([k for k, _ in items])
            assert [v is not None for v in got] == [k not in dead for k, _ in items]
            assert all(bytes(v) == d for v, (_, d) in zip(got, items, strict=True) if v is not None)
        assert tier.breaker.state == "closed"
        assert registry.get_sample_value("lmtier_backend_key_faults", {"tier": "shared"}) == 3 * len(dead)
    finally:
        await mgr.aclose()
