"""``lmtier serve``: the slab data path, the control round trip, RAM shared by two engines, GPU copies.

Everything runs against a real server subprocess (``lmtier serve``) and real clients
(:class:`~lmtier.server.client.ServerStore`); every figure is a median of repeats, printed next
to its baseline measured in the same run. Nothing is asserted. Parts (``--part``, default all
that run here):

* ``data`` — bytes per second a client moves into slab slots (reserved) and out of them
  (leased) with torch copies, against the same copy between two private buffers of this
  process (the raw memcpy of the same bytes). Rounds alternate slab / raw so both see the same
  machine; the ratio is the median of per-round ratios. Also end to end: reserve + copy + commit
  and fetch + copy + release.
* ``control`` — one ``ServerStore.lookup`` of a 10,000-token prompt (40 chunk keys, all present),
  request to answer (goal < 1 ms), next to ``ping`` and the in-process manager's lookup of
  the same keys.
* ``ram`` — memory two engine processes use to cache the same chunks (each stores and reads
  them): each with its own in-process cpu tier (the engines' private memory growth), against both
  as clients of one server (their private growth + the server's + the slab's resident bytes).
  Goal: one copy instead of two.
* ``engine`` — what the server adds per request at the engine: ``KVCacheEngine.lookup`` and
  ``retrieve`` of a 3,000-token request on the demo model's CPU cache, in-process cpu tier vs
  ``lmtier serve``, taking turns.
* ``ttft`` (vLLM CPU) — ``make demo``'s workload (4 prompts x 3,000 tokens, the tiny ``demo``
  model): the time to first token of a first run (stores) and a second run on the same engine
  (loads from RAM: the in-process cpu tier, or the server's slab), with in-process tiers and
  with ``lmtier serve``, next to a baseline engine without lmtier; engines take turns within
  each round. Goal: second-run TTFT server / in-process <= 1.05, first runs alike.
* ``ttft-paired`` (vLLM CPU) — the same second-run TTFT with an in-process engine and a server
  engine alive at once, their second runs alternating (``--pairs``): each ratio compares two runs
  seconds apart, so the shared machine's load swings hit both sides alike.
* ``gpu`` (only where torch sees CUDA) — a Qwen3-8B-shaped paged cache on the GPU, 40 chunks of
  256 tokens, offloaded into reserved slab slots and onloaded from leases by the native kernel
  (the slab registered with ``cudaHostRegister`` in this process), against a pinned
  ``cudaMemcpy`` of the same bytes and against the in-process pinned host pool, same run;
  checks that the bytes come back equal.

    PYTHONPATH=. python benchmarks/server.py [--part data,control,ram,ttft] [--repeats 15] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.server, when run as a script

import numpy as np
import torch
from _common import (
    QWEN3_8B_CHUNK_BYTES,
    fmt_bytes,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    machine_line,
    median,
    print_table,
    rate,
)

from lmtier.keys import chunk_keys, make_namespace
from tests.server.serverproc import ServerProc, start_server, tiers_yaml

LOOKUP_GOAL_S = 1e-3
DATA_GOAL = 0.9
CHUNK_TOKENS = 256


@contextlib.contextmanager
def running_server(root: Path, slab: str) -> Iterator[ServerProc]:
    server = start_server(root, config=tiers_yaml(root, slab=slab, disk=False), name=f"bench-{slab}")
    try:
        yield server
    finally:
        server.close()


# -- data ---------------------------------------------------------------------------------------
def part_data(root: Path, repeats: int, chunk_bytes: int, chunks: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)  # the same copy on both sides; fewer threads, less noise here
    total = chunk_bytes * chunks
    slab = f"{(2 * total + (64 << 20)) >> 20}MiB"
    src = [torch.randint(0, 256, (chunk_bytes,), dtype=torch.uint8) for _ in range(chunks)]
    private = [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(chunks)]
    sink = [torch.empty(chunk_bytes, dtype=torch.uint8) for _ in range(chunks)]
    ns = make_namespace(bench="server-data")
    keys = chunk_keys(np.arange(CHUNK_TOKENS * chunks), ns, CHUNK_TOKENS)
    rows: dict[str, list[float]] = {k: [] for k in ("in_slab", "in_raw", "out_slab", "out_raw", "store", "fetch")}
    with running_server(root, slab) as server:
        store = server.store(fetch_timeout_s=30, commit_timeout_s=60)
        # one stored copy to read back; reservations to write into, held across rounds
        reserved = store.reserve([chunk_bytes] * chunks)
        assert all(c is not None for c in reserved), "the slab cannot hold the working set"
        store.put(list(zip(keys, src, strict=True))).result()
        leases = store.fetch(keys, [chunk_bytes] * chunks).result()
        assert all(c is not None for c in leases)
        slots_in = [c.tensor for c in reserved]
        slots_out = [c.tensor for c in leases]
        for dst, s in zip(private, src, strict=True):  # fault in every page before timing
            dst.copy_(s)
        for dst, s in zip(slots_in, src, strict=True):
            dst.copy_(s)

        def timed(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> float:
            t0 = time.perf_counter()
            for d, s in zip(dsts, srcs, strict=True):
                d.copy_(s)
            return time.perf_counter() - t0

        for _ in range(repeats):  # alternate within a round: both see the same machine
            rows["in_slab"].append(timed(slots_in, src))
            rows["in_raw"].append(timed(private, src))
            rows["out_slab"].append(timed(sink, slots_out))
            rows["out_raw"].append(timed(sink, private))
        for c in leases:
            c.release()
        for c in reserved:
            c.release()
        for _ in range(max(3, repeats // 3)):  # end to end: control + copies
            store.delete(keys)
            t0 = time.perf_counter()
            got = store.reserve([chunk_bytes] * chunks)
            for c, s in zip(got, src, strict=True):
                c.tensor.copy_(s)
            store.commit(list(zip(keys, got, strict=True))).result()
            rows["store"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = store.fetch(keys, [chunk_bytes] * chunks).result()
            for c, d in zip(got, sink, strict=True):
                d.copy_(c.tensor)
                c.release()
            rows["fetch"].append(time.perf_counter() - t0)
        store.close()
    ratio_in = median([r / s for s, r in zip(rows["in_slab"], rows["in_raw"], strict=True)])
    ratio_out = median([r / s for s, r in zip(rows["out_slab"], rows["out_raw"], strict=True)])
    table = [
        ["into slab slots (reserved)", fmt_rate(rate(total, median(rows["in_slab"]))),
         fmt_rate(rate(total, median(rows["in_raw"]))), fmt_ratio(ratio_in)],
        ["out of slab slots (leased)", fmt_rate(rate(total, median(rows["out_slab"]))),
         fmt_rate(rate(total, median(rows["out_raw"]))), fmt_ratio(ratio_out)],
        ["store: reserve+copy+commit", fmt_rate(rate(total, median(rows["store"]))),
         fmt_rate(rate(total, median(rows["in_raw"]))),
         fmt_ratio(median(rows["in_raw"]) / median(rows["store"]))],
        ["fetch: fetch+copy+release", fmt_rate(rate(total, median(rows["fetch"]))),
         fmt_rate(rate(total, median(rows["out_raw"]))),
         fmt_ratio(median(rows["out_raw"]) / median(rows["fetch"]))],
    ]
    print_table(["slab data path", "client", "raw memcpy", "ratio"], table,
                title=f"\n{chunks} chunks x {fmt_bytes(chunk_bytes)} ({fmt_bytes(total)}) per round, {threads} torch "
                      f"thread(s); medians of {repeats}, ratio = median of per-round ratios (goal >= {DATA_GOAL})")
    spread = [min(rows[k]) / max(rows[k]) for k in ("in_slab", "in_raw", "out_slab", "out_raw")]
    print(f"noise: fastest/slowest round per row {', '.join(f'{x:.2f}' for x in spread)}")
    return {"ratio_in": ratio_in, "ratio_out": ratio_out, "bytes": total,
            **{k: median(v) for k, v in rows.items()}}


# -- control ------------------------------------------------------------------------------------
def part_control(root: Path, repeats: int) -> dict[str, Any]:
    import asyncio

    from prometheus_client import CollectorRegistry

    from lmtier.manager import StorageManager

    tokens = np.random.default_rng(7).integers(0, 151_936, 10_000)
    ns = make_namespace(bench="server-lookup", model="Qwen/Qwen3-8B")
    keys = chunk_keys(tokens, ns, CHUNK_TOKENS, include_partial=True)
    with running_server(root, "64MiB") as server:
        store = server.store()
        store.put([(k, b"x" * 1024) for k in keys]).result()
        for _ in range(50):
            store.lookup(keys).result()

        def times(fn: Any) -> list[float]:
            out = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out

        lookups, pings = [], []
        for _ in range(5):  # alternate blocks: both see the same machine
            lookups += times(lambda: store.lookup(keys).result())
            pings += times(lambda: store._run(store._call("ping", lambda rid: __import__(
                "lmtier.server.protocol", fromlist=["Ping"]).Ping(id=rid), store._loop.time() + 5)))
        hits = store.lookup(keys).result().hit_chunks
        store.close()

    async def local() -> list[float]:
        mgr = await StorageManager.from_config(
            {"chunk_tokens": CHUNK_TOKENS, "tiers": [{"name": "hot", "backend": "cpu",
                                                      "options": {"max_bytes": "64MiB", "pinned": False}}]},
            metrics_registry=CollectorRegistry())
        await mgr.put([(k, b"x" * 1024) for k in keys])
        out = []
        for _ in range(5 * repeats):
            t0 = time.perf_counter()
            await mgr.lookup(keys)
            out.append(time.perf_counter() - t0)
        await mgr.aclose()
        return out

    in_process = asyncio.run(local())
    rows = [["ServerStore.lookup (40 keys, all hit)", fmt_seconds(median(lookups)),
             "goal < 1 ms" if median(lookups) < LOOKUP_GOAL_S else "ABOVE the 1 ms goal"],
            ["ServerStore ping (empty round trip)", fmt_seconds(median(pings)), ""],
            ["in-process StorageManager.lookup, same keys", fmt_seconds(median(in_process)), "reference"]]
    print_table(["control round trip (10,000-token prompt)", "median", ""], rows,
                title=f"\nmedians of {5 * repeats}; hit {hits} of {len(keys)} chunks")
    return {"lookup_s": median(lookups), "ping_s": median(pings), "in_process_lookup_s": median(in_process),
            "keys": len(keys)}


# -- ram ----------------------------------------------------------------------------------------
ENGINE = textwrap.dedent("""
    import asyncio, sys, numpy as np
    from lmtier.keys import chunk_keys, make_namespace
    mode, arg, chunk_bytes, chunks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    keys = chunk_keys(np.arange(256 * chunks), make_namespace(bench="server-ram"), 256)
    if mode == "local":
        from lmtier.manager import StorageManager
        async def main():
            mgr = await StorageManager.from_config({"chunk_tokens": 256, "tiers": [
                {"name": "hot", "backend": "cpu", "options": {"max_bytes": arg, "pinned": False}}]})
            print("READY", flush=True); sys.stdin.readline()
            hot = mgr.tiers[0].backend   # as the engine stores: pages copied into hot-tier buffers
            bufs = [hot.allocate(chunk_bytes) for _ in keys]
            for i, b in enumerate(bufs):
                b.tensor.fill_(i % 251)
            await mgr.put(list(zip(keys, bufs)))
            for b in bufs:
                b.release()
            for v in await mgr.get(keys):   # what a retrieve reads
                assert v is not None
            print("STORED", flush=True); sys.stdin.readline()
        asyncio.run(main())
    else:
        from lmtier.server.client import ServerStore
        store = ServerStore(arg, register_cuda=False, commit_timeout_s=120, fetch_timeout_s=120,
                            lookup_timeout_s=30, reserve_timeout_s=30)  # RAM is measured here, not latency
        import time, torch
        while not store.connected:   # the slab mapped and torch warmed up before the baseline is taken,
            time.sleep(0.01)          # as the local engine's tier is open before it (growth = caching only)
        torch.zeros(1, dtype=torch.uint8).fill_(1)
        store.lookup(keys[:1]).result()
        print("READY", flush=True); sys.stdin.readline()
        if store.lookup(keys).result().hit_chunks < chunks:   # engine B finds what engine A stored
            slots = store.reserve([chunk_bytes] * chunks)    # as the engine stores: pages into slots
            for i, c in enumerate(slots):
                c.tensor.fill_(i % 251)
            store.commit(list(zip(keys, slots))).result()
        leases = store.fetch(keys, [chunk_bytes] * chunks).result()   # what a retrieve reads in place
        total = sum(int(np.frombuffer(l.view(), np.uint8)[::4096].sum()) for l in leases)  # touch every page
        for l in leases:
            l.release()
        print("STORED", flush=True); sys.stdin.readline()
        store.close()
