"""KVCacheEngine picks ServerStore from ``server:`` / ``LMTIER_SERVER``, and its pages round-trip.

Two engines (two ServerStore clients of one real ``lmtier serve``) on CPU paged caches: what one
stores, the other loads, page for page; and the configuration's rules for ``server``.
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from lmtier.config import load_config
from lmtier.engine import KVCacheEngine
from lmtier.errors import ConfigError, InvalidArgumentError
from lmtier.server.client import ServerStore
from tests.server.serverproc import ServerProc, start_server, tiers_yaml, wait_until
from tests.unit.test_engine import BLOCKS, CHUNK, blocks_equal, make_cache, namespace, tokens

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    root = tmp_path_factory.mktemp("engine-server")
    srv = start_server(root, config=tiers_yaml(root, slab="32MiB"))
    yield srv
    srv.close()


def test_a_config_with_server_and_no_tiers_is_valid_and_both_or_neither_is_refused() -> None:
    cfg = load_config({"chunk_tokens": 256, "server": "unix:///run/lmtier/lmtier.sock"}, env={})
    assert cfg.server == "unix:///run/lmtier/lmtier.sock" and cfg.tiers == []
    with pytest.raises(ConfigError, match="either tiers"):
        load_config({"server": "unix:///x.sock", "tiers": [{"name": "hot", "backend": "cpu"}]}, env={})
    with pytest.raises(ConfigError, match="at least one tier is needed, or server"):
        load_config({"chunk_tokens": 256}, env={})
    with pytest.raises(ConfigError, match="server"):
        load_config({"server": "tcp://10.0.0.1:9"}, env={})


def test_lmtier_server_points_any_config_at_the_server_instead_of_its_tiers() -> None:
    cfg = load_config(None, env={"LMTIER_SERVER": "unix:///run/lmtier/lmtier.sock"})  # the embedded default
    assert cfg.server == "unix:///run/lmtier/lmtier.sock" and cfg.tiers == []


def test_two_engines_on_one_server_load_each_others_pages(server: ServerProc) -> None:
    cfg = {"chunk_tokens": CHUNK, "server": server.address}
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(40)  # 2 whole chunks + a 2-block tail
    with KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), name="engine-a") as a, \
            KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), name="engine-b") as b:
        assert isinstance(a.kvstore, ServerStore) and a.tier_names == ["hot", "local"]
        assert a.store(toks, src, list(range(10, 20)), request_id="r1").wait() == 40
        assert b.lookup(toks) == 40, "engine B sees what engine A stored"
        assert b.retrieve(toks, dst, list(range(30, 40))) == 40
        assert blocks_equal(src, list(range(10, 20)), dst, list(range(30, 40)))
        untouched = [blk for blk in range(BLOCKS) if blk not in range(30, 40)]
        assert all(int(layer[untouched].abs().sum()) == 0 for layer in dst)
        assert a.kvstore.outstanding() == 0 and b.kvstore.outstanding() == 0
    status = server.status()
    assert status["leases"] == 0 and status["reservations"] == 0


def requests_served(server: ServerProc) -> dict[str, float]:
    """The server's ``lmtier_server_requests_total`` by op."""
    status, body = server.get("/metrics")
    assert status == 200
    return {op: float(n) for op, n in re.findall(r'^lmtier_server_requests_total\{op="(\w+)"\} (\S+)$',
                                                 body.decode(), flags=re.M)}


def test_an_engines_lookup_of_a_prompt_with_a_stored_tail_is_one_request_to_the_server(server: ServerProc) -> None:
    cfg = {"chunk_tokens": CHUNK, "server": server.address}
    toks = tokens(40, seed=21)  # 2 whole chunks + a 2-block tail
    with KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), name="engine-rt") as engine:
        assert engine.store(toks, make_cache(), list(range(10, 20))).wait() == 40
        engine.flush(30)
        before = requests_served(server)
        assert engine.lookup(toks) == 40  # the whole chunks and the tail
        assert engine.lookup(toks[:36]) == 32  # the tail after them is not stored: the whole chunks
        after = requests_served(server)
    served = {op: n - before.get(op, 0.0) for op, n in after.items() if n != before.get(op, 0.0)}
    assert served == {"lookup": 2.0}, "the tail probe rides on the lookup: no contains, no second lookup"


def test_the_engines_server_deadlines_come_from_the_config_and_a_frozen_server_misses_by_them(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    cfg = {"chunk_tokens": CHUNK, "server": srv.address,
           "server_timeout_s": {"lookup": 0.3, "fetch": 0.7, "commit": 20, "connect": 5}}
    src = make_cache()
    toks = tokens(32)
    try:
        with KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), name="engine-d") as e:
            store = e.kvstore
            assert isinstance(store, ServerStore)
            assert {k: store.timeouts[k] for k in ("lookup", "contains", "fetch", "reserve", "commit", "flush")} == {
                "lookup": 0.3, "contains": 0.3, "fetch": 0.7, "reserve": 0.5, "commit": 20.0, "flush": 60.0}
            assert store.connect_timeout_s == 5.0
            assert e.store(toks, src, list(range(8)), request_id="r").wait() == 32
            assert e.lookup(toks) == 32
            srv.signal(signal.SIGSTOP)
            try:
                assert e.lookup(toks) == 0, "a frozen server is a miss at the configured deadline"
                assert store.stats()["misses"].get("lookup:deadline", 0) >= 1
            finally:
                srv.signal(signal.SIGCONT)
            wait_until(lambda: store.connected, what="the thawed server to answer a ping")
            assert e.lookup(toks) == 32
    finally:
        srv.close()
    with pytest.raises(InvalidArgumentError, match="names no server"):
        ServerStore.from_config(load_config({"tiers": [{"name": "hot", "backend": "cpu"}]}, env={}))


