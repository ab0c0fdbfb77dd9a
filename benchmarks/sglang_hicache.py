"""SGLang HiCache v1 calls through lmtier's cpu tier against a raw memcpy of the same pages.

Everything runs on SGLang 0.5.23's real host pools (CPU memory; see tests/integration/sglang_env.py
for how they import on a CPU-only machine) and ``STORAGE_BATCH_SIZE`` (128) pages per call, the
batch SGLang's prefetch and backup threads use.

Part 1, throughput, two pool shapes (page of 16 tokens):

* MHA ``page_first``, a Llama-3-8B-shaped rank (32 layers, 8 KV heads of 128, bf16): a page is
  two pieces (K and V, 1 MiB each) at different places of the pool: 256 MiB per call;
* MLA ``page_first``, DeepSeek-V3-shaped (61 layers, 576 wide, bf16): one 1.07 MiB piece per page.

Rows: ``batch_set_v1`` (new keys every repeat: the pieces are copied into buffers the store
reserved in its cpu tier, then committed; untimed rounds first write the whole tier once, so its
memory is paged in as in steady state), ``batch_get_v1`` (pages held by the cpu tier, copied
into other slots of the pool), and the raw reference: ``numpy.copyto`` of the same pieces from the
pool into a preallocated, pre-touched buffer (and back), one memcpy per piece. The operations take
turns within each repeat; a ratio is the median of the per-repeat ratios to the raw copy
(throughput, 1.00x = as fast as memcpy).

Part 2, per-call overhead: 128 pages of 1 KiB (two 512-byte pieces), so copying is negligible:
``batch_exists``, ``batch_set_v1`` (keys already stored), ``batch_get_v1``, and inside them SGLang's
own ``get_page_buffer_meta`` and lmtier's key derivation, against a raw copy of the same bytes.

Figures are medians of ``--repeats`` (part 1) and ``--small-repeats`` (part 2). Nothing is asserted.

    python benchmarks/sglang_hicache.py [--repeats 9] [--small-repeats 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    fmt_bytes,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
    machine_line,
    median,
    print_table,
    rate,
    time_sync,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.integration.sglang_env

from lmtier.config import load_config
from tests.integration.sglang_env import EXTRA, fill_random, mha_pool, mla_pool, storage_config

BATCH = 128  # sglang.srt.mem_cache.hicache_storage.STORAGE_BATCH_SIZE


def open_backend(max_bytes: int, *, mla: bool = False) -> Any:
    from lmtier.integrations.sglang import LMTierHiCacheStorage, _open_store

    cfg = load_config({"chunk_tokens": 256, "tiers": [{"name": "hot", "backend": "cpu",
                                                        "options": {"max_bytes": max_bytes}}]})
    sc = storage_config(dict(EXTRA), is_mla_model=mla, enable_storage_metrics=False)
    store = _open_store(cfg, sc)
    return LMTierHiCacheStorage(sc, {}, store=store), store


def pieces_of(pool: Any, indices: torch.Tensor) -> list[np.ndarray[Any, Any]]:
    """The pool's page pieces as numpy views (the memory the raw copies read and write)."""
    ptrs, sizes = pool.get_page_buffer_meta(indices)
    flat = pool.kv_buffer.view(torch.uint8).reshape(-1).numpy()
    base = pool.kv_buffer.data_ptr()
    return [flat[p - base: p - base + s] for p, s in zip(ptrs, sizes, strict=True)]


def raw_copy(srcs: list[np.ndarray[Any, Any]], dst: np.ndarray[Any, Any]) -> None:
    at = 0
    for s in srcs:
        np.copyto(dst[at: at + s.size], s)
        at += s.size


def raw_copy_back(src: np.ndarray[Any, Any], dsts: list[np.ndarray[Any, Any]]) -> None:
    at = 0
    for d in dsts:
        np.copyto(d, src[at: at + d.size])
        at += d.size


def keys_for(tag: str, n: int) -> list[str]:
    return [f"{tag}{i:08x}".rjust(64, "0") for i in range(n)]


