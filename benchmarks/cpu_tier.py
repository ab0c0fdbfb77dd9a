"""cpu tier put/get against a raw memcpy of the same bytes, measured in the same run.

Part 1, one Qwen3-8B chunk (37,748,736 bytes) per call:

* raw: ``numpy.copyto`` into a preallocated, pre-touched buffer, and torch ``copy_`` between
  preallocated tensors (what the tier itself uses for tensor values);
* tier ``put`` of a numpy array (a memoryview copy into the tier's slab) and of a ``HostBuffer``
  from a separate staging pool (what the engine hands over; the tier copies with torch ``copy_``),
  overwriting one key (so the slab's ranges are reused and warm, as in steady state);
* tier ``get`` (a zero-copy read-only view of the slab: no bytes move), and ``get`` followed by a
  copy out of the view into a preallocated buffer (what a consumer that needs its own copy pays);
* a round trip: put + get + copy out, against two raw copies.

Part 2, per-call overhead: batches of 1, 8 and 64 keys of 4 KiB through put / get / contains,
against a raw copy of the same bytes.

Figures are medians of ``--repeats``; ratios are tier time over raw time (1.00x = as fast as raw).
Nothing is asserted.

    python benchmarks/cpu_tier.py [--repeats 15] [--small-repeats 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os

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
    time_async,
    time_sync,
)

from lmtier.keys import ChunkKey, make_namespace
from lmtier.memory import HostMemoryPool
from lmtier_backends.cpu.backend import CpuBackend
from lmtier_backends.cpu.config import CpuConfig


def _key(ns: str) -> ChunkKey:
    return ChunkKey(ns, os.urandom(16))


async def big_chunks(repeats: int) -> None:
    size = QWEN3_8B_CHUNK_BYTES
    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    src_t = torch.from_numpy(src.copy())
    dst = np.empty_like(src)
    dst_t = torch.empty_like(src_t)
    np.copyto(dst, src)  # first touch: page faults are not part of a copy
    dst_t.copy_(src_t)

    raw_np = median(time_sync(lambda: np.copyto(dst, src), repeats=repeats))
    raw_t = median(time_sync(lambda: dst_t.copy_(src_t), repeats=repeats))

    backend = CpuBackend(CpuConfig(max_bytes=4 * size, pinned=None))  # pinned where CUDA exists
    staging = HostMemoryPool(size, pin=None, name="bench-staging")
    staged = staging.allocate(size)
    staged.tensor.copy_(src_t)
    ns = make_namespace(bench="cpu_tier")
    key = _key(ns)
    try:
        # overwriting one key alternates between two slab ranges: warm after the warm-up calls
        put_np = median(await time_async(lambda: backend.put([(key, src)]), repeats=repeats, warmup=2))
        put_t = median(await time_async(lambda: backend.put([(key, staged)]), repeats=repeats, warmup=2))

        async def get_view() -> None:
            (view,) = await backend.get([key])
            del view

        async def get_copy() -> None:
            (view,) = await backend.get([key])
            np.copyto(dst, np.frombuffer(view, dtype=np.uint8))
            del view

        async def round_trip() -> None:
            await backend.put([(key, src)])
            await get_copy()

        get_v = median(await time_async(get_view, repeats=repeats))
        get_c = median(await time_async(get_copy, repeats=repeats))
        trip = median(await time_async(round_trip, repeats=repeats, warmup=2))
        pinned = backend.pool.pinned
    finally:
        await backend.aclose()
        staged.release()
        staging.close()

    print(f"Part 1: one value of {fmt_bytes(size)} ({size:,} bytes, a Qwen3-8B 256-token chunk) per call; "
          f"medians of {repeats}; tier slab pinned: {pinned}")
    rows = [
        ["raw numpy copyto (reference)", fmt_seconds(raw_np), fmt_rate(rate(size, raw_np)), "1.00x", ""],
        ["raw torch copy_", fmt_seconds(raw_t), fmt_rate(rate(size, raw_t)), fmt_ratio(raw_np / raw_t), ""],
        ["tier put (numpy value)", fmt_seconds(put_np), fmt_rate(rate(size, put_np)), fmt_ratio(raw_np / put_np),
         "copy into the slab"],
        ["tier put (HostBuffer)", fmt_seconds(put_t), fmt_rate(rate(size, put_t)), fmt_ratio(raw_np / put_t),
         "torch copy_ into the slab"],
        ["tier get", fmt_seconds(get_v), fmt_rate(rate(size, get_v)), fmt_ratio(raw_np / get_v),
         "zero-copy view: no bytes move"],
        ["tier get + copy out", fmt_seconds(get_c), fmt_rate(rate(size, get_c)), fmt_ratio(raw_np / get_c), ""],
        ["tier put + get + copy out", fmt_seconds(trip), fmt_rate(rate(2 * size, trip)),
         fmt_ratio(2 * raw_np / trip), "vs two raw copies"],
    ]
    print_table(["operation", "time", "throughput", "vs raw memcpy", "note"], rows, align="lrrrl")
    print("  'vs raw memcpy' is throughput relative to numpy copyto of the same bytes (1.00x = as fast)\n")


async def small_batches(repeats: int, item_bytes: int = 4096) -> None:
    backend = CpuBackend(CpuConfig(max_bytes=16 << 20, pinned=None))
    ns = make_namespace(bench="cpu_tier_small")
    rows = []
    try:
        for n in (1, 8, 64):
            keys = [_key(ns) for _ in range(n)]
            items = [(k, os.urandom(item_bytes)) for k in keys]
            src = np.frombuffer(b"".join(v for _, v in items), dtype=np.uint8)
            dst = np.empty_like(src)
            raw = median(time_sync(lambda src=src, dst=dst: np.copyto(dst, src), repeats=repeats))

            async def get(keys: list[ChunkKey] = keys) -> None:
                values = await backend.get(keys)
                del values

            put = median(await time_async(lambda items=items: backend.put(items), repeats=repeats, warmup=3))
            got = median(await time_async(get, repeats=repeats))
            has = median(await time_async(lambda keys=keys: backend.contains(keys), repeats=repeats))
            for op, t in (("put", put), ("get", got), ("contains", has)):
                rows.append([f"{n} x 4 KiB {op}", fmt_seconds(t), fmt_seconds(t / n), fmt_seconds(raw),
                             fmt_ratio(t / raw)])
            await backend.delete(keys)
    finally:
        await backend.aclose()
    print(f"Part 2: per-call overhead, batches of 4 KiB values; medians of {repeats}")
    print_table(["batch / op", "per call", "per key", "raw copy of the bytes", "tier / raw time"], rows)
    print("  'tier / raw time' is how many times longer the call takes than copying its bytes with numpy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15, help="repeats of each 37.7 MB measurement")
    p.add_argument("--small-repeats", type=int, default=300, help="repeats of each small-batch measurement")
    args = p.parse_args(argv)
    print(f"cpu tier benchmark ({machine_line()})\n")
    asyncio.run(big_chunks(args.repeats))
    asyncio.run(small_batches(args.small_repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
