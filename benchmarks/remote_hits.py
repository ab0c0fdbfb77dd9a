"""Remote hits: host bytes copied per byte served, and retrieve throughput vs the tier's raw client.

For each remote tier kind (``redis``, ``s3`` on SeaweedFS, ``nixl-obj``: NIXL's OBJ plugin on
SeaweedFS) behind a cpu tier, prompts stored in the remote tier only (4 MiB chunks, 64 MiB per
prompt) are read by the engine's get stage — ``start_retrieve`` until the host chunks the onload
would read are ready (``RetrieveHandle._resolve``: the fetch and any host copy after it; no onload)
— and the same objects with the tier's raw client (redis-py ``GET`` one by one; boto3
``get_object().read()`` on as many threads as the tier uses), alternating which goes first, one
prompt per repeat. Printed: MB/s of both (medians) and the median of the per-repeat ratios; and,
for context, a whole ``retrieve`` into a vLLM-CPU paged KV cache (its onload on CPU is the torch
fallback copy, the same in every checkout).

**Copies per byte served** (one instrumented retrieve, not timed): every byte a tier call
returns or fills counts once (the receive into user memory: unavoidable), every byte the cpu
tier copies in when it takes a promotion (instead of adopting the buffer) counts once, and every
byte the onload reads from memory that is neither what the tier filled nor the cpu tier's own
counts once (a staging copy). Divided by the bytes onloaded. The goal is 1.0. With CUDA the
onload needs pinned memory; a receive buffer that is not pinned must then be staged:
``--simulate-pinned`` applies that rule on a CPU-only machine to checkouts that decide it in
``KVCacheEngine._cuda_pool`` (the older engine), to show what the GPU path copies.

The same script runs against an older checkout (``PYTHONPATH=<checkout>``): it uses only
``KVCacheEngine`` (store/retrieve, ``.manager`` for the instrumentation).

    flock /tmp/lmtier-bench.lock env PYTHONPATH=. python benchmarks/remote_hits.py [--kinds redis] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import fmt_ratio, machine_line, median, print_table

LAYERS, HEADS, BLOCK, HEAD = 8, 4, 128, 128  # vLLM's CPU layout: 256 KiB pages
CHUNK_TOKENS = 256
PROMPT_TOKENS = 4096  # 16 chunks of 4 MiB
BLOCKS = PROMPT_TOKENS // BLOCK
MB = 1e6


def kv_namespace() -> Any:
    from lmtier.keys import KVNamespace

    return KVNamespace(model="remote-hits", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=LAYERS,
                       block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, page_bytes=HEADS * BLOCK * 2 * HEAD * 2,
                       chunk_tokens=CHUNK_TOKENS)


def engine_for(remote: Any) -> Any:
    from prometheus_client import CollectorRegistry

    from lmtier.engine import KVCacheEngine

    config = {"chunk_tokens": CHUNK_TOKENS, "host_pool_bytes": 256 << 20, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1GiB"}},
        remote.tier("remote", timeout_s=30)]}
    return KVCacheEngine(config, kv_namespace(), metrics_registry=CollectorRegistry())


def addr(value: Any) -> int:
    """Address of a host buffer's first byte."""
    import numpy as np

    from lmtier.memory import HostBuffer

    if isinstance(value, HostBuffer):
        return int(value.data_ptr)
    if hasattr(value, "data_ptr") and callable(value.data_ptr):
        return int(value.data_ptr())
    return int(np.frombuffer(value, dtype=np.uint8).ctypes.data)


