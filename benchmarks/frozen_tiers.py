"""The frozen-tier table: worst store / lookup / retrieve time through KVCacheEngine per remote tier.

For each remote tier kind (``redis``: redis-server; ``s3``: SeaweedFS; ``nixl-obj``: NIXL's OBJ
plugin on SeaweedFS) behind a cpu tier, an engine on a vLLM-CPU paged layout is timed in three
states of the remote server: **running**, **frozen** (``SIGSTOP``: the TCP connection stays open
and nothing answers — a fork/save pause, a partition, an overloaded server) and **killed**
(``SIGKILL``: connections refused). Each round of a state gets a fresh engine (empty cpu tier,
closed circuits, opened while the server runs) over a remote tier seeded beforehand, and calls,
in round ``r`` starting with the ``r % 3``-th (so each kind of call is once the first to meet the
fault, before any circuit opened):

* ``store``: ``engine.store`` of a new prompt, until it returns (the engine's critical path);
* ``lookup``: ``engine.lookup`` of a prompt held by the remote tier only;
* ``retrieve``: ``engine.retrieve`` of such a prompt's whole range (a lookup said "hit", then the
  tier froze or died before the load).

A kind may name several tiers joined by ``+`` (``redis+s3``: cpu -> redis -> s3), which are
frozen and killed together: a partition cutting the host off from both servers. Every call is
timed on its own; the table prints the worst and the median per state, next to the tier's
deadline for that kind of call (the target: worst <= deadline + 50 ms, however many froze). A call still
running after ``--cap`` seconds is reported as ``>cap`` (it goes on in the background). Nothing is
asserted. The same script runs against an older checkout (``PYTHONPATH=<checkout>``), which is how
the "before" column was measured; it needs only KVCacheEngine's store/lookup/retrieve.

    flock /tmp/lmtier-bench.lock env PYTHONPATH=. python benchmarks/frozen_tiers.py [--kinds redis,s3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from _common import fmt_seconds, machine_line, median, print_table

LAYERS, HEADS, BLOCK, HEAD = 8, 2, 128, 64  # vLLM's CPU layout, a tiny Llama: 64 KiB pages
CHUNK_TOKENS = 256
PROMPT_TOKENS = 2048  # 8 chunks of 1 MiB
BLOCKS = 256


def kv_namespace() -> Any:
    from lmtier.keys import KVNamespace

    page = HEADS * BLOCK * 2 * HEAD * 2
    return KVNamespace(model="frozen-bench", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=LAYERS,
                       block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, page_bytes=page,
                       chunk_tokens=CHUNK_TOKENS)


def kv_cache() -> list[Any]:
    import torch

    buf = torch.randn(LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD).to(torch.bfloat16)
    return list(buf.unbind(0))


def prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(3, 30000) for _ in range(PROMPT_TOKENS)]


def engine_for(remotes: list[Any], cap: float) -> Any:
    from prometheus_client import CollectorRegistry

    from lmtier.engine import KVCacheEngine

    config = {"chunk_tokens": CHUNK_TOKENS, "host_pool_bytes": 64 << 20, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": 256 << 20}},
        *(remote.tier(f"remote{i}" if i else "remote") for i, remote in enumerate(remotes))]}
    return KVCacheEngine(config, kv_namespace(), metrics_registry=CollectorRegistry(), load_timeout_s=cap)


def timed(pool: concurrent.futures.ThreadPoolExecutor, fn: Any, cap: float) -> float:
    """Seconds ``fn()`` took, or ``inf`` when still running after ``cap`` seconds."""
    t0 = time.perf_counter()
    fut = pool.submit(fn)
    try:
        fut.result(timeout=cap)
    except concurrent.futures.TimeoutError:
        return float("inf")
    return time.perf_counter() - t0


def run_kind(kind: str, args: argparse.Namespace, rng: random.Random) -> dict[str, dict[str, list[float]]]:
    from contextlib import ExitStack

    from tests.support.remote_tiers import RemoteTier

    blocks = list(range(PROMPT_TOKENS // BLOCK))
    cache = kv_cache()
    out: dict[str, dict[str, list[float]]] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="frozen-bench")
    with tempfile.TemporaryDirectory(prefix="frozen-") as tmp, ExitStack() as stack:
        remotes = [stack.enter_context(RemoteTier(k, Path(tmp) / str(i))) for i, k in enumerate(kind.split("+"))]
        seeded = [prompt(rng) for _ in range(3 * args.rounds)]
        seeder = engine_for(remotes, args.cap)
        for p in seeded:
            seeder.store(p, cache, blocks)
        seeder.flush()
        seeder.close()
        ops = ("store", "lookup", "retrieve")
        for s, state in enumerate(("running", "frozen", "killed")):
            # one engine per round, opened while the server runs (a tier that is down at open is a
            # different case); in round r the fault meets op r % 3 first, so each op gets to be
            # the call that finds a frozen tier with its circuit still closed
            engines = [engine_for(remotes, args.cap) for _ in range(args.rounds)]
            for remote in remotes:
                if state == "frozen":
                    remote.freeze()
                elif state == "killed":
                    remote.kill()
            times: dict[str, list[float]] = {op: [] for op in ops}
            try:
                for r, engine in enumerate(engines):
                    p = seeded[s * args.rounds + r]
                    calls = {"store": partial(engine.store, prompt(rng), cache, blocks),
                             "lookup": partial(engine.lookup, p),
                             "retrieve": partial(engine.retrieve, p, cache, blocks)}
                    for op in ops[r % 3:] + ops[: r % 3]:
                        times[op].append(timed(pool, calls[op], args.cap))
            finally:
                for remote in remotes:
                    remote.thaw()
                for engine in engines:
                    pool.submit(engine.close).result()
            out[state] = times
            print(f"{kind:9s} {state:8s} " + "  ".join(
                f"{op} worst {fmt_seconds(max(v))} median {fmt_seconds(median(v))}" for op, v in times.items()),
                flush=True)
    pool.shutdown(wait=False)
    return out


def deadlines() -> dict[str, float] | None:
    """The default deadlines of the code under test (None: it has none)."""
    try:
        from lmtier.config import Deadlines  # type: ignore[attr-defined]
    except ImportError:
        return None
    d = Deadlines()
    return {"store": 0.0, "lookup": d.lookup, "retrieve": d.get}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="redis,s3,nixl-obj,redis+s3",
                    help="tier kinds, comma-separated; a+b: both tiers in one chain, frozen/killed together")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per state (3: each call first once)")
    ap.add_argument("--cap", type=float, default=180.0, help="stop waiting for one call after this long")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()
    from tests.support.remote_tiers import LOOPBACK_ENV, remote_available

    os.environ.update(LOOPBACK_ENV)
    logging.basicConfig(level=logging.ERROR)  # each fault logs a warning line; the table is the output
    import lmtier

    print(machine_line())
    print(f"lmtier from {Path(lmtier.__file__).parent}")
    rng = random.Random(20261207)
    results: dict[str, Any] = {}
    for kind in args.kinds.split(","):
        why = next((w for k in kind.split("+") if (w := remote_available(k))), None)
        if why:
            print(f"{kind}: skipped ({why})")
            continue
        results[kind] = run_kind(kind, args, rng)
    limits = deadlines()
    rows = []
    for kind, states in results.items():
        for state, times in states.items():
            rows.append([kind, state, *(f"{_fmt(max(v))} / {_fmt(median(v))}" for v in times.values())])
    headers = ["tier", "state", "store worst / median", "lookup worst / median", "retrieve worst / median"]
    print()
    print_table(headers, rows, title=f"{args.rounds} rounds per state; worst / median of single calls")
    if limits is not None:
        print(f"deadlines (defaults): lookup {limits['lookup']} s, get {limits['retrieve']} s; store waits on no tier")
    else:
        print("deadlines: none in this checkout (TierConfig.timeout_s defaults to None)")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "deadlines": limits, "rounds": args.rounds}, indent=1))


def _fmt(s: float) -> str:
    return ">cap" if s == float("inf") else fmt_seconds(s)


if __name__ == "__main__":
    sys.exit(main())