""")


def anon_bytes(pid: int) -> int:
    """Private anonymous memory of ``pid`` (heap, torch tensors; not the shared slab)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    return 0


def slab_resident(pid: int) -> int:
    """Bytes resident in the server's slab (its memfd), wherever they are mapped."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith("/memfd:lmtier-slab-"):
                return os.stat(fd).st_blocks * 512
    return 0


def part_ram(root: Path, chunk_bytes: int, chunks: int) -> dict[str, Any]:
    total = chunk_bytes * chunks
    tier = f"{(total + (4 << 20)) >> 20}MiB"  # the set and a little headroom
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def engines(mode: str, arg: str) -> int:
        """Anonymous memory the two engines gained by caching (and reading) the set."""
        procs = [subprocess.Popen([sys.executable, "-c", ENGINE, mode, arg, str(chunk_bytes), str(chunks)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        try:
            for p in procs:
                assert p.stdout is not None and p.stdout.readline().strip() == "READY"
            before = sum(anon_bytes(p.pid) for p in procs)
            for p in procs:  # one after the other: engine B finds what A stored (server mode)
                assert p.stdin is not None and p.stdout is not None
                p.stdin.write("\n")
                p.stdin.flush()
                assert p.stdout.readline().strip() == "STORED"
            return sum(anon_bytes(p.pid) for p in procs) - before
        finally:
            for p in procs:
                with contextlib.suppress(Exception):
                    assert p.stdin is not None
                    p.stdin.write("\n")
                    p.stdin.close()
                p.wait(60)
                if p.stdout is not None:
                    p.stdout.close()

    local = engines("local", tier)
    with running_server(root, tier) as server:
        server_anon = anon_bytes(server.pid)
        clients = engines("server", server.address)
        slab = slab_resident(server.pid)
        server_growth = anon_bytes(server.pid) - server_anon
    shared = slab + clients + server_growth
    rows = [["two engines, each its own cpu tier", fmt_bytes(local), "-", f"{local / total:.2f}"],
            ["two engines on one lmtier serve", fmt_bytes(clients + server_growth), fmt_bytes(slab),
             f"{shared / total:.2f}"]]
    print_table(["RAM for the same cached set", "private growth", "shared slab", "copies"], rows,
                title=f"\ncached set: {chunks} chunks x {fmt_bytes(chunk_bytes)} = {fmt_bytes(total)}, stored and "
                      "read by both engines; 'copies' = (private growth + slab) / cached set")
    print(f"the slab ({tier}) is committed whole at the server's start; size it for the node's working set")
    return {"cached_bytes": total, "local_bytes": local, "server_private_bytes": clients + server_growth,
            "server_slab_bytes": slab, "local_copies": local / total, "server_copies": shared / total}


# -- engine -------------------------------------------------------------------------------------
def part_engine(root: Path, repeats: int) -> dict[str, Any]:
    """KVCacheEngine lookup + retrieve of a 3,000-token request: in-process cpu tier vs lmtier serve."""
    from prometheus_client import CollectorRegistry

    from lmtier.engine import KVCacheEngine
    from lmtier.keys import KVNamespace

    layers, blocks, heads, blk, head = 4, 200, 2, 128, 64  # the demo model's cache, vLLM CPU layout
    ns = KVNamespace(model="bench", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=layers,
                     block_size=blk, num_kv_heads=heads, head_size=head, page_bytes=heads * blk * 2 * head * 2,
                     chunk_tokens=CHUNK_TOKENS)
    src = list(torch.randn(layers, blocks, heads, blk, 2 * head).to(torch.bfloat16).unbind(0))
    dst = [torch.zeros_like(x) for x in src]
    toks = np.random.default_rng(3).integers(3, 2000, 3000).tolist()
    times: dict[str, dict[str, list[float]]] = {}
    with running_server(root, "256MiB") as server:
        configs = {"in-process": {"chunk_tokens": CHUNK_TOKENS, "tiers": [
                       {"name": "hot", "backend": "cpu", "options": {"max_bytes": "256MiB", "pinned": False}}]},
                   "lmtier serve": {"chunk_tokens": CHUNK_TOKENS, "server": server.address}}
        engines = {k: KVCacheEngine(c, ns, metrics_registry=CollectorRegistry(), name=f"bench-{i}")
                   for i, (k, c) in enumerate(configs.items())}
        try:
            for e in engines.values():
                e.store(toks, src, list(range(24))).wait()
                e.flush(30)
            for name in engines:
                times[name] = {"lookup": [], "retrieve": []}
            for _ in range(repeats):  # the two take turns
                for name, e in engines.items():
                    t0 = time.perf_counter()
                    hit = e.lookup(toks)
                    t1 = time.perf_counter()
                    loaded = e.retrieve(toks, dst, list(range(30, 54)), end=hit)
                    t2 = time.perf_counter()
                    assert hit == loaded == 2944, (name, hit, loaded)
                    times[name]["lookup"].append(t1 - t0)
                    times[name]["retrieve"].append(t2 - t1)
        finally:
            for e in engines.values():
                e.close()
    rows = [[name, fmt_seconds(median(t["lookup"])), fmt_seconds(median(t["retrieve"]))] for name, t in times.items()]
    print_table(["KVCacheEngine, 3,000-token request (2,944 hit)", "lookup", "retrieve"], rows,
                title=f"\nthe demo model's cache (4 layers, 12 chunks, 6 MB), medians of {repeats}, taking turns")
    return {name: {k: median(v) for k, v in t.items()} for name, t in times.items()}


# -- ttft ---------------------------------------------------------------------------------------
TTFT_ENGINE = textwrap.dedent("""
    import json, os, statistics, sys, time
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1",
                       "VLLM_LOGGING_LEVEL": "ERROR"})
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    model, lmtier, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    second_runs = int(sys.argv[5])
    kwargs = {}
    if lmtier is not None:
        from vllm.config import KVTransferConfig
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=lmtier)
    llm = LLM(model=model, dtype="bfloat16", max_model_len=max(map(len, prompts)) + max_tokens + 16, seed=0,
              enforce_eager=True, disable_log_stats=False, enable_prefix_caching=False, **kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 6, 7])], params, use_tqdm=False)  # warm-up
    runs = []
    for _ in range(1 + second_runs):  # first run (stores), second runs (load: the RAM tier / the server's slab)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        runs.append({"ttft": statistics.median(float(o.metrics.first_token_latency) for o in outs),
                     "cached": sum(int(o.num_cached_tokens or 0) for o in outs)})
        if lmtier is not None:
            from vllm.distributed.kv_transfer import get_kv_transfer_group
            engine = get_kv_transfer_group().engine
            if engine is not None:
                engine.flush(60)
    llm.llm_engine.engine_core.shutdown()
    print("@@" + json.dumps(runs), flush=True)
