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

Figures are medians of ``--repeats``. In part 1 the operations take turns within each repeat and a
ratio is the median of the per-repeat ratios to the raw copy (throughput, 1.00x = as fast as raw);
in part 2 it is tier time over raw time. Nothing is asserted.

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

    backend = CpuBackend(CpuConfig(max_bytes=4 * size, pinned=None))  # pinned where CUDA exists
    staging = HostMemoryPool(size, pin=None, name="bench-staging")
    staged = staging.allocate(size)
    staged.tensor.copy_(src_t)
    ns = make_namespace(bench="cpu_tier")
    key = _key(ns)

    async def raw_np() -> None:
        np.copyto(dst, src)

    async def raw_t() -> None:
        dst_t.copy_(src_t)

    async def put_np() -> None:
        await backend.put([(key, src)])

    async def put_t() -> None:
        await backend.put([(key, staged)])

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

    ops = {"raw": raw_np, "raw_t": raw_t, "put_np": put_np, "put_t": put_t, "get": get_view,
           "get_copy": get_copy, "trip": round_trip}
    samples: dict[str, list[float]] = {name: [] for name in ops}
    try:
        # warm-up: the slab's ranges are touched, and overwriting one key alternates between two
        for fn in ops.values():
            for _ in range(2):
                await fn()
        # the operations take turns within each repeat (in a rotating order), so the ratio to the
        # raw copy of the same repeat cancels the machine's load drifting between blocks of calls
        names = list(ops)
        for rep in range(repeats):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                samples[name].append((await time_async(ops[name], repeats=1, warmup=0))[0])
        pinned = backend.pool.pinned
    finally:
        await backend.aclose()
        staged.release()
        staging.close()

    def ratio(name: str, nbytes_factor: int = 1) -> str:
        """Throughput relative to numpy copyto: the median over repeats of the per-repeat ratio."""
        return fmt_ratio(median([nbytes_factor * r / t for r, t in zip(samples["raw"], samples[name], strict=True)]))

    t = {name: median(v) for name, v in samples.items()}
    print(f"Part 1: one value of {fmt_bytes(size)} ({size:,} bytes, a Qwen3-8B 256-token chunk) per call; "
          f"medians of {repeats} interleaved repeats; tier slab pinned: {pinned}")
    rows = [
        ["raw numpy copyto (reference)", fmt_seconds(t["raw"]), fmt_rate(rate(size, t["raw"])), "1.00x", ""],
        ["raw torch copy_", fmt_seconds(t["raw_t"]), fmt_rate(rate(size, t["raw_t"])), ratio("raw_t"),
         "torch copies with several threads"],
        ["tier put (numpy value)", fmt_seconds(t["put_np"]), fmt_rate(rate(size, t["put_np"])), ratio("put_np"),
         "copy into the slab"],
        ["tier put (HostBuffer)", fmt_seconds(t["put_t"]), fmt_rate(rate(size, t["put_t"])), ratio("put_t"),
         "torch copy_ into the slab"],
        ["tier get", fmt_seconds(t["get"]), fmt_rate(rate(size, t["get"])), ratio("get"),
         "zero-copy view: no bytes move"],
        ["tier get + copy out", fmt_seconds(t["get_copy"]), fmt_rate(rate(size, t["get_copy"])), ratio("get_copy"),
         ""],
        ["tier put + get + copy out", fmt_seconds(t["trip"]), fmt_rate(rate(2 * size, t["trip"])),
         ratio("trip", 2), "vs two raw copies"],
    ]
    print_table(["operation", "time", "throughput", "vs raw memcpy", "note"], rows, align="lrrrl")
    print("  'vs raw memcpy' is throughput relative to numpy copyto of the same bytes (1.00x = as fast), the\n"
          "  median of the ratios within each repeat\n")


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