def copies_per_byte(engine: Any, prompt: list[int], cache: list[Any], simulate_pinned: bool) -> dict[str, float]:
    """Instrument one retrieve (see the module doc); returns the counts and the ratio."""
    import lmtier.transfer as transfer
    from lmtier.buffers import as_bytes_view
    from lmtier.memory import HostBuffer

    remote = engine.manager.tier("remote").backend
    hot = engine.manager.tier("hot").backend
    filled: set[int] = set()
    counts = {"tier_read": 0, "promotion_copy": 0, "staging_copy": 0, "served": 0}
    orig = {"get": remote.get, "get_into": getattr(remote, "get_into", None), "put": hot.put, "onload": transfer.onload}

    async def get(keys: Any) -> Any:
        values = await orig["get"](keys)
        for v in values:
            if v is not None:
                filled.add(addr(v))
                counts["tier_read"] += as_bytes_view(v).nbytes
        return values

    async def get_into(keys: Any, outs: Any) -> Any:
        ok = await orig["get_into"](keys, outs)
        for o, hit in zip(outs, ok, strict=True):
            if hit:
                filled.add(addr(o))
                counts["tier_read"] += as_bytes_view(o).nbytes
        return ok

    async def put(items: Any) -> Any:
        for _, v in items:
            if not (isinstance(v, HostBuffer) and v.pool is hot.pool):  # adopted: no copy
                counts["promotion_copy"] += as_bytes_view(v).nbytes
        return await orig["put"](items)

    def onload(kv: Any, layout: Any, block_ids: Any, hosts: Any, **kw: Any) -> Any:
        layers = kw.get("layers")
        if layers is None or 0 in layers:  # count each chunk once (layer-wise calls repeat it)
            slab = (addr(hot.pool._slab), hot.pool.capacity)
            for h in hosts:
                a, n = addr(h), h.numel()
                counts["served"] += n
                if a not in filled and not slab[0] <= a < slab[0] + slab[1]:
                    counts["staging_copy"] += n
        return orig["onload"](kv, layout, block_ids, hosts, **kw)

    remote.get, hot.put, transfer.onload = get, put, onload
    if orig["get_into"] is not None:
        remote.get_into = get_into
    saved_cuda = getattr(type(engine), "_cuda_pool", None)
    if simulate_pinned and saved_cuda is not None:
        type(engine)._cuda_pool = lambda self: True  # the pinned-memory rule of a CUDA machine
    try:
        engine.retrieve(prompt, cache, list(range(BLOCKS)))
        engine.flush()  # background promotions
    finally:
        transfer.onload = orig["onload"]
        for name in ("get", "get_into", "put"):
            (remote if name != "put" else hot).__dict__.pop(name, None)
        if saved_cuda is not None:
            type(engine)._cuda_pool = saved_cuda
    served = counts["served"] or 1
    total = counts["tier_read"] + counts["promotion_copy"] + counts["staging_copy"]
    return {**counts, "copies_per_byte": total / served, "critical_path_copies_per_byte":
            (counts["tier_read"] + counts["staging_copy"]) / served}


def raw_reader(kind: str, remote: Any, engine: Any, threads: int) -> Callable[[list[Any]], int]:
    """A function reading the stored objects of ``keys`` with the raw client; returns bytes read."""
    backend = engine.manager.tier("remote").backend
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(remote.options()["url"])
        prefix = remote.options()["key_prefix"].encode()

        def read_redis(keys: list[Any]) -> int:
            values = [client.get(prefix + str(k).encode()) for k in keys]
            return sum(len(v) for v in values if v is not None)

        return read_redis
    ep = remote._server.endpoint
    s3 = ep.client(max_pool_connections=threads + 2)
    bucket = remote.options().get("bucket") or remote.options()["obj"]["bucket"]
    pool = ThreadPoolExecutor(threads)
    if kind == "s3":
        names = backend.object_name
    else:
        prefix = remote.options()["obj"]["prefix"]
        try:  # the shared object names (s3 and nixl-obj alike)
            from lmtier.kit import object_name
        except ImportError:  # an older checkout: NIXL's own <prefix><namespace>/<key>
            def names(k: Any) -> str:
                return f"{prefix}{k.namespace}/{k}"
        else:
            def names(k: Any) -> str:
                return object_name(prefix, k)

    def read_s3(keys: list[Any]) -> int:
        got = list(pool.map(lambda k: s3.get_object(Bucket=bucket, Key=names(k))["Body"].read(), keys))
        return sum(len(g) for g in got)

    return read_s3