""")


def part_ttft(root: Path, rounds: int, n_prompts: int, tokens: int, second_runs: int) -> dict[str, Any]:
    from lmtier.demo import TINY_PRESETS, build_tiny_llama, make_prompts

    model = str(build_tiny_llama(TINY_PRESETS["demo"]))
    prompts = make_prompts(model, n_prompts, tokens)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def engine(lmtier: dict[str, Any] | None) -> list[dict[str, float]]:
        done = subprocess.run([sys.executable, "-c", TTFT_ENGINE, model, json.dumps(lmtier), json.dumps(prompts), "8",
                               str(second_runs)],
                              capture_output=True, text=True, env=env, timeout=900)
        line = next((x for x in done.stdout.splitlines() if x.startswith("@@")), None)
        if line is None:
            raise RuntimeError(f"engine failed ({done.returncode}):\n{done.stderr[-3000:]}")
        runs: list[dict[str, float]] = json.loads(line[2:])
        return runs

    rows: dict[str, list[float]] = {k: [] for k in ("base", "local1", "local2", "server1", "server2")}
    cached = {"local": 0.0, "server": 0.0}
    loads: list[float] = []
    for r in range(rounds):  # modes take turns within each round: they see the same machine
        loads.append(os.getloadavg()[0])
        base = engine(None)
        rows["base"].append(base[0]["ttft"])
        local_cfg = {"chunk_tokens": 256, "tiers": [
            {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1GiB"}},
            {"name": "local", "backend": "disk", "options": {"root": str(root / f"disk-{r}"), "max_bytes": "4GiB"}}]}
        local = engine(local_cfg)
        rows["local1"].append(local[0]["ttft"])
        rows["local2"].append(median([x["ttft"] for x in local[1:]]))
        cached["local"] = local[1]["cached"]
        where = root / f"server-{r}"
        where.mkdir()
        with running_server(where, "1GiB") as server:
            remote = engine({"chunk_tokens": 256, "server": server.address})
        rows["server1"].append(remote[0]["ttft"])
        rows["server2"].append(median([x["ttft"] for x in remote[1:]]))
        cached["server"] = remote[1]["cached"]
        print(f"round {r + 1}/{rounds} (load {loads[-1]:.1f}): TTFT baseline {fmt_seconds(rows['base'][-1])}; "
              f"in-process {fmt_seconds(rows['local1'][-1])} / {fmt_seconds(rows['local2'][-1])}; "
              f"server {fmt_seconds(rows['server1'][-1])} / {fmt_seconds(rows['server2'][-1])}; second run "
              f"server / in-process {fmt_ratio(rows['server2'][-1] / rows['local2'][-1])}", flush=True)
    med = {k: median(v) for k, v in rows.items()}
    ratio2 = median([s / loc for s, loc in zip(rows["server2"], rows["local2"], strict=True)])
    first_local = median([b / x for b, x in zip(rows["base"], rows["local1"], strict=True)])
    first_server = median([b / x for b, x in zip(rows["base"], rows["server1"], strict=True)])
    table = [["baseline (no lmtier)", fmt_seconds(med["base"]), "-", "-"],
             ["in-process tiers: first run / second run", fmt_seconds(med["local1"]), fmt_seconds(med["local2"]),
              f"{int(cached['local'])}"],
             ["lmtier serve: first run / second run", fmt_seconds(med["server1"]), fmt_seconds(med["server2"]),
              f"{int(cached['server'])}"]]
    print_table(["TTFT p50, demo workload (vLLM CPU)", "first run", "second run", "hit tokens (2nd)"], table,
                title=f"\n{n_prompts} prompts x {tokens} tokens, tiny 'demo' model, {rounds} rounds (modes take turns), "
                      f"second run = median of {second_runs} per engine")
    print(f"second-run TTFT server / in-process: {fmt_ratio(ratio2)} (goal <= 1.05); first run vs baseline: "
          f"in-process {fmt_ratio(first_local)}, server {fmt_ratio(first_server)} (baseline TTFT / run TTFT)")
    per_round = [s / loc for s, loc in zip(rows["server2"], rows["local2"], strict=True)]
    print("per round, second run server / in-process: " + ", ".join(fmt_ratio(r) for r in per_round))
    print("load average (1 min) at each round's start: " + ", ".join(f"{x:.1f}" for x in loads))
    return {"load": loads, "ratio_second": ratio2, "first_local": first_local, "first_server": first_server,
            **{k: v for k, v in med.items()}, "cached": cached, "rounds": rows, "ratio_second_per_round": per_round}


PAIRED_ENGINE = textwrap.dedent("""
    import json, os, statistics, sys
    os.environ.update({"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1",
                       "VLLM_LOGGING_LEVEL": "ERROR"})
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt
    model, lmtier, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=model, dtype="bfloat16", max_model_len=max(map(len, prompts)) + 24, seed=0, enforce_eager=True,
              disable_log_stats=False,
              enable_prefix_caching=False, kv_transfer_config=KVTransferConfig(
                  kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
                  kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=lmtier))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 6, 7])], params, use_tqdm=False)  # warm-up
    print("@@ready", flush=True)
    for line in sys.stdin:   # one batch of the prompts per line: the first stores, the rest load
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        get_kv_transfer_group().engine.flush(60)
        print("@@" + json.dumps({"ttft": statistics.median(float(o.metrics.first_token_latency) for o in outs),
                                 "cached": sum(int(o.num_cached_tokens or 0) for o in outs)}), flush=True)
    llm.llm_engine.engine_core.shutdown()
