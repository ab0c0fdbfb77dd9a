"""S3 tier throughput against raw boto3 on the same SeaweedFS server, in the same run.

The benchmark starts its own ``weed mini`` on 127.0.0.1 (see tests/support/seaweedfs.py). For each
object size (1 MiB, 16 MiB and one Qwen3-8B chunk of 256 tokens, 37,748,736 bytes) and each
repeat, a batch of fresh keys is written and read back:

* raw: ``put_object(Body=bytes)`` / ``get_object()["Body"].read()`` on a ThreadPoolExecutor of
  ``--concurrency`` threads, with the same botocore client settings the tier uses (checksums only
  when required, path style, the same connection pool size, boto3's default payload signing);
* tier: ``S3Backend.put`` / ``get`` / ``get_into`` (reused caller buffers) of the whole batch,
  with ``max_concurrency = --concurrency``; values carry the 64-byte header and are verified;
* tier, identical re-put: the same batch again, which the tier skips after a conditional PUT.

``--no-sign-payload`` turns SHA-256 body signing off on both sides (tier ``sign_payload: false``).

Raw and tier passes alternate within each repeat. MB/s counts payload bytes (1 MB = 10^6 B);
figures are medians over repeats; tier/raw is the median over repeats of the ratio within a
repeat (the machine drifts between repeats, passes of one repeat run back to back); nothing is
asserted.

``--sizes 1MiB`` (or ``16MiB``, ``37.7MB``, comma-separated) runs only those objects, e.g. many
repeats of the 1 MiB cells, where per-object costs and the machine's noise are largest.

    python benchmarks/s3_tier.py [--concurrency 4] [--repeats 5] [--sizes 1MiB,16MiB,37.7MB] [--out results/]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Why: `make bench` runs this file directly; the launcher lives in the repo's tests/support.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtier.keys import ChunkKey, make_namespace
from lmtier_backends.s3.backend import S3Backend, open_s3_backend
from lmtier_backends.s3.config import S3Config
from tests.support.seaweedfs import SeaweedFS, create_bucket

MiB = 1 << 20
CHUNK_BYTES = 36 * 2 * 8 * 128 * 2 * 256  # 37,748,736: Qwen3-8B, 256 tokens, bf16
SIZES = [(1 * MiB, 64), (16 * MiB, 12), (CHUNK_BYTES, 6)]  # (object bytes, objects per batch)
SIZE_NAMES = {"1MiB": 1 * MiB, "16MiB": 16 * MiB, "37.7MB": CHUNK_BYTES}  # --sizes names of SIZES
BUCKET = "lmtier-bench"
MB = 1e6


def parse_sizes(text: str) -> list[int]:
    """``--sizes``: comma-separated names of SIZE_NAMES (they run in SIZES' order)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in SIZE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--sizes: expected names from {', '.join(SIZE_NAMES)}, got {text!r}")
    return [SIZE_NAMES[n] for n in names]


def raw_client(server: SeaweedFS, concurrency: int, sign_payload: bool | None) -> Any:
    """A boto3 client with the tier's settings (see lmtier_backends/s3/backend.py:_make_client)."""
    s3: dict[str, Any] = {"addressing_style": "path"}
    if sign_payload is not None:
        s3["payload_signing_enabled"] = sign_payload
    return server.endpoint.client(
        max_pool_connections=concurrency + 2,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        s3=s3,
    )


def timed_mbps(nbytes: int, fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - start) / MB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=4, help="threads (raw) = max_concurrency (tier)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where SeaweedFS keeps its data (default: a temp dir)")
    ap.add_argument("--out", default=None, help="directory for s3_tier.json")
    ap.add_argument("--sizes", type=parse_sizes, default=[size for size, _ in SIZES],
                    help=f"object sizes to run, comma-separated ({', '.join(SIZE_NAMES)}; default: all)")
    ap.add_argument("--no-sign-payload", action="store_true",
                    help="skip SHA-256 body signing on both sides (tier sign_payload: false)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, SeaweedFS(Path(tmp) / "seaweedfs") as server:
        create_bucket(server.endpoint, BUCKET)
        os.environ["LMTIER_BENCH_S3_ACCESS"] = server.endpoint.access_key
        os.environ["LMTIER_BENCH_S3_SECRET"] = server.endpoint.secret_key
        config = S3Config(
            bucket=BUCKET,
            prefix="tier",
            endpoint_url=server.endpoint.endpoint_url,
            access_key_env="LMTIER_BENCH_S3_ACCESS",
            secret_key_env="LMTIER_BENCH_S3_SECRET",
            max_concurrency=args.concurrency, sign_payload=False if args.no_sign_payload else None,
        )
        with asyncio.Runner() as runner:
            backend = runner.run(open_s3_backend(config))
            try:
                sign = False if args.no_sign_payload else None
                results = run_all(runner, backend, raw_client(server, args.concurrency, sign), args)
            finally:
                runner.run(backend.aclose())
    print_table(results, args)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "s3_tier.json").write_text(json.dumps(results, indent=2))