def throughput(name: str, pool: Any, backend: Any, store: Any, repeats: int, tier_bytes: int) -> list[list[str]]:
    backend.register_mem_pool_host(pool)
    ps = pool.page_size
    src_idx = pool.alloc(BATCH * ps)
    dst_idx = pool.alloc(BATCH * ps)
    fill_random(pool, 0)
    src_pieces, dst_pieces = pieces_of(pool, src_idx), pieces_of(pool, dst_idx)
    nbytes = sum(p.size for p in src_pieces)
    scratch = np.empty(nbytes, dtype=np.uint8)
    scratch.fill(1)  # pre-touched, like a warm tier slab
    stored = keys_for("get", BATCH)
    assert all(backend.batch_set_v1(stored, src_idx))
    store.flush()
    times: dict[str, list[float]] = {k: [] for k in ("raw set", "set", "raw get", "get")}
    ratios: dict[str, list[float]] = {"set": [], "get": []}
    # untimed rounds until the tier's slab has been written through once: the first touch of each
    # page of fresh memory faults (the raw copy's buffer is pre-touched), which is start-up cost
    warm = tier_bytes // nbytes + 2
    for r in range(warm + repeats):
        fresh = keys_for(f"set{r:04x}", BATCH)
        got: list[bool] = []
        step = {
            "raw set": lambda: raw_copy(src_pieces, scratch),
            "set": lambda k=fresh: backend.batch_set_v1(k, src_idx),  # type: ignore[misc]
            "raw get": lambda: raw_copy_back(scratch, dst_pieces),
            "get": lambda out=got: out.extend(backend.batch_get_v1(stored, dst_idx)),  # type: ignore[misc]
        }
        for op, fn in step.items():
            (dt,) = time_sync(fn, repeats=1, warmup=0)
            if r >= warm:
                times[op].append(dt)
            if op == "set":
                store.flush()  # untimed: the tier adopts the committed buffers behind the call
        assert all(got), "a page of the get batch missed"
        if r >= warm:
            ratios["set"].append(times["raw set"][-1] / times["set"][-1])
            ratios["get"].append(times["raw get"][-1] / times["get"][-1])
    rows = []
    for op in ("raw set", "set", "raw get", "get"):
        t = median(times[op])
        label = {"raw set": "raw memcpy pool -> buffer", "set": "batch_set_v1",
                 "raw get": "raw memcpy buffer -> pool", "get": "batch_get_v1"}[op]
        ratio = fmt_ratio(median(ratios[op])) if op in ratios else "1.00x"
        spread = (f"{min(ratios[op]):.2f}-{max(ratios[op]):.2f}" if op in ratios else "")
        rows.append([name, label, fmt_seconds(t), fmt_rate(rate(nbytes, t)), ratio, spread])
    return rows


def overhead(small_repeats: int) -> None:
    pool = mha_pool(layers=2, heads=1, head_dim=32, page_size=4, device_tokens=BATCH * 4)
    backend, store = open_backend(64 << 20)
    try:
        backend.register_mem_pool_host(pool)
        idx = pool.alloc(BATCH * 4)
        fill_random(pool, 1)
        keys = keys_for("small", BATCH)
        backend.batch_set_v1(keys, idx)
        store.flush()
        pieces = pieces_of(pool, idx)
        nbytes = sum(p.size for p in pieces)
        scratch = np.empty(nbytes, dtype=np.uint8)
        rows = []
        calls = [
            ("raw memcpy of the same bytes", lambda: raw_copy(pieces, scratch)),
            ("batch_exists", lambda: backend.batch_exists(keys)),
            ("batch_set_v1 (already stored)", lambda: backend.batch_set_v1(keys, idx)),
            ("batch_get_v1", lambda: backend.batch_get_v1(keys, idx)),
            ("  of which get_page_buffer_meta (SGLang)", lambda: pool.get_page_buffer_meta(idx)),
            ("  of which key derivation (lmtier)", lambda: backend._chunk_keys(keys, backend.namespace)),
        ]
        for label, fn in calls:
            t = median(time_sync(fn, repeats=small_repeats, warmup=10))
            rows.append([label, fmt_seconds(t), fmt_seconds(t / BATCH)])
            store.flush()
        print_table(["call (128 pages of 1 KiB)", "per call", "per page"], rows,
                    title=f"\nPart 2: per-call overhead, {fmt_bytes(nbytes)} per call, medians of {small_repeats}")
    finally:
        backend.close()
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--small-repeats", type=int, default=200)
    args = ap.parse_args()
    print(machine_line())
    rows = []
    mha = mha_pool(layers=32, heads=8, head_dim=128, page_size=16, device_tokens=BATCH * 16)
    tier_bytes = 768 << 20
    backend, store = open_backend(tier_bytes)
    try:
        rows += throughput("MHA page_first, 2 pieces/page", mha, backend, store, args.repeats, tier_bytes)
    finally:
        backend.close()
        store.close()
    del mha
    mla = mla_pool(layers=61, rank=512, rope=64, page_size=16, device_tokens=BATCH * 16)
    backend, store = open_backend(tier_bytes, mla=True)
    try:
        rows += throughput("MLA page_first, 1 piece/page", mla, backend, store, args.repeats, tier_bytes)
    finally:
        backend.close()
        store.close()
    print_table(["pool", "call (128 pages)", "time", "throughput", "vs memcpy", "per-repeat range"], rows,
                title=f"Part 1: throughput through the cpu tier, medians of {args.repeats} repeats",
                align="llrrrr")
    overhead(args.small_repeats)


if __name__ == "__main__":
    main()
