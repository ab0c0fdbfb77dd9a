"""``lmtier bench``: per-tier put/get throughput against a memcpy and raw file I/O measured in the same run.

A tier with a value codec (``codec:``) is measured twice in the same run: its backend alone (raw
values, the first table) and through a StorageManager that encodes and decodes on its codec
pool (the second table: the stored ratio, the throughput of raw KV bytes, and how it compares
with the same tier without the codec). The values are bf16 KV-shaped (a Qwen3-8B chunk's
geometry at the default size): Gaussian vectors with per-channel magnitudes and an outlier
channel, which a lossless codec compresses about like real KV; ``docs/codecs.md`` has ratios
measured on a model's own KV.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtier.cli._common import (
    QWEN3_8B_CHUNK_BYTES,
    fmt_bytes,
    format_table,
    load_both_phases,
    one_line,
    parse_size,
)
from lmtier.errors import ConfigError, LmtierError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from lmtier.config import LmtierConfig
    from lmtier.registry import BackendRegistry

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    n = sub.add_parser("bench", help="per-tier put/get throughput against memcpy and raw file I/O")
    n.add_argument("--config", metavar="FILE", help="tiers to measure (default: $LMTIER_CONFIG, else embedded)")
    n.add_argument("--size", type=parse_size, default=QWEN3_8B_CHUNK_BYTES, metavar="SIZE",
                   help="bytes per value, e.g. 37.7MB, 36MiB, 4096 (default: one Qwen3-8B chunk, 37.7 MB)")
    n.add_argument("--count", type=int, default=8, metavar="N", help="values per tier and per raw baseline")
    n.set_defaults(run=_cmd_bench)


def _median_s(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def _num(x: float) -> str:
    """Two decimals, but never a misleading 0.00 for a small nonzero figure."""
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}" if x >= 0.1 or x == 0 else f"{x:.2g}"


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _cmd_bench(args: argparse.Namespace, _extra: list[str]) -> int:
    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    cfg, options, registry, where = load_both_phases(args.config)
    return asyncio.run(_bench(cfg, options, registry, where, args.size, args.count))


async def _bench(cfg: LmtierConfig, options: list[BaseModel], registry: BackendRegistry, where: str,
                 size: int, count: int) -> int:
    from tqdm import tqdm

    from lmtier.keys import ChunkKey, make_namespace

    payload = _kv_like(size)
    ns = make_namespace(bench=os.urandom(8).hex())  # fresh: never collides with real entries
    coded = sum(1 for t in cfg.tiers if t.codec.enabled)
    progress = tqdm(total=count * (2 * len(cfg.tiers) + 2 * coded + 3), desc="lmtier bench", unit="op",
                    file=sys.stderr, disable=None, leave=False)
    results: list[tuple[float, float] | str] = []  # median (put, get) seconds, or why not
    coded_results: dict[int, tuple[float, float, float, str] | str] = {}  # tier: (put, get, ratio, note)
    file_dir: Path | None = None
    for opts in options:
        root = getattr(opts, "root", None)
        if isinstance(root, Path):
            file_dir = root  # raw file I/O on the same filesystem as the first disk-like tier
            break
    with progress:
        # the raw baselines first: files written later would compete with the tiers' dirty pages
        memcpy_s, write_s, read_s, file_where = _raw_baselines(payload, count, file_dir, progress)
        for i, (tier, opts) in enumerate(zip(cfg.tiers, options, strict=True)):
            keys = [ChunkKey(ns, os.urandom(16)) for _ in range(count)]
            try:
                backend = await registry.create(tier.backend, opts, path=f"tiers[{i}].options")
            except LmtierError as exc:
                results.append(f"cannot open: {one_line(exc)}")
                progress.update(2 * count)
                continue
            try:
                try:
                    results.append(await _bench_tier(backend, keys, payload, progress))
                except LmtierError as exc:
                    results.append(f"failed: {one_line(exc)}")
                finally:
                    await backend.delete(keys)
                if tier.codec.enabled:
                    try:
                        coded_results[i] = await _bench_codec(tier, backend, registry, payload, count, progress)
                    except LmtierError as exc:
                        coded_results[i] = f"failed: {one_line(exc)}"
            finally:
                await backend.aclose()  # (closed already when a manager measured its codec: idempotent)

    print(f"lmtier bench: {count} x {fmt_bytes(size)} values per tier, one value per call, medians; "
          f"config {where}")
    print(f"  raw memcpy (numpy copyto): {_num(_gbps(size, memcpy_s))} GB/s   raw file write: "
          f"{_num(_gbps(size, write_s))} GB/s   raw file read (readinto): {_num(_gbps(size, read_s))} GB/s"
          f"   files in {file_where}")
    table = []
    for tier, res in zip(cfg.tiers, results, strict=True):
        if isinstance(res, str):
            table.append([tier.name, tier.backend, res])
            continue
        put_s, get_s = res
        table.append([tier.name, tier.backend, _num(_gbps(size, put_s)), _num(_gbps(size, get_s)),
                      _num(memcpy_s / put_s), _num(memcpy_s / get_s), _num(write_s / put_s), _num(read_s / get_s)])
    print(format_table(["TIER", "BACKEND", "PUT GB/s", "GET GB/s", "PUT/memcpy", "GET/memcpy",
                  "PUT/file-write", "GET/file-read"], table))
    print("  ratios are throughput relative to the raw baseline (1.00 = as fast as the raw copy); a GET above\n"
          "  memcpy means the tier returned a view without copying (the cpu tier's zero-copy reads)")
    if coded_results:
        _print_codecs(cfg, results, coded_results, size)
    return 0


def _print_codecs(cfg: LmtierConfig, results: list[tuple[float, float] | str],
                  coded: dict[int, tuple[float, float, float, str] | str], size: int) -> None:
    table = []
    for i, res in coded.items():
        tier = cfg.tiers[i]
        name = tier.codec.name + "".join(f" {k}={v}" for k, v in tier.codec.options.items())
        if isinstance(res, str):
            table.append([tier.name, name, res])
            continue
        put_s, get_s, ratio, note = res
        plain = results[i]
        vs = ["-", "-"] if isinstance(plain, str) else [_num(plain[0] / put_s), _num(plain[1] / get_s)]
        table.append([tier.name, name, f"{ratio:.2f}", _num(_gbps(size, put_s)), _num(_gbps(size, get_s)), *vs, note])
    print("codecs: the same tiers through a StorageManager encoding and decoding on its codec pool "
          f"(bf16 KV-shaped values, {os.cpu_count()} CPUs)")
    print(format_table(["TIER", "CODEC", "RATIO", "PUT GB/s", "GET GB/s", "PUT vs no codec", "GET vs no codec", ""],
                       table))
    print("  RATIO: raw bytes / stored bytes; GB/s of raw (decoded) bytes; 'vs no codec': against the same\n"
          "  tier's figures above (above 1.00: the codec saves more transfer time than it costs)")


async def _bench_tier(backend: Any, keys: list[Any], payload: Any, progress: Any) -> tuple[float, float]:
    """Median seconds of one put and one get of ``payload`` (one key per call), after a warm-up."""
    for key in keys:  # first touch of a fresh slab (page faults) is not the steady state
        await backend.put([(key, payload)])
    await backend.delete(keys)
    _settle_dirty_pages()
    puts: list[float] = []
    gets: list[float] = []
    for key in keys:
        t0 = time.perf_counter()
        await backend.put([(key, payload)])
        puts.append(time.perf_counter() - t0)
        progress.update()
    for key in keys:
        t0 = time.perf_counter()
        (value,) = await backend.get([key])
        gets.append(time.perf_counter() - t0)
        if value is None or memoryview(value).nbytes != payload.nbytes:
            raise LmtierError(f"a value just stored was not read back ({'miss' if value is None else 'size'})")
        del value  # a zero-copy view pins its range of the tier: drop it now
        progress.update()
    return _median_s(puts), _median_s(gets)


def _settle_dirty_pages() -> None:
    """Start each write phase with no dirty pages pending, so that no phase pays for the writeback
    of an earlier one (the kernel throttles writers once a few hundred MB are dirty)."""
    if hasattr(os, "sync"):
        os.sync()


def _raw_baselines(payload: Any, count: int, file_dir: Path | None,
                   progress: Any) -> tuple[float, float, float, str]:
    """Median seconds of a numpy copy, a file write (no fsync) and a file read of ``payload``."""
    import numpy as np

    dst = np.empty_like(payload)
    np.copyto(dst, payload)  # first touch: page faults are not part of the copy
    copies = []
    for i in range(max(count, 20)):  # cheap: more repeats make the reference steadier
        t0 = time.perf_counter()
        np.copyto(dst, payload)
        copies.append(time.perf_counter() - t0)
        if i < count:
            progress.update()
    if file_dir is not None:
        file_dir.mkdir(parents=True, exist_ok=True)
    writes, reads = [], []
    with tempfile.TemporaryDirectory(prefix="lmtier-bench-", dir=file_dir) as tmp:
        paths = [Path(tmp) / f"raw-{i}" for i in range(count)]
        for path in paths:  # the same warm-up as the tiers get: write once, delete
            path.write_bytes(payload.data)
            path.unlink()
        _settle_dirty_pages()
        for path in paths:
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(payload.data)
            writes.append(time.perf_counter() - t0)
            progress.update()
        for path in paths:
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                f.readinto(dst.data)
            reads.append(time.perf_counter() - t0)
            progress.update()
        where = str(Path(tmp).parent)
    return _median_s(copies), _median_s(writes), _median_s(reads), where


def _kv_like(size: int) -> Any:
    """``size`` bytes of bf16 values shaped like KV: 128-element head vectors whose channels have
    different magnitudes, one an outlier (as a model's K has), Gaussian within a channel."""
    import numpy as np

    rng = np.random.default_rng(0)
    elems = size // 2
    x = rng.standard_normal(elems, dtype=np.float32)
    channels = np.linspace(0.2, 3.0, 128, dtype=np.float32)
    channels[7] *= 8
    x.reshape(-1)[: elems // 128 * 128].reshape(-1, 128)[:] *= channels
    bits = x.view(np.uint32)
    bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    out = np.zeros(size, np.uint8)
    out[: elems * 2] = bf16.view(np.uint8)
    return out


def _bench_kv(size: int) -> Any:
    """The namespace of the bench's values: a Qwen3-8B chunk's geometry when ``size`` is whole
    chunks' layers of it, else one layer of such pages (a lossy codec stores a value it cannot
    cut into head vectors raw, and says so)."""
    from lmtier.keys import KVNamespace

    heads, head, block = 8, 128, 16
    page = 2 * block * heads * head * 2
    layers = 36 if size % (36 * page) == 0 else 1
    return KVNamespace(model="lmtier-bench", kv_layout="vllm_kv_first", dtype="bfloat16", num_layers=layers,
                       block_size=block, num_kv_heads=heads, head_size=head, page_bytes=page, chunk_tokens=256,
                       extra=(("bench", os.urandom(8).hex()),))


async def _bench_codec(tier: Any, backend: Any, registry: BackendRegistry, payload: Any, count: int,
                       progress: Any) -> tuple[float, float, float, str]:
    """Median seconds of one put and one get of ``payload`` through a StorageManager over
    ``backend`` with the tier's codec (it closes the backend), the stored ratio, and a note
    (values stored raw, and why)."""
    import numpy as np
    from prometheus_client import CollectorRegistry

    from lmtier.buffers import as_bytes_view
    from lmtier.keys import ChunkKey
    from lmtier.manager import StorageManager
    from lmtier.metrics import Metrics

    # generous deadlines: a busy machine must not turn the measured calls into misses
    patient = tier.model_copy(update={"timeout_s": tier.timeout_s.model_copy(
        update=dict.fromkeys(("lookup", "get", "put", "delete"), 600.0))})
    metrics = Metrics(CollectorRegistry())
    manager = StorageManager([(patient, backend)], metrics=metrics, registry=registry)
    try:
        kv = manager.declare_lossy(_bench_kv(payload.nbytes))
        manager.register_namespace(kv)  # what a lossy codec needs to know (an engine does this)
        keys = [ChunkKey(kv.namespace, os.urandom(16)) for _ in range(count)]
        for key in keys:  # warm-up: the codec pool's threads, first allocations
            await manager.put([(key, payload)])
        await manager.delete(keys)
        _settle_dirty_pages()
        r = metrics.registry
        labels = {"tier": tier.name, "codec": tier.codec.name}
        reasons = ("incompressible", "namespace", "error")

        def counts() -> list[float]:
            return [r.get_sample_value("lmtier_codec_raw_values_total", {"tier": tier.name, "reason": reason}) or 0.0
                    for reason in reasons]

        raw_before = counts()
        puts: list[float] = []
        gets: list[float] = []
        for key in keys:
            t0 = time.perf_counter()
            await manager.put([(key, payload)])
            puts.append(time.perf_counter() - t0)
            progress.update()
        lossy = manager.tiers[0].codec is not None and manager.tiers[0].codec.lossy
        for key in keys:
            t0 = time.perf_counter()
            (value,) = await manager.get([key])
            gets.append(time.perf_counter() - t0)
            if value is None or memoryview(value).nbytes != payload.nbytes:
                raise LmtierError(f"a value just stored was not read back ({'miss' if value is None else 'size'})")
            if not lossy and not np.array_equal(np.frombuffer(as_bytes_view(value), np.uint8), payload):
                raise LmtierError("a lossless codec gave back other bytes")
            del value
            progress.update()
        await manager.delete(keys)
        raw = r.get_sample_value("lmtier_codec_raw_bytes_total", labels) or 0.0
        stored = r.get_sample_value("lmtier_codec_stored_bytes_total", labels) or 0.0
        note = ", ".join(f"{int(after - before)} of {count} stored raw ({reason})"
                         for reason, before, after in zip(reasons, raw_before, counts(), strict=True) if after > before)
        return _median_s(puts), _median_s(gets), raw / stored if stored else 1.0, note
    finally:
        await manager.aclose()