def run_kind(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lmtier.keys import chunk_keys
    from tests.support.remote_tiers import RemoteTier

    rng = random.Random(7)
    cache = list(torch.randn(LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD).to(torch.bfloat16).unbind(0))
    prompts = [[rng.randrange(3, 30000) for _ in range(PROMPT_TOKENS)] for _ in range(2 * args.repeats + 2)]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=f"hits-{kind}-") as tmp, RemoteTier(kind, tmp) as remote:
        seeder = engine_for(remote)
        for p in prompts:
            seeder.store(p, cache, list(range(BLOCKS)))
        seeder.flush()
        seeder.close()
        engine = engine_for(remote)  # its cpu tier is empty: every retrieve reads the remote tier
        try:
            out["copies"] = copies_per_byte(engine, prompts[0], cache, simulate_pinned=False)
            if args.simulate_pinned:
                out["copies_pinned_rule"] = copies_per_byte(engine, prompts[1], cache, simulate_pinned=True)
            raw = raw_reader(kind, remote, engine, threads=8)
            ns = kv_namespace().namespace
            tier_mbps, raw_mbps, ratios, retrieve_mbps = [], [], [], []
            nbytes = PROMPT_TOKENS // BLOCK * LAYERS * HEADS * BLOCK * 2 * HEAD * 2
            for i in range(args.repeats):
                p, q = prompts[2 + 2 * i], prompts[3 + 2 * i]
                keys = chunk_keys(p, ns, CHUNK_TOKENS)

                def tier_pass(p: list[int] = p) -> float:
                    t0 = time.perf_counter()
                    handle = engine.start_retrieve(p, cache, list(range(BLOCKS)))
                    handle._resolve()  # the host chunks the onload would read are ready
                    dt = time.perf_counter() - t0
                    assert handle.loaded_tokens == PROMPT_TOKENS, handle.loaded_tokens
                    handle.close()
                    return nbytes / dt / MB

                def raw_pass(keys: list[Any] = keys) -> float:
                    t0 = time.perf_counter()
                    n = raw(keys)
                    return n / (time.perf_counter() - t0) / MB

                order = [("tier", tier_pass), ("raw", raw_pass)]
                if i % 2:
                    order.reverse()
                got = {name: fn() for name, fn in order}
                tier_mbps.append(got["tier"])
                raw_mbps.append(got["raw"])
                ratios.append(got["tier"] / got["raw"])
                t0 = time.perf_counter()
                assert engine.retrieve(q, cache, list(range(BLOCKS))) == PROMPT_TOKENS
                retrieve_mbps.append(nbytes / (time.perf_counter() - t0) / MB)
            out["retrieve_mbps"] = retrieve_mbps
            out.update(tier_mbps=tier_mbps, raw_mbps=raw_mbps, ratios=ratios)
        finally:
            engine.close()
    c = out["copies"]
    print(f"{kind:9s} copies/byte {c['copies_per_byte']:.2f} (critical path {c['critical_path_copies_per_byte']:.2f}); "
          f"get {median(out['tier_mbps']):.0f} MB/s, raw {median(out['raw_mbps']):.0f} MB/s, "
          f"ratio {fmt_ratio(median(out['ratios']))}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="redis,s3,nixl-obj")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--simulate-pinned", action="store_true", help="also count copies under CUDA's pinned rule")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from tests.support.remote_tiers import LOOPBACK_ENV, remote_available

    os.environ.update(LOOPBACK_ENV)
    logging.basicConfig(level=logging.ERROR)
    import lmtier

    print(machine_line())
    print(f"lmtier from {Path(lmtier.__file__).parent}")
    results: dict[str, Any] = {}
    for kind in args.kinds.split(","):
        why = remote_available(kind)
        if why:
            print(f"{kind}: skipped ({why})")
            continue
        results[kind] = run_kind(kind, args)
    rows = []
    for kind, r in results.items():
        c = r["copies"]
        pinned = r.get("copies_pinned_rule")
        rows.append([kind, f"{c['copies_per_byte']:.2f}", f"{c['critical_path_copies_per_byte']:.2f}",
                     f"{pinned['copies_per_byte']:.2f}" if pinned else "-",
                     f"{median(r['tier_mbps']):.0f}", f"{median(r['raw_mbps']):.0f}",
                     f"{fmt_ratio(median(r['ratios']))} ({fmt_ratio(min(r['ratios']))}-{fmt_ratio(max(r['ratios']))})",
                     f"{median(r['retrieve_mbps']):.0f}"])
    print()
    print_table(["tier", "copies/byte", "on the critical path", "with CUDA's pinned rule", "get MB/s",
                 "raw client MB/s", "get / raw (min-max)", "retrieve MB/s (CPU onload)"], rows,
                title=f"{args.repeats} repeats of {PROMPT_TOKENS}-token prompts (16 x 4 MiB chunks); medians")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