""")


def part_ttft_paired(root: Path, pairs: int, n_prompts: int, tokens: int) -> dict[str, Any]:
    """Second-run TTFT with both engines alive at once, their runs alternating: each pair's ratio
    compares two runs seconds apart, so a change of the shared machine's load hits both."""
    from lmtier.demo import TINY_PRESETS, build_tiny_llama, make_prompts

    model = str(build_tiny_llama(TINY_PRESETS["demo"]))
    prompts = make_prompts(model, n_prompts, tokens)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with running_server(root, "1GiB") as server:
        configs = {"in-process": {"chunk_tokens": 256, "tiers": [
                       {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1GiB"}}]},
                   "server": {"chunk_tokens": 256, "server": server.address}}
        procs = {k: subprocess.Popen([sys.executable, "-c", PAIRED_ENGINE, model, json.dumps(c), json.dumps(prompts)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=(root / f"{k}.log").open("w"), text=True, env=env)
                 for k, c in configs.items()}

        def answer(name: str) -> Any:
            out = procs[name].stdout
            assert out is not None
            for line in out:
                if line.startswith("@@"):
                    return line[2:].strip() if line.startswith("@@ready") else json.loads(line[2:])
            raise RuntimeError(f"{name} engine exited with {procs[name].wait()}:\n"
                               f"{(root / f'{name}.log').read_text()[-3000:]}")

        def run(name: str) -> dict[str, float]:
            stdin = procs[name].stdin
            assert stdin is not None
            stdin.write("go\n")
            stdin.flush()
            got: dict[str, float] = answer(name)
            return got

        try:
            for name in procs:
                answer(name)  # ready
            first = {name: run(name) for name in procs}  # stores
            times: dict[str, list[float]] = {name: [] for name in procs}
            cached: dict[str, float] = {}
            for i in range(pairs):
                for name in (list(procs) if i % 2 == 0 else list(procs)[::-1]):  # the order alternates
                    got = run(name)
                    times[name].append(got["ttft"])
                    cached[name] = got["cached"]
        finally:
            for p in procs.values():
                with contextlib.suppress(Exception):
                    assert p.stdin is not None
                    p.stdin.close()
                p.wait(120)
                if p.stdout is not None:
                    p.stdout.close()
    ratios = [s / loc for s, loc in zip(times["server"], times["in-process"], strict=True)]
    rows = [[name, fmt_seconds(first[name]["ttft"]), fmt_seconds(median(times[name])), f"{int(cached[name])}"]
            for name in procs]
    print_table(["TTFT, both engines alive, runs alternating", "first run", "second run p50", "hit tokens"], rows,
                title=f"\n{n_prompts} prompts x {tokens} tokens, tiny 'demo' model, {pairs} pairs")
    print(f"second-run TTFT server / in-process: {fmt_ratio(median(ratios))} (median of {pairs} paired ratios, "
          f"middle half {fmt_ratio(float(np.percentile(ratios, 25)))}-{fmt_ratio(float(np.percentile(ratios, 75)))}; "
          f"goal <= 1.05); load average now {os.getloadavg()[0]:.1f}")
    return {"ratio_second": median(ratios), "ratios": ratios, "times": times, "first": first, "cached": cached}


# -- gpu ----------------------------------------------------------------------------------------
def part_gpu(root: Path, repeats: int, chunks: int) -> dict[str, Any]:
    from lmtier.memory import HostMemoryPool
    from lmtier.transfer import chunk_nbytes, describe_layout, offload, onload

    layers, pages, inner = 36, CHUNK_TOKENS // 16, (2, 16, 8, 128)  # Qwen3-8B, flashinfer layout
    blocks = chunks * pages * 2 + 8
    per_block = int(np.prod(inner))
    raw = torch.randint(0, 256, (layers * blocks * per_block * 2,), dtype=torch.uint8, device="cuda")
    big = raw.view(torch.bfloat16).view(layers, blocks, *inner)
    kv = [big[i] for i in range(layers)]
    layout = describe_layout(kv[0], "flashinfer")
    nbytes = chunk_nbytes(layout, layers, pages)
    total = nbytes * chunks
    perm = torch.randperm(blocks)[: chunks * pages * 2].tolist()
    src_ids = [perm[i * pages:(i + 1) * pages] for i in range(chunks)]
    dst_ids = [perm[(chunks + i) * pages:(chunks + i + 1) * pages] for i in range(chunks)]
    ns = make_namespace(bench="server-gpu")
    keys = chunk_keys(np.arange(CHUNK_TOKENS * chunks), ns, CHUNK_TOKENS)

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        return median(out)

    pinned_host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    dev = torch.randint(0, 256, (total,), dtype=torch.uint8, device="cuda")
    memcpy_d2h = timed(lambda: pinned_host.copy_(dev, non_blocking=True))
    memcpy_h2d = timed(lambda: dev.copy_(pinned_host, non_blocking=True))
    pool = HostMemoryPool(total + (1 << 20), pin=True, name="bench-pinned")
    bufs = [pool.allocate(nbytes) for _ in range(chunks)]
    local_d2h = timed(lambda: offload(kv, layout, src_ids, [b.tensor for b in bufs]))
    local_h2d = timed(lambda: onload(kv, layout, dst_ids, [b.tensor for b in bufs]))
    for b in bufs:
        b.release()
    slab = f"{(total + (256 << 20)) >> 20}MiB"
    os.environ["LMTIER_REQUIRE_NATIVE"] = "1"
    with running_server(root, slab) as server:
        from lmtier.server.client import ServerStore

        t0 = time.perf_counter()
        store = ServerStore(server.address, register_cuda=True, connect_timeout_s=30, commit_timeout_s=60,
                            fetch_timeout_s=60)
        deadline = time.monotonic() + 120
        while not store.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        register_s = time.perf_counter() - t0
        reserved = store.reserve([nbytes] * chunks)
        assert all(c is not None for c in reserved)
        slots = [c.tensor for c in reserved]
        slab_d2h = timed(lambda: offload(kv, layout, src_ids, slots))
        torch.cuda.synchronize()
        assert store.commit(list(zip(keys, reserved, strict=True))).result() == chunks
        leases = store.fetch(keys, [nbytes] * chunks).result()
        assert all(c is not None for c in leases)
        lease_tensors = [c.tensor for c in leases]
        slab_h2d = timed(lambda: onload(kv, layout, dst_ids, lease_tensors))
        torch.cuda.synchronize()
        flat_src = torch.tensor([b for ids in src_ids for b in ids], device="cuda")
        flat_dst = torch.tensor([b for ids in dst_ids for b in ids], device="cuda")
        # as integers: random bytes seen as bf16 hold NaNs, which never equal themselves
        equal = all(torch.equal(layer[flat_src].view(torch.int16), layer[flat_dst].view(torch.int16)) for layer in kv)
        for c in leases:
            c.release()
        status = server.status()
        store.close()
    rows = [["slab (cudaHostRegister, other process's memfd)", fmt_rate(rate(total, slab_d2h)),
             fmt_rate(rate(total, slab_h2d)), fmt_ratio(memcpy_d2h / slab_d2h), fmt_ratio(memcpy_h2d / slab_h2d)],
            ["in-process pinned pool", fmt_rate(rate(total, local_d2h)), fmt_rate(rate(total, local_h2d)),
             fmt_ratio(memcpy_d2h / local_d2h), fmt_ratio(memcpy_h2d / local_h2d)],
            ["pinned cudaMemcpy (the link)", fmt_rate(rate(total, memcpy_d2h)), fmt_rate(rate(total, memcpy_h2d)),
             "1.00x", "1.00x"]]
    print_table(["GPU pages <-> host", "D2H", "H2D", "D2H/memcpy", "H2D/memcpy"], rows,
                title=f"\n{torch.cuda.get_device_name()}: {chunks} chunks x {fmt_bytes(nbytes)} ({fmt_bytes(total)}), "
                      f"native kernel, CUDA-event medians of {repeats}")
    print(f"round trip through the slab: bytes equal = {equal}; slab {slab} registered + connected in "
          f"{register_s:.2f} s; server leases after release: {status['leases']}")
    return {"device": torch.cuda.get_device_name(), "bytes": total, "equal": equal, "register_s": register_s,
            "slab_d2h_gbps": rate(total, slab_d2h) / 1e9, "slab_h2d_gbps": rate(total, slab_h2d) / 1e9,
            "local_d2h_gbps": rate(total, local_d2h) / 1e9, "local_h2d_gbps": rate(total, local_h2d) / 1e9,
            "memcpy_d2h_gbps": rate(total, memcpy_d2h) / 1e9, "memcpy_h2d_gbps": rate(total, memcpy_h2d) / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="", help="comma list of data,control,ram,gpu (default: all that run here)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--chunk-bytes", type=int, default=QWEN3_8B_CHUNK_BYTES // 9, help="bytes per chunk (data, ram)")
    ap.add_argument("--chunks", type=int, default=16, help="chunks per round (data, ram)")
    ap.add_argument("--gpu-chunks", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="ttft: engine rounds (3 engines each)")
    ap.add_argument("--second-runs", type=int, default=3,
                    help="ttft: second runs per engine, each loading the same prompts again (their median counts)")
    ap.add_argument("--pairs", type=int, default=15, help="ttft-paired: alternating second-run pairs")
    ap.add_argument("--prompts", type=int, default=4, help="ttft: prompts (the demo's 4)")
    ap.add_argument("--tokens", type=int, default=3000, help="ttft: tokens per prompt (the demo's 3000)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the data part's copies (default 1)")
    ap.add_argument("--out", help="write server.json here")
    args = ap.parse_args()
    parts = [p for p in args.part.split(",") if p] or (
        ["data", "control", "ram", "gpu"] if torch.cuda.is_available() else ["data", "control", "ram", "engine", "ttft"])
    print(machine_line())
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lmtier-bench-server-") as tmp:
        root = Path(tmp)
        for part in parts:
            where = root / part
            where.mkdir()
            if part == "data":
                results[part] = part_data(where, args.repeats, args.chunk_bytes, args.chunks, args.threads)
            elif part == "control":
                results[part] = part_control(where, max(50, args.repeats * 20))
            elif part == "ram":
                results[part] = part_ram(where, args.chunk_bytes, args.chunks)
            elif part == "engine":
                results[part] = part_engine(where, max(30, args.repeats * 3))
            elif part == "ttft":
                results[part] = part_ttft(where, args.rounds, args.prompts, args.tokens, args.second_runs)
            elif part == "ttft-paired":
                results[part] = part_ttft_paired(where, args.pairs, args.prompts, args.tokens)
            elif part == "gpu":
                results[part] = part_gpu(where, args.repeats, args.gpu_chunks)
            else:
                ap.error(f"unknown part {part!r}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "server.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