def test_a_hit_held_by_a_slow_server_tier_is_weighed_with_the_servers_read_costs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the server's disk tier is believed to read at 1 kB/s (its config's seed, as an operator
    # would declare a slow volume); the engine recomputes at a seeded 1M tokens/s
    config = tmp_path / "tiers.yaml"
    config.write_text(yaml.safe_dump({"chunk_tokens": 256, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "32MiB", "pinned": False}},
        {"name": "local", "backend": "disk", "read_bytes_per_s": 1000,
         "options": {"root": str(tmp_path / "disk"), "max_bytes": "256MiB"}}]}))
    srv = start_server(tmp_path, config=config)
    cfg = {"chunk_tokens": CHUNK, "server": srv.address, "recompute_tokens_per_s": 1e6}
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(40)
    caplog.set_level(logging.INFO, logger="lmtier")
    try:
        with KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), name="engine-a") as a, \
                KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), name="engine-b") as b:
            assert a.store(toks, src, list(range(10, 20))).wait() == 40
            a.flush()
            srv.clear("hot")  # the chunks are on the server's disk tier only
            assert b.lookup(toks, request_id="slow") == 0, "reading 1 kB/s loses to recomputing: nothing loaded"
            local = b.kvstore.read_costs()["local"]  # as the lookup reply carried it
            assert local is not None and local.bytes_per_s < 2000
            assert "Request slow: total 40 tokens, hit 40 tokens, loading 0 (local ~" in caplog.text
            assert "), promoting" in caplog.text
            assert b.metrics.registry.get_sample_value("lmtier_load_decisions_total", {"outcome": "none"}) == 1
            b.flush()  # the promotion: the server read the chunks from its disk into the slab
            code, body = srv.get("/metrics")  # the server exports what it learned from that read
            assert code == 200 and b'lmtier_tier_read_bytes_per_second{tier="local"}' in body
            learned = b.lookup(toks, request_id="fast")  # the reply carries the disk's real speed now
            assert learned == 40
            assert b.retrieve(toks, dst, list(range(30, 40))) == 40
            assert blocks_equal(src, list(range(10, 20)), dst, list(range(30, 40)))
            assert b.kvstore.outstanding() == 0
    finally:
        srv.close()


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_a_hit_the_server_cannot_deliver_is_a_load_of_zero_tokens_within_the_fetch_deadline(
        tmp_path: Path, fault: str) -> None:
    """lookup promised the tokens, then the server froze or died before the retrieve: the retrieve
    loads nothing (the vLLM connector reports the blocks failed and vLLM recomputes them), leaves
    the destination blocks untouched, raises nothing, holds no lease; the server back, it loads."""
    srv = start_server(tmp_path)
    cfg = {"chunk_tokens": CHUNK, "server": srv.address,
           "server_timeout_s": {"lookup": 5, "fetch": 0.7, "commit": 20, "connect": 5}}
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(40)
    try:
        with KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), name="engine-f") as e:
            store = e.kvstore
            assert isinstance(store, ServerStore)
            assert e.store(toks, src, list(range(10, 20)), request_id="r").wait() == 40
            e.flush(30)
            assert e.lookup(toks) == 40
            if fault == "frozen":
                srv.signal(signal.SIGSTOP)
            else:
                srv.kill()
            try:
                assert e.retrieve(toks, dst, list(range(30, 40))) == 0
                # killed: the connection is seen closed before the fetch (unavailable) or while it waits (disconnected)
                reasons = ["fetch:deadline"] if fault == "frozen" else ["fetch:unavailable", "fetch:disconnected"]
                misses = store.stats()["misses"]
                assert sum(misses.get(r, 0) for r in reasons) >= 1, misses
            finally:
                if fault == "frozen":
                    srv.signal(signal.SIGCONT)
            assert all(int(layer.abs().sum()) == 0 for layer in dst), "a failed load wrote into the cache"
            assert store.outstanding() == 0
            back = srv if fault == "frozen" else start_server(tmp_path, name="restarted")
            wait_until(lambda: store.connected, 60, "the client to be connected again")
            if fault == "killed":  # the disk tier (written through) kept the chunks; the slab is new
                wait_until(lambda: e.lookup(toks) == 40, 60, "the restarted server to find the chunks")
            assert e.retrieve(toks, dst, list(range(30, 40))) == 40
            assert blocks_equal(src, list(range(10, 20)), dst, list(range(30, 40)))
            assert store.outstanding() == 0
            if back is not srv:
                back.close()
    finally:
        srv.close()