def raw_put(pool: ThreadPoolExecutor, s3: Any, names: list[str], data: bytes) -> None:
    list(pool.map(lambda n: s3.put_object(Bucket=BUCKET, Key=n, Body=data), names))


def raw_get(pool: ThreadPoolExecutor, s3: Any, names: list[str], size: int) -> None:
    got = list(pool.map(lambda n: s3.get_object(Bucket=BUCKET, Key=n)["Body"].read(), names))
    assert all(len(g) == size for g in got)


async def tier_get(backend: S3Backend, keys: list[ChunkKey], size: int) -> None:
    got = await backend.get(keys)
    assert all(g is not None and memoryview(g).nbytes == size for g in got)


async def tier_get_into(backend: S3Backend, keys: list[ChunkKey], outs: list[bytearray]) -> None:
    assert all(await backend.get_into(keys, outs))


def run_all(
    runner: asyncio.Runner, backend: S3Backend, s3: Any, args: argparse.Namespace
) -> list[dict[str, Any]]:
    pool = ThreadPoolExecutor(args.concurrency)
    ns = make_namespace(bench="s3_tier", run=os.urandom(4).hex())
    results = []
    for size, count in [(size, count) for size, count in SIZES if size in args.sizes]:
        data = os.urandom(size)
        total = size * count
        rates: dict[str, list[float]] = {
            k: []
            for k in (
                "raw put",
                "tier put",
                "tier put again (identical)",
                "raw get",
                "tier get",
                "tier get_into",
            )
        }
        outs = [bytearray(size) for _ in range(count)]
        for rep in range(args.repeats):
            keys = [ChunkKey(ns, os.urandom(16)) for _ in range(count)]
            names = [f"raw/{size}/{rep}/{i}" for i in range(count)]
            items = [(k, data) for k in keys]
            writes: list[tuple[str, Callable[[], Any]]] = [
                ("raw put", functools.partial(raw_put, pool, s3, names, data)),
                ("tier put", functools.partial(runner.run, backend.put(items))),
            ]
            if rep % 2:  # alternate who goes first
                writes.reverse()
            writes.append(("tier put again (identical)", functools.partial(runner.run, backend.put(items))))
            reads: list[tuple[str, Callable[[], Any]]] = [
                ("raw get", functools.partial(raw_get, pool, s3, names, size)),
                ("tier get", functools.partial(runner.run, tier_get(backend, keys, size))),
                ("tier get_into", functools.partial(runner.run, tier_get_into(backend, keys, outs))),
            ]
            if rep % 2:
                reads.reverse()
            for name, fn in writes + reads:
                rates[name].append(timed_mbps(total, fn))
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": n} for n in names], "Quiet": True})
            runner.run(backend.delete(keys))
        for name, values in rates.items():
            raw_runs = rates["raw get" if " get" in name else "raw put"]
            results.append(
                {
                    "size": size,
                    "objects": count,
                    "op": name,
                    "median_mbps": statistics.median(values),
                    "runs_mbps": [round(v, 1) for v in values],
                    # paired: tier and raw of the same repeat ran back to back
                    "median_ratio": statistics.median(t / r for t, r in zip(values, raw_runs, strict=True)),
                }
            )
        print(f"  {size:>11,} B x {count}: done", file=sys.stderr, flush=True)
    pool.shutdown()
    return results


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    med = {(r["size"], r["op"]): r["median_mbps"] for r in results}
    ratio = {(r["size"], r["op"]): r["median_ratio"] for r in results}
    print(
        f"\nS3 tier vs raw boto3 on SeaweedFS (127.0.0.1), concurrency {args.concurrency}, "
        f"medians of {args.repeats} repeats, MB/s of payload (1 MB = 1e6 B)"
    )
    print(f"{'object':>12} {'op':<28} {'raw MB/s':>9} {'tier MB/s':>10} {'tier/raw':>9}   runs (tier)")
    pairs = [
        ("put", "raw put", "tier put"),
        ("put again (identical)", "raw put", "tier put again (identical)"),
        ("get", "raw get", "tier get"),
        ("get_into", "raw get", "tier get_into"),
    ]
    for r in results:
        if r["op"].startswith("raw"):
            continue
        size = r["size"]
        label, raw_op, tier_op = next(p for p in pairs if p[2] == r["op"])
        raw, tier = med[(size, raw_op)], med[(size, tier_op)]
        paired = ratio[(size, tier_op)]
        print(f"{size:>12,} {label:<28} {raw:>9.0f} {tier:>10.0f} {paired:>8.0%}   {r['runs_mbps']}")
    raw_runs = {(r["size"], r["op"]): r["runs_mbps"] for r in results if r["op"].startswith("raw")}
    print("raw runs:", {f"{s:,} {op}": v for (s, op), v in raw_runs.items()})


if __name__ == "__main__":
    main()
