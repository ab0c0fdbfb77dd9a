"""Prefill/decode split: a ``kv_producer`` engine stores, a ``kv_consumer`` engine in another process loads.

The producer runs in a subprocess (its own vLLM engine, prefill only: one token per prompt) and
writes the prompts' KV through to a shared tier; the consumer, an engine in this process with no
KV of its own (no RAM tier copy of those prompts, a fresh process-local cache), loads it from the
shared tier. Outputs equal a single engine without lmtier; the producer never looks up, the
consumer never stores.

The shared storage is a fixture parameter: the engines' own tiers with a real Redis behind their
RAM tiers, or one `lmtier serve` holding the tiers for both (each engine a client of it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.integration import vllm_runner as runner
from tests.integration.conftest import PROMPTS, EngineSlot

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _redis(tmp: Path) -> Iterator[dict[str, Any]]:
    from tests.support.redis_server import redis_available, start_redis

    if not redis_available():
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis", reason="the redis tier needs `pip install 'lmtier[redis]'`")
    server = start_redis(tmp)
    try:
        yield {"chunk_tokens": 256, "tiers": [
            {"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20}},
            {"name": "shared", "backend": "redis", "options": {"url": server.url}, "write": "through"}]}
    finally:
        server.stop()


def _lmtier_serve(tmp: Path) -> Iterator[dict[str, Any]]:
    pytest.importorskip("aiohttp", reason="lmtier serve needs `pip install 'lmtier[server]'`")
    from tests.server.serverproc import start_server

    server = start_server(tmp)
    try:
        yield {"chunk_tokens": 256, "server": server.address}
    finally:
        server.close()


#: name -> generator of both engines' connector config over the shared storage (started for the
#: test, stopped after it)
SHARED = {"redis": _redis, "lmtier-serve": _lmtier_serve}


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("lmtier-serve", marks=pytest.mark.server)])
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from SHARED[request.param](tmp_path_factory.mktemp(request.param))


def metric(name: str, **labels: str) -> float:
    return sum(s.value for fam in REGISTRY.collect() for s in fam.samples
               if s.name == name and labels.items() <= s.labels.items())


def test_a_consumer_loads_what_a_producer_in_another_process_prefilled(
        shared: dict[str, Any], engines: EngineSlot, tiny_model: str,
        baseline: dict[str, runner.Result], tmp_path: Path) -> None:
    extra = shared
    (tmp_path / "prompts.json").write_text(json.dumps([PROMPTS["pd"]]))
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.vllm_runner", "--model", tiny_model, "--extra", json.dumps(extra),
         "--role", "kv_producer", "--prompts", str(tmp_path / "prompts.json"), "--max-tokens", "1",
         "--out", str(tmp_path / "producer.json")],
        capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]
    (produced,) = json.loads((tmp_path / "producer.json").read_text())
    assert produced["num_cached_tokens"] == 0
    assert produced["token_ids"] == baseline["pd"].token_ids[:1]
    log = done.stdout + done.stderr
    assert "Stored 896 of 896 tokens" in log  # 3 chunks + a 1-block tail, written through to the shared tier
    assert "total 1000 tokens, hit" not in log  # a producer never looks up

    engines.open(f"consumer-{id(shared)}", extra, role="kv_consumer")
    stored_before = metric("lmtier_stored_tokens_total")
    (got,) = engines.run("pd")
    engines.worker_engine().flush()
    assert got.num_cached_tokens == 896  # from the shared tier: this process never computed them
    assert runner.same_outputs(got, baseline["pd"]) is None
    assert metric("lmtier_stored_tokens_total") == stored_before  # a consumer stores nothing
    engines.close()
