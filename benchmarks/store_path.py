"""The engine's critical path on a local configuration: store, lookup and retrieve of one request.

``make demo``'s first run pays for every ``KVCacheEngine.store`` on the forward path; this times
the calls themselves (until they return) with the embedded default configuration's tiers (cpu +
disk) on a vLLM-CPU paged layout: ``store`` of a new 2048-token prompt (8 chunks of 1 MiB), of the
same prompt again (every chunk present), ``lookup`` of a stored prompt, and ``retrieve`` of it from
RAM. Medians and the 90th percentile of ``--repeats`` calls each, after a warm-up; nothing is
asserted. Runs against older checkouts too (``PYTHONPATH=<checkout>``).

    flock /tmp/lmtier-bench.lock env PYTHONPATH=. python benchmarks/store_path.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import fmt_seconds, machine_line, print_table

LAYERS, HEADS, BLOCK, HEAD = 8, 2, 128, 64
CHUNK_TOKENS, PROMPT_TOKENS, BLOCKS = 256, 2048, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch
    from prometheus_client import CollectorRegistry

    import lmtier
    from lmtier.engine import KVCacheEngine
    from lmtier.keys import KVNamespace

    print(machine_line())
    print(f"lmtier from {Path(lmtier.__file__).parent}")
    kv = KVNamespace(model="store-path", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=LAYERS,
                     block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, page_bytes=HEADS * BLOCK * 2 * HEAD * 2,
                     chunk_tokens=CHUNK_TOKENS)
    cache = list(torch.randn(LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD).to(torch.bfloat16).unbind(0))
    dst = list(torch.zeros(LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD, dtype=torch.bfloat16).unbind(0))
    blocks = list(range(PROMPT_TOKENS // BLOCK))
    rng = random.Random(3)
    times: dict[str, list[float]] = {"store new": [], "store again": [], "lookup": [], "retrieve (RAM)": []}
    with tempfile.TemporaryDirectory() as tmp:
        config = {"chunk_tokens": CHUNK_TOKENS, "tiers": [
            {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1GiB"}},
            {"name": "local", "backend": "disk", "options": {"root": tmp, "max_bytes": "4GiB"}}]}
        with KVCacheEngine(config, kv, metrics_registry=CollectorRegistry()) as engine:
            for i in range(args.repeats + 3):
                p = [rng.randrange(3, 30000) for _ in range(PROMPT_TOKENS)]
                calls = [("store new", lambda p=p: engine.store(p, cache, blocks)),
                         ("store again", lambda p=p: engine.store(p, cache, blocks)),
                         ("lookup", lambda p=p: engine.lookup(p)),
                         ("retrieve (RAM)", lambda p=p: engine.retrieve(p, dst, blocks))]
                for name, call in calls:
                    t0 = time.perf_counter()
                    out = call()
                    dt = time.perf_counter() - t0
                    if name == "store new":
                        out.wait()  # in the tiers before the next call (not timed: off the critical path)
                    if i >= 3:
                        times[name].append(dt)
                engine.flush()
    rows = [[name, fmt_seconds(statistics.median(v)), fmt_seconds(statistics.quantiles(v, n=10)[-1])]
            for name, v in times.items()]
    print_table(["call (2048 tokens, 8 MiB)", "median", "p90"], rows, title=f"{args.repeats} calls each, cpu + disk")
    if args.json:
        args.json.write_text(json.dumps(times))


if __name__ == "__main__":
    sys.exit(main())
