"""KVCacheEngine loads only what beats recomputing: the decision on real tiers, CPU tensors.

A RAM tier over a disk tier whose reads are throttled (tests/support/throttle.py). Speeds are set
far apart (a throttled tier takes a tenth of a second or more where recomputing takes
milliseconds, or the reverse), so the decisions asserted do not depend on this machine's timing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lmtier.engine import KVCacheEngine
from lmtier.keys import chunk_keys
from lmtier.registry import BackendRegistry
from tests.support import throttle
from tests.unit.test_engine import CHUNK, blocks_equal, make_cache, namespace, tokens

CHUNK_BYTES = 3 * 4 * 256  # layers x pages x page bytes of test_engine's geometry
PROMPT = 3 * CHUNK  # three whole chunks
SLOW = 10_000.0  # bytes/s when throttled: 0.3 s per chunk
PREFILL = 1_000.0  # tokens/s (seeded): 48 ms for the prompt


def config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    slow: dict[str, Any] = {"name": "slow", "backend": "throttled", "timeout_s": {"get": 30},
                            "options": {"inner": {"backend": "disk", "options": {"root": str(tmp_path / "disk")}}}}
    slow.update(extra.pop("slow", {}))
    hot: dict[str, Any] = {"name": "hot", "backend": "cpu", "options": {"max_bytes": 8 << 20}}
    hot.update(extra.pop("hot", {}))
    return {"chunk_tokens": CHUNK, "tiers": [hot, slow], "host_pool_bytes": 4 << 20,
            "recompute_tokens_per_s": PREFILL, **extra}


def open_engine(tmp_path: Path, reg: CollectorRegistry | None = None, **extra: Any) -> KVCacheEngine:
    registry = BackendRegistry.discover()
    registry.register_plugin(throttle, name="throttle-test")
    return KVCacheEngine(config(tmp_path, **extra), namespace(), registry=registry,
                         metrics_registry=reg or CollectorRegistry())


def only_in_slow(engine: KVCacheEngine, toks: list[int], first: int = 0) -> None:
    """Drop chunks ``first..`` of ``toks`` from the RAM tier (stores and promotions landed first)."""
    engine.flush()
    keys = chunk_keys(toks, engine.namespace, CHUNK)[first:]
    hot = engine.manager.tier("hot").backend
    asyncio.run_coroutine_threadsafe(hot.delete(keys), engine.kvstore.loop).result()


def knob(engine: KVCacheEngine) -> throttle.Throttle:
    backend = engine.manager.tier("slow").backend
    assert isinstance(backend, throttle.ThrottledBackend)
    return backend.throttle


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[KVCacheEngine, list[int], list[Any]]]:
    """An engine whose slow tier is slow (and seeded so), and a prompt stored in both tiers."""
    with open_engine(tmp_path, slow={"read_bytes_per_s": SLOW}, hot={"read_bytes_per_s": "10GB"}) as eng:
        toks, src = tokens(PROMPT), make_cache()
        assert eng.store(toks, src, list(range(12))).wait() == PROMPT
        knob(eng).set(bytes_per_s=SLOW)  # as slow as the seed says: promotions take 0.3 s a chunk
        yield eng, toks, src


def test_a_hit_on_a_slow_tier_loads_nothing_and_is_promoted(stored: tuple[KVCacheEngine, list[int], list[Any]],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    eng, toks, src = stored
    only_in_slow(eng, toks)
    caplog.set_level(logging.INFO, logger="lmtier.engine")
    located = eng.locate_async(toks, request_id="r1").result()
    assert located.tokens == 0 and located.runs == (("slow", PROMPT),)
    plan = located.plan
    assert plan is not None and (plan.hit_tokens, plan.load_tokens, plan.decided) == (PROMPT, 0, True)
    assert "Request r1: total 48 tokens, hit 48 tokens, loading 0 (slow ~" in caplog.text
    assert "ms > recompute ~48 ms), promoting" in caplog.text
    eng.flush()  # the promotion landed: the next request hits RAM and loads everything
    assert eng.manager.tier("hot").backend.stats()["objects"] == 3  # type: ignore[attr-defined]
    assert eng.lookup(toks) == PROMPT
    dst = make_cache(fill=False)
    assert eng.retrieve(toks, dst, list(range(20, 32))) == PROMPT
    assert blocks_equal(src, list(range(12)), dst, list(range(20, 32)))
    reg = eng.metrics.registry
    assert reg.get_sample_value("lmtier_skipped_tokens_total") == PROMPT
    assert reg.get_sample_value("lmtier_load_decisions_total", {"outcome": "none"}) == 1
    assert reg.get_sample_value("lmtier_load_decisions_total", {"outcome": "all"}) == 1
    assert reg.get_sample_value("lmtier_hit_tokens_total") == 2 * PROMPT  # the hit is counted either way


def test_the_part_in_ram_is_loaded_and_the_slow_rest_recomputed(
        stored: tuple[KVCacheEngine, list[int], list[Any]], caplog: pytest.LogCaptureFixture) -> None:
    eng, toks, src = stored
    only_in_slow(eng, toks, first=1)  # chunk 0 in RAM, chunks 1-2 only in the slow tier
    caplog.set_level(logging.INFO, logger="lmtier.engine")
    assert eng.lookup(toks, request_id="r2") == CHUNK
    assert "hit 48 tokens, loading 16 (slow ~" in caplog.text and "for the last 32 tokens), promoting" in caplog.text
    dst = make_cache(fill=False)
    assert eng.retrieve(toks, dst, list(range(20, 32)), end=CHUNK) == CHUNK
    assert blocks_equal(src, list(range(4)), dst, list(range(20, 24)))
    assert eng.metrics.registry.get_sample_value("lmtier_load_decisions_total", {"outcome": "part"}) == 1


def test_tokens_the_caller_has_are_not_weighed(stored: tuple[KVCacheEngine, list[int], list[Any]]) -> None:
    eng, toks, _ = stored
    only_in_slow(eng, toks, first=2)  # chunks 0-1 in RAM, chunk 2 only in the slow tier
    assert eng.lookup(toks, start=2 * CHUNK) == 2 * CHUNK  # "load nothing beyond what you have"
    only_in_slow(eng, toks, first=2)  # (the skipped chunk was promoted meanwhile: drop it again)
    assert eng.lookup(toks, start=CHUNK) == 2 * CHUNK  # chunk 1 from RAM, chunk 2 recomputed


def test_the_always_policy_loads_a_slow_hit(stored: tuple[KVCacheEngine, list[int], list[Any]],
                                            caplog: pytest.LogCaptureFixture) -> None:
    eng, toks, _ = stored
    only_in_slow(eng, toks)
    eng.load_policy = "always"
    caplog.set_level(logging.INFO, logger="lmtier.engine")
    assert eng.lookup(toks, request_id="r3") == PROMPT
    assert "Request r3: total 48 tokens, hit 48\n" in caplog.text + "\n"


def test_no_estimate_loads_to_learn_then_the_slow_tier_is_skipped(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with open_engine(tmp_path, slow={"options": {"inner": {"backend": "disk",
                                                           "options": {"root": str(tmp_path / "d")}},
                                                 "bytes_per_s": 5 * SLOW}}) as eng:
        toks, src = tokens(PROMPT), make_cache()
        eng.store(toks, src, list(range(12))).wait()
        only_in_slow(eng, toks)
        caplog.set_level(logging.INFO, logger="lmtier.engine")
        # a cold start: no read of the slow tier yet, so everything is loaded (and timed)
        assert eng.lookup(toks, request_id="cold") == PROMPT
        assert "loading 48 (no estimate of slow yet: loading to learn)" in caplog.text
        dst = make_cache(fill=False)
        assert eng.retrieve(toks, dst, list(range(20, 32))) == PROMPT
        assert blocks_equal(src, list(range(12)), dst, list(range(20, 32)))
        learned = eng.manager.read_costs()["slow"]
        assert learned is not None and learned.bytes_per_s <= 5 * SLOW * 1.01  # the throttle's floor
        only_in_slow(eng, toks)
        assert eng.lookup(toks, request_id="warm") == 0  # 0.18 s to load > 48 ms to recompute


def test_the_estimate_follows_the_tier_back_to_fast(tmp_path: Path) -> None:
    # seeded slow; the tier is in fact fast: skipped requests' promotions are reads that teach it
    with open_engine(tmp_path, slow={"read_bytes_per_s": SLOW}) as eng:
        prompts = [tokens(PROMPT, seed=s) for s in range(10)]
        for i, toks in enumerate(prompts):
            eng.store(toks, make_cache(seed=i), list(range(12))).wait()
        answers = []
        for toks in prompts:
            only_in_slow(eng, toks)
            answers.append(eng.lookup(toks))
        assert answers[0] == 0  # believed slow (the seed is a thousand times too slow)
        assert answers[-1] == PROMPT  # each promotion was a read at disk speed: believed fast now
        cost = eng.manager.read_costs()["slow"]
        assert cost is not None and cost.bytes_per_s > 100 * SLOW
        assert knob(eng).reads >= 1


def test_prefill_speed_is_learned_from_observed_forwards_and_exported(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    with open_engine(tmp_path, reg, recompute_tokens_per_s=None) as eng:
        assert eng.recompute.cost() is None
        eng.observe_compute([(0, 1000)], 0.5)
        cost = eng.recompute.cost()
        assert cost is not None and cost.tokens_per_s(1000) == pytest.approx(2000)
        assert reg.get_sample_value("lmtier_recompute_tokens_per_second", {"prompt_tokens": "1024"}) == \
            pytest.approx(2000)


def test_the_onload_is_learned_from_loads_and_weighed(stored: tuple[KVCacheEngine, list[int], list[Any]],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    eng, toks, src = stored
    assert eng.onload.cost() is None  # nothing loaded yet: RAM hits cost their reads only
    assert eng.lookup(toks) == PROMPT
    dst = make_cache(fill=False)
    assert eng.retrieve(toks, dst, list(range(20, 32))) == PROMPT
    assert blocks_equal(src, list(range(12)), dst, list(range(20, 32)))
    learned = eng.onload.cost()  # the CPU onload copied the hit into the cache: timed
    assert learned is not None and learned.bytes_per_s > 0 and eng.onload.samples >= 1
    assert eng.metrics.registry.get_sample_value("lmtier_onload_bytes_per_second") == learned.bytes_per_s
    # copies believed as slow as 10 s for the prompt's 3 chunks: even a RAM hit is recomputed
    fresh = tokens(PROMPT, seed=7)
    eng.store(fresh, make_cache(seed=7), list(range(12))).wait()
    for _ in range(16):
        eng.onload.observe(3 * CHUNK_BYTES, 10.0)
    caplog.set_level(logging.INFO, logger="lmtier.engine")
    assert eng.lookup(fresh, request_id="r9") == 0
    assert "hit 48 tokens, loading 0 (hot ~10000 ms > recompute ~48 ms)" in caplog.text
