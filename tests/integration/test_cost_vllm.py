"""A real vLLM engine (CPU) loads a hit only when loading beats recomputing it.

The tiers: RAM over a disk tier whose reads can be throttled mid-run (tests/support/throttle.py,
registered through an entry point as a third-party backend would be). Each request asks for a
prompt whose chunks were dropped from RAM beforehand, so it either loads from the slow tier or
recomputes. Throttled, a load takes the better part of a second against milliseconds of prefill
on the tiny model; unthrottled, the reverse: the decisions asserted do not hang on this machine's
timing. Every output is compared with vLLM's own run without a connector (tokens equal,
logprobs within bf16 noise); ``num_cached_tokens`` is what came from lmtier.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from lmtier.keys import chunk_keys
from tests.integration import vllm_runner as runner
from tests.integration.conftest import PROMPTS, EngineSlot
from tests.support.throttle import Throttle, ThrottledBackend, install_entry_point

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

SLOW = 250_000.0  # bytes/s when throttled: ~3.6 s for the 896 tokens of a 1000-token prompt (1 KB/token)


@pytest.fixture(scope="module")
def slow_engine(engines: EngineSlot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineSlot]:
    site = tmp_path_factory.mktemp("site")
    install_entry_point(site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    root = tmp_path_factory.mktemp("lmtier-slow")
    try:
        engines.open("cost", {"chunk_tokens": 256, "tiers": [
            {"name": "hot", "backend": "cpu", "options": {"max_bytes": 256 << 20}},
            {"name": "slow", "backend": "throttled", "timeout_s": {"get": 60},
             "options": {"inner": {"backend": "disk", "options": {"root": str(root)}}}}]})
        yield engines
    finally:
        engines.close()
        sys.path.remove(str(site))


def kv(engines: EngineSlot) -> Any:
    return engines.worker_engine()


def knob(engines: EngineSlot) -> Throttle:
    backend = kv(engines).manager.tier("slow").backend
    assert isinstance(backend, ThrottledBackend)
    return backend.throttle


def only_in_slow(engines: EngineSlot, name: str | None = None, first: int = 0) -> None:
    """Wait for stores and promotions; drop RAM's chunks (all, or ``name``'s from chunk ``first``)."""
    eng = kv(engines)
    eng.flush()
    hot = eng.manager.tier("hot").backend
    if name is None:
        coro = hot.clear()
    else:
        stored = PROMPTS[name][: len(PROMPTS[name]) // 128 * 128]  # whole chunks and the block-aligned tail
        coro = hot.delete(chunk_keys(stored, eng.namespace, 256, include_partial=True)[first:])
    asyncio.run_coroutine_threadsafe(coro, eng.kvstore.loop).result()
    engines.overwrite_kv_cache()  # what a request matches the baseline with is loaded or recomputed


def run(engines: EngineSlot, baseline: dict[str, runner.Result], name: str) -> int:
    (got,) = engines.run(name)
    problem = runner.same_outputs(got, baseline[name])
    assert problem is None, f"{name}: {problem}"
    return got.num_cached_tokens


def test_an_unthrottled_tier_is_loaded_from(slow_engine: EngineSlot, baseline: dict[str, runner.Result],
                                            caplog: pytest.LogCaptureFixture) -> None:
    engines = slow_engine
    caplog.set_level(logging.INFO, logger="lmtier")
    assert run(engines, baseline, "long") == 0  # a miss: computed (and timed), stored
    only_in_slow(engines)
    assert run(engines, baseline, "long") == 896  # no estimate of the slow tier yet: loaded, and timed
    assert "loading 896 (no estimate of slow yet: loading to learn)" in caplog.text
    assert kv(engines).recompute.cost() is not None  # the prefill was timed by the connector
    assert run(engines, baseline, "disk") == 0
    only_in_slow(engines)
    assert run(engines, baseline, "disk") == 896  # weighed now: loading wins
    assert "hit 896 tokens, loading 896 (slow ~" in caplog.text


def test_a_throttled_tier_loads_nothing_and_the_outputs_match(
        slow_engine: EngineSlot, baseline: dict[str, runner.Result], caplog: pytest.LogCaptureFixture) -> None:
    engines = slow_engine
    caplog.set_level(logging.INFO, logger="lmtier")
    for name in ("mp", "whole", "odd"):
        assert run(engines, baseline, name) == 0
    fast = kv(engines).manager.read_costs()["slow"]
    assert fast is not None
    knob(engines).set(bytes_per_s=SLOW)
    only_in_slow(engines)
    # believed fast: loaded, slowly; the estimate moves with the tier's speed
    assert run(engines, baseline, "mp") == 768
    slow = kv(engines).manager.read_costs()["slow"]
    assert slow is not None and slow.bytes_per_s < fast.bytes_per_s / 10
    only_in_slow(engines)
    assert run(engines, baseline, "whole") == 0  # loading would be slower than recomputing
    assert "hit 896 tokens, loading 0 (slow ~" in caplog.text and "), promoting" in caplog.text
    only_in_slow(engines, "mp")  # the promotion landed: "whole" is in RAM again (not "mp")
    assert run(engines, baseline, "whole") == 896
    skipped = kv(engines).metrics.registry.get_sample_value("lmtier_skipped_tokens_total")
    assert skipped is not None and skipped >= 896


def test_the_part_in_ram_is_loaded_and_the_slow_rest_recomputed(
        slow_engine: EngineSlot, baseline: dict[str, runner.Result], caplog: pytest.LogCaptureFixture) -> None:
    engines = slow_engine
    assert knob(engines).bytes_per_s == SLOW
    only_in_slow(engines)
    assert run(engines, baseline, "odd") == 0  # all in the slow tier: recomputed, promoted to RAM
    caplog.set_level(logging.INFO, logger="lmtier")
    only_in_slow(engines, "odd", first=1)  # chunk 0 in RAM; chunk 1 and the tail only in the slow tier
    assert run(engines, baseline, "odd") == 256
    assert "hit 640 tokens, loading 256 (slow ~" in caplog.text


def test_when_the_throttle_is_lifted_the_tier_is_loaded_from_again(
        slow_engine: EngineSlot, baseline: dict[str, runner.Result]) -> None:
    engines = slow_engine
    names = ["redis_a", "redis_b", "dead", "mp", "whole", "odd", "disk", "shared", "long"]
    for name in names[:3]:
        assert run(engines, baseline, name) == 0
    knob(engines).set(bytes_per_s=None)
    loaded = []
    for name in names:  # each skipped request's promotion is a read at the tier's new speed
        only_in_slow(engines)
        loaded.append(run(engines, baseline, name))
    # the tier is judged by its last 8 reads: believed slow at first, fast once they are fast
    assert loaded[0] == 0
    assert loaded[-1] == 896
