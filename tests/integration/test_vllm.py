"""The lmtier connector in a real vLLM engine (CPU, tiny random Llama): reuse is exact, faults recompute.

Every output is compared with vLLM's own run without a connector (token ids equal, logprobs within
bf16 noise); ``num_cached_tokens`` shows what came from lmtier (vLLM's local prefix cache is off).
vLLM's CPU block size is 128 tokens and lmtier's chunk 256 here, so a 1000-token prompt stores 3
chunks + a 1-block tail and a repeat loads 896 tokens (vLLM computes at least the last token).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from lmtier.keys import chunk_keys
from tests.integration import vllm_runner as runner
from tests.integration.conftest import PROMPTS, EngineSlot, tier_config

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    # vLLM and the torch pieces it imports warn about their own deprecations; not ours to fix
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

def check(results: list[runner.Result], names: list[str], baseline: dict[str, runner.Result]) -> None:
    for name, got in zip(names, results, strict=True):
        problem = runner.same_outputs(got, baseline[name])
        assert problem is None, f"{name}: {problem}"


def metric(name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(s.value for fam in REGISTRY.collect() for s in fam.samples
               if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def cpu_disk(engines: EngineSlot, tmp_path_factory: pytest.TempPathFactory) -> EngineSlot:
    engines.open("cpu+disk", tier_config(tmp_path_factory.mktemp("lmtier-disk")))
    return engines


def test_the_same_prompt_twice_loads_from_lmtier_and_matches_vllm(
        cpu_disk: EngineSlot, baseline: dict[str, runner.Result], caplog: pytest.LogCaptureFixture) -> None:
    engines = cpu_disk
    assert engines.name == "cpu+disk"
    caplog.set_level(logging.INFO, logger="lmtier")
    loaded_before = metric("lmtier_loaded_tokens_total")
    (first,) = engines.run("long")
    assert first.num_cached_tokens == 0
    engines.worker_engine().flush()
    engines.overwrite_kv_cache()  # what the second run matches with must come from lmtier
    (second,) = engines.run("long")
    assert second.num_cached_tokens == 896
    assert metric("lmtier_loaded_tokens_total") - loaded_before == 896
    check([first, second], ["long", "long"], baseline)
    assert "Stored 896 of 896 tokens for request" in caplog.text
    assert "total 1000 tokens, hit 896 (896 from hot), need to load 896" in caplog.text


def test_chunk_and_block_alignment(cpu_disk: EngineSlot, baseline: dict[str, runner.Result]) -> None:
    engines = cpu_disk
    assert engines.name == "cpu+disk"
    names = ["long", "odd", "short", "whole"]
    engines.run(*names)
    engines.worker_engine().flush()
    engines.overwrite_kv_cache()
    again = engines.run("shared", "odd", "short", "whole")
    # "shared" reuses the 2 whole chunks it has in common with "long" (600 tokens, 512 of them in
    # whole chunks); "odd" (700) its 2 chunks + 1-block tail; "short" (50) nothing; "whole"
    # (1024, 4 whole chunks) all but the last block, which vLLM computes: 3 chunks + 1 page of the 4th
    assert [r.num_cached_tokens for r in again] == [512, 640, 0, 896]
    check(again, ["shared", "odd", "short", "whole"], baseline)


@pytest.fixture(scope="module")
def disk_reader(engines: EngineSlot, tmp_path_factory: pytest.TempPathFactory,
                baseline: dict[str, runner.Result]) -> Path:
    """A disk tier written by one engine ("disk" prompt's files then corrupted), read by a fresh one."""
    root = tmp_path_factory.mktemp("lmtier-persist")
    extra = tier_config(root)
    engines.open("disk-writer", extra)
    engines.run("long", "disk")
    eng = engines.worker_engine()
    eng.flush()
    keys = chunk_keys(PROMPTS["disk"][:896], eng.namespace, 256, include_partial=True)
    files = {p.name: p for p in root.rglob("*") if p.is_file()}
    assert all(str(k) in files for k in keys)
    for k in keys:  # flip the last payload byte: the header still parses, the checksum fails
        path = files[str(k)]
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x5A
        path.write_bytes(bytes(raw))
    engines.open("disk-reader", extra)  # a fresh engine: its RAM tier is empty
    engines.overwrite_kv_cache()
    return root


def test_a_fresh_engine_loads_from_the_disk_tier(disk_reader: Path, engines: EngineSlot,
                                                 baseline: dict[str, runner.Result],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    assert engines.name == "disk-reader"
    caplog.set_level(logging.INFO, logger="lmtier")
    hits_before = metric("lmtier_tier_hits_total", tier="local")
    (got,) = engines.run("long")
    assert got.num_cached_tokens == 896
    assert metric("lmtier_tier_hits_total", tier="local") - hits_before == 4  # 3 chunks + the tail
    check([got], ["long"], baseline)
    assert "total 1000 tokens, hit 896 (896 from local), need to load 896" in caplog.text  # the tier named


def test_corrupt_chunks_on_disk_are_recomputed(disk_reader: Path, engines: EngineSlot,
                                               baseline: dict[str, runner.Result],
                                               caplog: pytest.LogCaptureFixture) -> None:
    assert engines.name == "disk-reader"
    caplog.set_level(logging.WARNING, logger="lmtier")
    eng = engines.worker_engine()
    corrupt_before = eng.manager.stats()["local"].get("corrupt", 0)
    (got,) = engines.run("disk")
    check([got], ["disk"], baseline)  # vLLM recomputed what failed to load
    assert eng.manager.stats()["local"]["corrupt"] - corrupt_before >= 1
    assert "could not be loaded; vLLM recomputes them" in caplog.text
    eng.flush()
    engines.overwrite_kv_cache()
    (again,) = engines.run("disk")  # the recomputed chunks were stored again, intact
    assert again.num_cached_tokens == 896
    check([again], ["disk"], baseline)


@pytest.fixture(scope="module")
def redis_engine(engines: EngineSlot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, EngineSlot]]:
    """An engine with tiers cpu -> disk -> redis (a real server, which the test will kill)."""
    from tests.support.redis_server import redis_available, start_redis

    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        shared = {"name": "shared", "backend": "redis", "options": {"url": server.url},
                  "timeout_s": 2.0, "breaker": {"failures": 2, "cooldown_s": 30.0}}
        engines.open("redis", tier_config(tmp_path_factory.mktemp("lmtier-disk"), shared))
        yield server, engines
    finally:
        engines.close()
        server.stop()


@pytest.mark.redis
def test_a_remote_tier_that_goes_down_costs_only_misses(
        redis_engine: tuple[Any, EngineSlot], baseline: dict[str, runner.Result]) -> None:
    server, engines = redis_engine
    assert engines.name == "redis"
    first = engines.run("redis_a")
    engines.worker_engine().flush()
    assert metric("lmtier_tier_written_objects_total", tier="shared") >= 2  # 2 chunks, no whole-block tail
    server.kill()  # the remote tier is down from here on
    errors_before = metric("lmtier_tier_errors_total", tier="shared", op="contains")
    down = engines.run("redis_b", "redis_a")
    engines.worker_engine().flush()
    # redis_b: a miss everywhere, computed; redis_a: still served from the RAM tier
    assert [r.num_cached_tokens for r in down] == [0, 512]
    check([*first, *down], ["redis_a", "redis_b", "redis_a"], baseline)
    failed = metric("lmtier_tier_errors_total", tier="shared", op="contains") - errors_before
    skipped = sum(metric("lmtier_tier_skipped_writes_total", tier="shared", reason=r)
                  for r in ("unavailable", "circuit_open"))
    assert failed >= 1 and skipped >= 2


@pytest.mark.redis
def test_a_shutdown_with_a_frozen_async_tier_logs_the_writes_it_dropped(
        engines: EngineSlot, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """vLLM stops while Redis (a ``write: async`` tier) is frozen (SIGSTOP): the flush gets
    ``shutdown_flush_s``, then the log says how many queued writes were dropped, per tier, and the
    engine's shutdown goes on (it does not wait out the frozen tier's call deadlines)."""
    import signal

    from tests.support.redis_server import redis_available, start_redis

    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = start_redis(tmp_path / "redis")
    # a breaker that never opens: every queued write waits for the frozen server (up to timeout_s)
    shared = {"name": "shared", "backend": "redis", "options": {"url": server.url}, "write": "async",
              "timeout_s": 20.0, "breaker": {"failures": 1000, "cooldown_s": 1.0}}
    frozen = False
    try:
        # lookups wait for the frozen tier too (its lookup deadline is 20 s): a request is computed
        # after lookup_timeout_s without an answer
        engines.open("frozen-redis", tier_config(tmp_path / "disk", shared, shutdown_flush_s=0.5, lookup_timeout_s=1))
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        frozen = True
        caplog.set_level(logging.INFO, logger="lmtier")
        for name in ("redis_a", "redis_b", "dead"):  # one background write each (its own step)
            engines.run(name)
        import time

        t0 = time.monotonic()
        engines.close()
        print(f"shutdown took {time.monotonic() - t0:.1f}s")  # shown with -s; never asserted
    finally:
        if frozen:
            os.kill(server.pid, signal.SIGCONT)  # type: ignore[arg-type]
        engines.close()
        server.stop()
    match = re.search(r"lmtier: shutdown: (\d+) queued tier write\(s\) not done after 0\.5s were dropped "
                      r"\(shared: (\d+)\)", caplog.text)
    assert match, caplog.text[-3000:]
    assert int(match[1]) == int(match[2]) >= 1  # the one being written, and any queued behind it
    assert "every store flushed" not in caplog.text


@pytest.fixture(scope="module")
def dead_redis_engine(engines: EngineSlot, tmp_path_factory: pytest.TempPathFactory) -> EngineSlot:
    """An engine with tiers cpu -> disk -> redis, where no Redis ever listens."""
    pytest.importorskip("redis", reason="the redis tier needs `pip install 'lmtier[redis]'`")
    from tests.support.redis_server import free_port

    shared = {"name": "shared", "backend": "redis",
              "options": {"url": f"redis://127.0.0.1:{free_port()}/0", "connect_at_open": False},
              "timeout_s": 2.0, "breaker": {"failures": 2, "cooldown_s": 30.0}}
    engines.open("dead-redis", tier_config(tmp_path_factory.mktemp("lmtier-disk"), shared))
    return engines


def test_a_remote_tier_down_from_the_start_costs_only_misses(
        dead_redis_engine: EngineSlot, baseline: dict[str, runner.Result]) -> None:
    engines = dead_redis_engine
    assert engines.name == "dead-redis"
    errors_before = metric("lmtier_tier_errors_total", tier="shared")
    hits_before = metric("lmtier_hit_tokens_total")
    written_before = metric("lmtier_tier_written_objects_total", tier="shared")
    (first,) = engines.run("dead")
    engines.worker_engine().flush()
    engines.overwrite_kv_cache()
    (second,) = engines.run("dead")  # served by the RAM tier; Redis is never needed
    assert [first.num_cached_tokens, second.num_cached_tokens] == [0, 512]
    check([first, second], ["dead", "dead"], baseline)
    assert metric("lmtier_tier_errors_total", tier="shared") - errors_before >= 1
    assert metric("lmtier_hit_tokens_total") - hits_before == 512  # the first lookup: a miss
    assert metric("lmtier_tier_written_objects_total", tier="shared") == written_before


def _namespace_of(log: str) -> str:
    match = re.search(r"lmtier connector \(worker, rank 0\): namespace ([0-9a-f]{16})", log)
    assert match, "the worker logs its namespace"
    return match.group(1)


def _server_result(body: dict[str, Any]) -> tuple[runner.Result, int]:
    choice = body["choices"][0]
    ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    cached = (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return runner.Result(ids, [float(x) for x in choice["logprobs"]["token_logprobs"]], int(cached)), int(cached)


def _prom(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` in a /metrics text whose labels include ``labels``."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if (line.startswith(name + "{") or line.startswith(name + " ")) and all(w in line for w in want))


def test_the_openai_server_with_roles_in_separate_processes(
        tiny_model: str, baseline: dict[str, runner.Result], tmp_path: Path) -> None:
    """``vllm serve`` as the docs write it (API server, engine core and worker in three processes),
    then ``vllm bench serve`` with 16 prompts over 2 shared prefixes, 4 at a time, in a KV cache of
    12 blocks (576 prompt tokens fill 5 blocks; the 100 generated need a 6th: requests are
    preempted), then a graceful stop that flushes the async tier."""
    from tests.support.vllm_server import start_vllm_server, vllm_command

    lazy_disk = {"name": "local", "backend": "disk", "options": {"root": str(tmp_path / "disk")}, "write": "async"}
    extra = {**tier_config(tmp_path / "unused"), "tiers": [tier_config(tmp_path)["tiers"][0], lazy_disk]}
    ktc = {"kv_connector": "LMTierConnector", "kv_connector_module_path": "lmtier.integrations.vllm",
           "kv_role": "kv_both", "kv_connector_extra_config": extra}
    # the same compute threads as the in-process baseline (2): with a connector vLLM's automatic
    # binding reserves one more core, which changes the worker's thread count (docs/vllm.md)
    env = {**runner.ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    args = ["--dtype", "bfloat16", "--max-model-len", "1024", "--seed", "0", "--enforce-eager",
            "--no-enable-prefix-caching", "--enable-prompt-tokens-details", "--num-gpu-blocks-override", "12"]
    server = start_vllm_server(tiny_model, tmp_path / "server.log", kv_transfer_config=ktc, args=args, env=env)
    try:
        first, cached_first = _server_result(server.complete(PROMPTS["mp"], max_tokens=runner.MAX_TOKENS))
        # the RAM tier has the chunks once the first response is out: a lookup queued after a
        # store on the engine's loop sees the hottest tier's copy (it is written without yielding)
        second, cached_second = _server_result(server.complete(PROMPTS["mp"], max_tokens=runner.MAX_TOKENS))
        metrics = server.metrics()
        bench = subprocess.run(
            [vllm_command(), "bench", "serve", "--base-url", server.url, "--model", "tiny", "--tokenizer",
             tiny_model, "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "512",
             "--prefix-repetition-suffix-len", "64", "--prefix-repetition-num-prefixes", "2",
             "--prefix-repetition-output-len", "100", "--num-prompts", "16", "--max-concurrency", "4",
             "--seed", "0", "--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
             "--result-filename", "bench.json"],
            capture_output=True, text=True, timeout=400, env={**os.environ, **runner.ENGINE_ENV})
        after_bench = server.metrics()
    finally:
        server.stop()
    log = server.log()
    assert [cached_first, cached_second] == [0, 768], log[-3000:]  # 800 tokens: 3 whole chunks
    check([first, second], ["mp", "mp"], baseline)
    assert re.search(r"local_rank=0, core ids=\[0, 1\]", log)  # what the worker actually binds
    assert "setting kv_load_failure_policy='recompute'" in log
    assert "the scheduler answers lookups through the workers' lookup sockets (1 rank(s))" in log
    assert re.search(r"\(Worker pid=\d+\).*lmtier storage ready: hot\(cpu\) -> local\(disk\)", log)
    assert re.search(r"\(EngineCore pid=\d+\).*Request \S+: total 800 tokens, hit 768 \(768 from hot\), "
                     r"need to load 768", log)
    # hit and requested tokens were counted when the second request was scheduled, steps before
    # its response: vLLM's frontend has them on /metrics by then
    assert _prom(metrics, "vllm:lmtier_requested_tokens_total") == 1600
    assert _prom(metrics, "vllm:lmtier_hit_tokens_total") == 768
    assert _prom(metrics, "vllm:lmtier_tier_hit_tokens_total", tier="hot") == 768
    assert _prom(metrics, "vllm:lmtier_loaded_tokens_total") == 768
    assert _prom(metrics, "vllm:lmtier_hit_ratio") == pytest.approx(0.48)
    # vllm bench serve: every request served, some of them from lmtier, with preemptions
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 16 and result.get("failed", 0) == 0
    assert _prom(after_bench, "vllm:lmtier_hit_tokens_total") > 768
    assert _prom(after_bench, "vllm:num_preemptions_total") > 0
    # a graceful stop: the worker flushed the async disk tier; the prompt's chunks are all there
    assert re.search(r"\(Worker pid=\d+\).*lmtier: shutdown: every store flushed to the tiers", log), log[-3000:]
    names = {f.name for f in (tmp_path / "disk").rglob("*") if f.is_file()}
    assert {str(k) for k in chunk_keys(PROMPTS["mp"][:768], _namespace_of(log), 256)} <= names


def test_forced_preemptions_return_vllms_own_tokens_and_leak_nothing(
        engines: EngineSlot, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """8 requests over 2 shared 512-token prefixes, 120 tokens generated each, in a KV cache of 16
    blocks (each request grows to 6): vLLM preempts and resumes them. Run twice (stores, with
    requests waiting for the prefix another one computes; then loads), every request's token ids
    equal vLLM's without lmtier, and its logprobs are within bf16 noise of vLLM's without lmtier
    either without preemption or with the same forced preemption (a resumed request's KV is
    recomputed in a prefill, which moves late logprobs by up to ~0.08 with or without lmtier:
    ``RECOMPUTED_KV_LOGPROB_ATOL``).
    The test's host pools are all returned (the autouse leak check)."""
    import random

    rng = random.Random(77)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, 2000) for _ in range(n)]

    prefixes = [toks(512), toks(512)]
    prompts = [prefixes[i % 2] + toks(60 + i) for i in range(8)]
    small = {"num_gpu_blocks_override": 16, "max_model_len": 1024}
    engines.close()
    refs = []
    for engine_args in ({}, small):  # vLLM without lmtier: no preemption, then the same preemptions
        reference = runner.make_llm(tiny_model, **engine_args)
        try:
            refs.append(runner.generate(reference, prompts, max_tokens=120))
        finally:
            runner.shutdown(reference)
    llm = engines.open("preempt", tier_config(tmp_path / "disk"), **small)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    preempt = scheduler._preempt_request
    preempted: list[str] = []

    def counted(request: Any, *args: Any, **kwargs: Any) -> Any:
        preempted.append(request.request_id)
        return preempt(request, *args, **kwargs)

    monkeypatch.setattr(scheduler, "_preempt_request", counted)
    caplog.set_level(logging.INFO, logger="lmtier")
    try:
        first = runner.generate(llm, prompts, max_tokens=120)
        in_first = len(preempted)
        engines.worker_engine().flush()
        engines.overwrite_kv_cache()
        second = runner.generate(llm, prompts, max_tokens=120)
    finally:
        engines.close()  # its pools are judged by the leak check
    assert in_first > 0 and len(preempted) > in_first  # each run was preempted
    assert [r.num_cached_tokens for r in first].count(512) >= 6  # waited for the other's prefix, then loaded
    assert "need to load 512 (waited " in caplog.text  # the log line says a request waited, and how long
    assert all(r.num_cached_tokens >= 512 for r in second)
    for run, results in (("first", first), ("second", second)):
        for i, got in enumerate(results):
            problems = [runner.same_outputs(got, ref[i], atol=runner.RECOMPUTED_KV_LOGPROB_ATOL) for ref in refs]
            assert None in problems, f"request {i} ({run} run): {problems}"


def test_with_vllms_prefix_cache_on_no_request_waits_for_what_vllm_already_shares(
        engines: EngineSlot, tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With vLLM's own prefix cache on, a running request's prefix blocks are shared from their
    allocation (in the same step): the connector must not make a request wait for lmtier's copy.
    4 requests over one 512-token prefix in one batch: none waits, vLLM's cache serves the prefix
    to the 3 later ones, lmtier loads nothing, and the tokens are vLLM's own with its prefix cache.
    (It made them wait: vllm bench serve's mean TTFT with both caches was 9x vLLM's cache alone.)"""
    import random

    from lmtier.integrations.vllm import LMTierConnector

    rng = random.Random(78)
    prefix = [rng.randrange(3, 2000) for _ in range(512)]
    # a suffix longer than a chunk: lmtier is asked (its limit, 640, is beyond vLLM's 512-token hit)
    prompts = [prefix + [rng.randrange(3, 2000) for _ in range(200 + i)] for i in range(4)]
    engines.close()
    reference = runner.make_llm(tiny_model, enable_prefix_caching=True)
    try:
        want = runner.generate(reference, prompts)
    finally:
        runner.shutdown(reference)
    waits: list[bool] = []
    defer = LMTierConnector._defer

    def recorded(self: Any, *args: Any, **kwargs: Any) -> bool:
        waits.append(defer(self, *args, **kwargs))
        return waits[-1]

    monkeypatch.setattr(LMTierConnector, "_defer", recorded)
    llm = engines.open("prefix-cache", tier_config(tmp_path / "disk"), enable_prefix_caching=True)
    loaded_before = metric("lmtier_loaded_tokens_total")
    try:
        got = runner.generate(llm, prompts)
    finally:
        engines.close()
    assert len(waits) >= 4 and not any(waits)  # asked for every request; none waited
    assert [r.num_cached_tokens for r in got] == [0, 512, 512, 512]  # vLLM's own cache
    assert metric("lmtier_loaded_tokens_total") == loaded_before
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert runner.same_outputs(g, w) is None, f"request {i}"


def test_after_vllms_prefix_cache_is_emptied_one_load_from_lmtier_is_shared_by_the_requests_of_a_prefix(
        engines: EngineSlot, tiny_model: str, tmp_path: Path) -> None:
    """vLLM's prefix cache emptied (a restart, an eviction) while lmtier holds a 512-token prefix:
    4 requests over it in one batch. The first loads it from lmtier into blocks vLLM caches from
    their allocation; the 3 others are served those blocks by vLLM's own cache in the same step.
    lmtier loads the prefix once, not 4 times, and the outputs are vLLM's own from its warm cache
    (the reference's prefix computed by the same storing prompt, so both read the same K/V).
    This is what lets lmtier with vLLM's prefix cache match vLLM's warm cache (no copy per request
    for attention to read; benchmarks/vllm_serve.py's ``lmtier+prefix-cache-reset``)."""
    import random

    rng = random.Random(79)
    prefix = [rng.randrange(3, 2000) for _ in range(512)]
    storing = prefix + [rng.randrange(3, 2000) for _ in range(200)]
    prompts = [prefix + [rng.randrange(3, 2000) for _ in range(200 + i)] for i in range(4)]
    engines.close()
    reference = runner.make_llm(tiny_model, enable_prefix_caching=True)
    try:
        runner.generate(reference, [storing])
        want = runner.generate(reference, prompts)
    finally:
        runner.shutdown(reference)
    assert [r.num_cached_tokens for r in want] == [512] * 4  # the reference's cache was warm
    llm = engines.open("prefix-cache-reset", tier_config(tmp_path / "disk"), enable_prefix_caching=True)
    try:
        runner.generate(llm, [storing])
        assert llm.reset_prefix_cache()
        engines.overwrite_kv_cache()  # freed blocks no longer hold the prefix: what is read was loaded
        loaded_before = metric("lmtier_loaded_tokens_total")
        got = runner.generate(llm, prompts)
        loaded = metric("lmtier_loaded_tokens_total") - loaded_before
    finally:
        engines.close()
    assert loaded == 512  # one copy, for the first request; vLLM shares it with the other three
    assert [r.num_cached_tokens for r in got] == [512] * 4
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert runner.same_outputs(g, w) is None, f"request {i}"


# -- configuration and statistics (no engine) ------------------------------------------------------
def test_connector_config_inline_from_a_yaml_path_or_from_lmtier_config(tmp_path: Path) -> None:
    from lmtier.errors import ConfigError
    from lmtier.integrations.vllm import load_connector_config

    inline = {"chunk_tokens": 512, "tiers": [{"name": "hot", "backend": "cpu"}]}
    cfg, opts = load_connector_config({**inline, "save_tail": False}, env={})
    assert cfg.chunk_tokens == 512 and [t.name for t in cfg.tiers] == ["hot"] and opts["save_tail"] is False
    path = tmp_path / "lmtier.yaml"
    path.write_text("chunk_tokens: 384\ntiers:\n  - {name: ram, backend: cpu}\n")
    cfg, _ = load_connector_config({"config": str(path)}, env={})
    assert cfg.chunk_tokens == 384 and cfg.tiers[0].name == "ram"
    cfg, _ = load_connector_config(None, env={"LMTIER_CONFIG": str(path)})
    assert cfg.chunk_tokens == 384
    cfg, _ = load_connector_config({}, env={})  # the embedded default: cpu + disk
    assert [t.backend for t in cfg.tiers] == ["cpu", "disk"]
    with pytest.raises(ConfigError, match="not both"):
        load_connector_config({"config": str(path), **inline}, env={})
    with pytest.raises(ConfigError, match="unknown key"):
        load_connector_config({"tier": []}, env={})


def test_connector_stats_sum_across_roles_and_report_the_hit_ratio() -> None:
    from lmtier.integrations.vllm import LMTierConnector, LMTierConnectorStats

    sched = LMTierConnectorStats()
    sched.add("requests", 2)
    sched.add("requested_tokens", 1600)
    sched.add("hit_tokens", 768)
    worker = LMTierConnector.build_kv_connector_stats({"stored_tokens": 768, "failed_tokens": 0})
    assert worker is not None and not worker.is_empty()
    total = worker.aggregate(sched)
    assert total.reduce() == {"requests": 2, "requested_tokens": 1600, "hit_tokens": 768, "loaded_tokens": 0,
                              "failed_tokens": 0, "stored_tokens": 768, "hit_ratio": 0.48}
    total.reset()
    assert total.is_empty() and LMTierConnectorStats().reduce()["hit_ratio"] == 0.0


# -- the demo (last: it needs the process to itself) -----------------------------------------------
def test_the_demo_compares_three_runs_and_checks_the_outputs(
        engines: EngineSlot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from lmtier.demo import run_demo

    engines.close()  # the demo opens its own engines, one at a time
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")  # what the demo would set for good
    logger = logging.getLogger("lmtier")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    rc = run_demo(["--preset", "test", "--prompts", "2", "--tokens", "700", "--max-tokens", "4",
                   "--dir", str(tmp_path / "disk")])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "lmtier demo: OK: outputs identical to vLLM without lmtier" in out
    assert re.search(r"lmtier, second run .* 1280 .* identical", out)  # 2 x (2 chunks + 1-block tail)
    assert "Stored 640 of 640 tokens for request" in out
    assert re.search(r"Request \S+: total 700 tokens, hit 640 \(640 from local\), need to load 640", out)
