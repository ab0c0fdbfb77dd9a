"""nixl tier throughput against the disk / s3 tiers and the raw clients, in the same run.

A chunk is one Qwen3-8B chunk of 256 tokens: 36 layers x 2 (K,V) x 8 heads x 128 x 2 bytes x 256
= 37,748,736 bytes. Each repeat writes ``--chunks`` fresh chunks and reads them back as one batch
per call; the passes of a repeat run in a fresh random order (the machine drifts; no pass may
always go first).

Files (one directory, one filesystem):

* raw: ``open`` + one ``write`` of header+payload per new file / ``readinto`` of each file into a
  reused buffer, on ``--concurrency`` threads (the physical reference);
* disk tier: ``put`` / ``get`` / ``get_into`` of the batch (``max_concurrency = --concurrency``);
* nixl/posix: ``put`` / ``get`` / ``get_into`` of the batch (NIXL POSIX plugin, FILE_SEG);
* raw NIXL: the same plugin (same I/O queue as the tier) moving header+payload between
  registered, reused buffers and the raw files, one request per file, no checksum (what the
  tier costs on top of NIXL: its checksums, headers, staging).

Write passes start after an ``os.sync()`` (untimed), so none pays for another's dirty pages.
Reads are measured twice: warm (page cache) and cold (every file dropped from the page cache with
``posix_fadvise(DONTNEED)`` after a sync, or ``drop_caches`` when allowed, right before the pass).

Objects (one SeaweedFS server started here, 127.0.0.1):

* raw boto3: ``put_object`` / ``get_object().read()`` on ``--concurrency`` threads;
* s3 tier: ``put`` / ``get`` / ``get_into`` (``max_concurrency = --concurrency``);
* nixl/obj: ``put`` / ``get`` / ``get_into`` (NIXL OBJ plugin, ``num_threads = --concurrency``).

Tier values carry the 64-byte header and are verified on read (checksum). MB/s count payload bytes
(1 MB = 10^6 B) and are medians over repeats; x/raw is the median over repeats of the ratio within
a repeat (passes of one repeat ran close together). Nothing is asserted.

    python benchmarks/nixl_tier.py [--chunks 8] [--repeats 5] [--concurrency 4] [--dir /tmp] [--out results/]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Why: `make bench` runs this file directly; the SeaweedFS launcher lives in the repo's tests/support.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("UCX_NET_DEVICES", "lo")  # never listen beyond loopback, never load IB
os.environ.setdefault("UCX_MODULES", "^ib")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from lmtier.framing import HEADER_BYTES, encode_header
from lmtier.keys import ChunkKey, make_namespace
from lmtier_backends.nixl.backend import open_nixl_backend
from lmtier_backends.nixl.config import NixlConfig

CHUNK_BYTES = 36 * 2 * 8 * 128 * 2 * 256  # 37,748,736
MB = 1e6
BUCKET = "lmtier-bench-nixl"


def cold_cache(paths: list[str]) -> str:
    """Drop ``paths`` from the page cache; return how."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise(DONTNEED)"


def tier_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file()]


class Bench:
    """Timed passes of one repeat, keyed by name; ratios are taken within a repeat."""

    def __init__(self) -> None:
        self.rates: dict[str, list[float]] = {}
        self.ratios: dict[str, list[float]] = {}

    def time(self, name: str, nbytes: int, fn: Callable[[], Any], before: Callable[[], Any] | None = None) -> float:
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        rate = nbytes / (time.perf_counter() - start) / MB
        self.rates.setdefault(name, []).append(rate)
        return rate

    def ratio(self, name: str, value: float) -> None:
        self.ratios.setdefault(name, []).append(value)


def staging(args: argparse.Namespace) -> dict[str, int]:
    """Staging slabs holding whole chunks: a batch staged for a put plus a batch of views held."""
    slab = 4 * (CHUNK_BYTES + HEADER_BYTES)
    return {"staging_slab_bytes": slab, "max_staging_bytes": (2 * args.chunks // 4 + 3) * slab}


def warm_up(runner: asyncio.Runner, backends: list[Any], data: bytes) -> None:
    """One untimed put + get per tier: imports, first connections, first page faults."""
    key = ChunkKey(make_namespace(bench="nixl_tier_warm_up"), os.urandom(16))
    for backend in backends:
        runner.run(backend.put([(key, data)]))
        assert runner.run(backend.get([key]))[0] is not None
        runner.run(backend.delete([key]))


def run_passes(passes: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]], bench: Bench,
               nbytes: int, rng: random.Random) -> dict[str, float]:
    order = passes[:]
    rng.shuffle(order)
    return {name: bench.time(name, nbytes, fn, before) for name, fn, before in order}


# -- files -----------------------------------------------------------------------------------------
def bench_files(args: argparse.Namespace, runner: asyncio.Runner, data: bytes, rng: random.Random,
                pool: ThreadPoolExecutor) -> tuple[Bench, str]:
    from lmtier_backends.disk.backend import open_disk_backend
    from lmtier_backends.disk.config import DiskConfig

    base = Path(tempfile.mkdtemp(prefix="lmtier-bench-nixl-", dir=args.dir))
    raw_dir, disk_root, nixl_root = base / "raw", base / "disk", base / "nixl"
    raw_dir.mkdir()
    disk = runner.run(open_disk_backend(DiskConfig(root=disk_root, max_bytes=64 << 30,
                                                   max_concurrency=args.concurrency)))
    nixl = runner.run(open_nixl_backend(NixlConfig(
        plugin="posix", posix={"root": nixl_root, "params": dict(args.posix_param)},
        **staging(args), io_threads=args.concurrency)))
    warm_up(runner, [disk, nixl], data)
    bench, method = Bench(), ""
    n, total = args.chunks, args.chunks * CHUNK_BYTES
    outs = [bytearray(CHUNK_BYTES) for _ in range(n)]
    raw_bufs = [bytearray(CHUNK_BYTES + HEADER_BYTES) for _ in range(n)]
    raw_nixl = RawNixl(dict(args.posix_param), n, CHUNK_BYTES + HEADER_BYTES)
    ns = make_namespace(bench="nixl_tier_files", run=os.urandom(4).hex())
    try:
        for rep in range(args.repeats):
            keys = [ChunkKey(ns, os.urandom(16)) for _ in range(n)]
            names = [str(raw_dir / f"{rep}-{i}") for i in range(n)]
            stored = [encode_header(k, data) + data for k in keys]  # what the tiers write, prepared

            def raw_put(names: list[str] = names, stored: list[bytes] = stored) -> None:
                def one(j: int) -> None:
                    with open(names[j], "wb") as f:
                        f.write(stored[j])
                list(pool.map(one, range(n)))

            def raw_get(names: list[str] = names) -> None:
                def one(j: int) -> None:
                    with open(names[j], "rb", buffering=0) as f:
                        assert f.readinto(raw_bufs[j]) == CHUNK_BYTES + HEADER_BYTES
                list(pool.map(one, range(n)))

            items = [(k, data) for k in keys]
            raw_nixl.fill(stored)
            # os.sync before each write pass (untimed): no pass pays for an earlier pass's dirty pages
            w = run_passes([
                ("raw write", raw_put, os.sync),
                ("raw NIXL write", lambda names=names: raw_nixl.move("WRITE", [f"{p}.nixl" for p in names]), os.sync),
                ("disk put", lambda items=items: runner.run(disk.put(items)), os.sync),
                ("nixl/posix put", lambda items=items: runner.run(nixl.put(items)), os.sync),
            ], bench, total, rng)
            bench.ratio("raw NIXL write", w["raw NIXL write"] / w["raw write"])
            bench.ratio("nixl/posix put vs raw NIXL", w["nixl/posix put"] / w["raw NIXL write"])
            bench.ratio("disk put", w["disk put"] / w["raw write"])
            bench.ratio("nixl/posix put", w["nixl/posix put"] / w["raw write"])
            bench.ratio("nixl/posix put vs disk", w["nixl/posix put"] / w["disk put"])

            def check_get(backend: Any, keys: list[ChunkKey] = keys) -> None:
                got = runner.run(backend.get(keys))
                assert all(g is not None and memoryview(g).nbytes == CHUNK_BYTES for g in got)
                del got

            def check_get_into(backend: Any, keys: list[ChunkKey] = keys) -> None:
                assert all(runner.run(backend.get_into(keys, outs)))

            for temp in ("warm", "cold"):
                files = names + tier_files(disk_root) + tier_files(nixl_root)

                def drop(files: list[str] = files, temp: str = temp) -> None:
                    nonlocal method
                    if temp == "cold":
                        method = cold_cache(files)

                r = run_passes([
                    (f"raw read ({temp})", raw_get, drop),
                    (f"raw NIXL read ({temp})", lambda names=names: raw_nixl.move("READ", names), drop),
                    (f"disk get ({temp})", lambda: check_get(disk), drop),
                    (f"disk get_into ({temp})", lambda: check_get_into(disk), drop),
                    (f"nixl/posix get ({temp})", lambda: check_get(nixl), drop),
                    (f"nixl/posix get_into ({temp})", lambda: check_get_into(nixl), drop),
                ], bench, total, rng)
                bench.ratio(f"raw NIXL read ({temp})", r[f"raw NIXL read ({temp})"] / r[f"raw read ({temp})"])
                for op in ("get", "get_into"):
                    bench.ratio(f"nixl/posix {op} vs raw NIXL ({temp})",
                                r[f"nixl/posix {op} ({temp})"] / r[f"raw NIXL read ({temp})"])
                    bench.ratio(f"disk {op} ({temp})", r[f"disk {op} ({temp})"] / r[f"raw read ({temp})"])
                    bench.ratio(f"nixl/posix {op} ({temp})", r[f"nixl/posix {op} ({temp})"] / r[f"raw read ({temp})"])
                    bench.ratio(f"nixl/posix {op} vs disk ({temp})",
                                r[f"nixl/posix {op} ({temp})"] / r[f"disk {op} ({temp})"])
            runner.run(disk.delete(keys))
            runner.run(nixl.delete(keys))
            for p in names:
                os.unlink(p)
                os.unlink(f"{p}.nixl")
            print(f"  files: repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    finally:
        raw_nixl.close()
        runner.run(disk.aclose())
        runner.run(nixl.aclose())
        shutil.rmtree(base, ignore_errors=True)
    return bench, method


class RawNixl:
    """NIXL's POSIX plugin driven directly: ``n`` registered, reused buffers of ``nbytes`` each,
    one request per file, all posted, then polled until done (the tier's I/O queue choice)."""

    def __init__(self, params: dict[str, str], n: int, nbytes: int) -> None:
        import numpy as np

        from lmtier_backends.nixl import _nixl
        from lmtier_backends.nixl.backend import _posix_agent

        self.name = f"bench-raw-{os.getpid()}"
        self.agent = _posix_agent(_nixl.load_api(), self.name, "POSIX", params)
        self.bufs = [np.ones(nbytes, dtype=np.uint8) for _ in range(n)]  # touched: no page faults timed
        self.dram = self.agent.register_memory([(b.ctypes.data, b.nbytes, 0, "") for b in self.bufs], "DRAM",
                                               backends=["POSIX"])

    def fill(self, values: list[bytes]) -> None:
        for buf, value in zip(self.bufs, values, strict=True):
            buf[:] = memoryview(value)

    def move(self, op: str, paths: list[str]) -> None:
        flags = os.O_RDONLY if op == "READ" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fds = [os.open(p, flags | os.O_CLOEXEC, 0o644) for p in paths]
        agent = self.agent
        try:
            files = agent.register_memory([(0, 0, fd, "") for fd in fds], "FILE", backends=["POSIX"])
            handles = []
            try:
                for buf, fd in zip(self.bufs, fds, strict=False):
                    local = agent.get_xfer_descs([(buf.ctypes.data, buf.nbytes, 0)], "DRAM")
                    remote = agent.get_xfer_descs([(0, buf.nbytes, fd)], "FILE")
                    handles.append(agent.initialize_xfer(op, local, remote, self.name))
                    agent.transfer(handles[-1])
                for h in handles:
                    while (state := agent.check_xfer_state(h)) == "PROC":
                        time.sleep(0)
                    assert state == "DONE", state
            finally:
                for h in handles:
                    h.release()
                agent.deregister_memory(files, backends=["POSIX"])
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self.agent.deregister_memory(self.dram, backends=["POSIX"])


# -- objects ---------------------------------------------------------------------------------------
def bench_objects(args: argparse.Namespace, runner: asyncio.Runner, data: bytes, rng: random.Random,
                  pool: ThreadPoolExecutor) -> Bench:
    from lmtier_backends.s3.backend import open_s3_backend
    from lmtier_backends.s3.config import S3Config
    from tests.support.seaweedfs import SeaweedFS, create_bucket

    bench = Bench()
    n, total = args.chunks, args.chunks * CHUNK_BYTES
    outs = [bytearray(CHUNK_BYTES) for _ in range(n)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, SeaweedFS(Path(tmp) / "seaweedfs") as server:
        ep = server.endpoint
        create_bucket(ep, BUCKET)
        raw = ep.client(max_pool_connections=max(10, args.concurrency))
        os.environ["LMTIER_BENCH_S3_ACCESS"], os.environ["LMTIER_BENCH_S3_SECRET"] = ep.access_key, ep.secret_key
        s3 = runner.run(open_s3_backend(S3Config(
            bucket=BUCKET, prefix="s3tier", endpoint_url=ep.endpoint_url, region="us-east-1",
            access_key_env="LMTIER_BENCH_S3_ACCESS", secret_key_env="LMTIER_BENCH_S3_SECRET",
            max_concurrency=args.concurrency)))
        nixl = runner.run(open_nixl_backend(NixlConfig(
            plugin="obj",
            obj={"bucket": BUCKET, "endpoint_override": ep.endpoint_url, "access_key": ep.access_key,
                 "secret_key": ep.secret_key, "prefix": "nixltier/", "num_threads": args.concurrency},
            **staging(args), io_threads=args.concurrency)))
        warm_up(runner, [s3, nixl], data)
        ns = make_namespace(bench="nixl_tier_objects", run=os.urandom(4).hex())
        try:
            for rep in range(args.repeats):
                keys = [ChunkKey(ns, os.urandom(16)) for _ in range(n)]
                names = [f"raw/{rep}/{i}" for i in range(n)]
                stored = [encode_header(k, data) + data for k in keys]

                def raw_put(names: list[str] = names, stored: list[bytes] = stored) -> None:
                    list(pool.map(lambda j: raw.put_object(Bucket=BUCKET, Key=names[j], Body=stored[j]), range(n)))

                def raw_get(names: list[str] = names) -> None:
                    got = list(pool.map(lambda nm: raw.get_object(Bucket=BUCKET, Key=nm)["Body"].read(), names))
                    assert all(len(g) == CHUNK_BYTES + HEADER_BYTES for g in got)

                items = [(k, data) for k in keys]
                w = run_passes([
                    ("raw boto3 put", raw_put, None),
                    ("s3 put", lambda items=items: runner.run(s3.put(items)), None),
                    ("nixl/obj put", lambda items=items: runner.run(nixl.put(items)), None),
                ], bench, total, rng)
                bench.ratio("s3 put", w["s3 put"] / w["raw boto3 put"])
                bench.ratio("nixl/obj put", w["nixl/obj put"] / w["raw boto3 put"])
                bench.ratio("nixl/obj put vs s3", w["nixl/obj put"] / w["s3 put"])

                def check_get(backend: Any, keys: list[ChunkKey] = keys) -> None:
                    got = runner.run(backend.get(keys))
                    assert all(g is not None and memoryview(g).nbytes == CHUNK_BYTES for g in got)
                    del got

                def check_get_into(backend: Any, keys: list[ChunkKey] = keys) -> None:
                    assert all(runner.run(backend.get_into(keys, outs)))

                r = run_passes([
                    ("raw boto3 get", raw_get, None),
                    ("s3 get", lambda: check_get(s3), None),
                    ("s3 get_into", lambda: check_get_into(s3), None),
                    ("nixl/obj get", lambda: check_get(nixl), None),
                    ("nixl/obj get_into", lambda: check_get_into(nixl), None),
                ], bench, total, rng)
                for op in ("get", "get_into"):
                    bench.ratio(f"s3 {op}", r[f"s3 {op}"] / r["raw boto3 get"])
                    bench.ratio(f"nixl/obj {op}", r[f"nixl/obj {op}"] / r["raw boto3 get"])
                    bench.ratio(f"nixl/obj {op} vs s3", r[f"nixl/obj {op}"] / r[f"s3 {op}"])
                raw.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in names], "Quiet": True})
                runner.run(s3.delete(keys))
                runner.run(nixl.delete(keys))
                print(f"  objects: repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        finally:
            runner.run(s3.aclose())
            runner.run(nixl.aclose())
    return bench


# -- report ----------------------------------------------------------------------------------------
def summary(bench: Bench) -> dict[str, Any]:
    return {
        "mbps": {k: {"median": round(statistics.median(v), 1), "runs": [round(x, 1) for x in v]}
                 for k, v in bench.rates.items()},
        "ratios": {k: round(statistics.median(v), 3) for k, v in bench.ratios.items()},
    }


def print_section(title: str, bench: Bench, rows: list[tuple[str, str, str | None]],
                  vs_raw_nixl: bool = False) -> None:
    med = {k: statistics.median(v) for k, v in bench.rates.items()}
    rat = {k: statistics.median(v) for k, v in bench.ratios.items()}
    print(f"\n{title}")
    extra = f" {'nixl/raw NIXL':>14}" if vs_raw_nixl else ""
    print(f"  {'pass':<30} {'MB/s':>8} {'x/raw':>7} {'nixl/other':>11}{extra}")
    for name, ratio_key, versus in rows:
        r = f"{rat[ratio_key]:.2f}" if ratio_key in rat else "1.00"
        v = f"{rat[versus]:.2f}" if versus and versus in rat else ""
        x = ""
        if vs_raw_nixl:
            key = versus.replace("vs disk", "vs raw NIXL") if versus else ""
            x = f" {rat[key]:>14.2f}" if key in rat else f" {'':>14}"
        print(f"  {name:<30} {med[name]:>8.0f} {r:>7} {v:>11}{x}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=8, help="chunks per batch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=4, help="raw threads = tier threads")
    ap.add_argument("--dir", default=None, help="where files and SeaweedFS data go (default: temp dir)")
    ap.add_argument("--posix-param", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                    help="extra NIXL POSIX plugin param, e.g. use_uring=true (repeatable)")
    ap.add_argument("--skip-files", action="store_true")
    ap.add_argument("--skip-objects", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", default=None, help="directory for nixl_tier.json")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    data = os.urandom(CHUNK_BYTES)
    results: dict[str, Any] = {"chunk_bytes": CHUNK_BYTES, "chunks": args.chunks, "repeats": args.repeats,
                               "concurrency": args.concurrency}
    pool = ThreadPoolExecutor(args.concurrency)
    files = objects = None
    method = ""
    with asyncio.Runner() as runner:
        if not args.skip_files:
            files, method = bench_files(args, runner, data, rng, pool)
            results["files"] = summary(files) | {"cold_cache": method}
        if not args.skip_objects:
            objects = bench_objects(args, runner, data, rng, pool)
            results["objects"] = summary(objects)
    pool.shutdown()

    head = (f"{args.chunks} chunks x {CHUNK_BYTES:,} B per batch call, {args.concurrency} threads, "
            f"medians of {args.repeats} repeats, MB/s of payload (1 MB = 1e6 B)")
    if files is not None:
        rows: list[tuple[str, str, str | None]] = [
            ("raw write", "", None), ("raw NIXL write", "raw NIXL write", None), ("disk put", "disk put", None),
            ("nixl/posix put", "nixl/posix put", "nixl/posix put vs disk"),
        ]
        for temp in ("warm", "cold"):
            rows += [(f"raw read ({temp})", "", None),
                     (f"raw NIXL read ({temp})", f"raw NIXL read ({temp})", None)]
            for op in ("get", "get_into"):
                rows += [(f"disk {op} ({temp})", f"disk {op} ({temp})", None),
                         (f"nixl/posix {op} ({temp})", f"nixl/posix {op} ({temp})", f"nixl/posix {op} vs disk ({temp})")]
        print_section(f"Files: nixl/posix vs disk tier vs raw files ({head}; cold = {method})", files, rows,
                      vs_raw_nixl=True)
    if objects is not None:
        rows = [("raw boto3 put", "", None), ("s3 put", "s3 put", None),
                ("nixl/obj put", "nixl/obj put", "nixl/obj put vs s3"), ("raw boto3 get", "", None)]
        for op in ("get", "get_into"):
            rows += [(f"s3 {op}", f"s3 {op}", None), (f"nixl/obj {op}", f"nixl/obj {op}", f"nixl/obj {op} vs s3")]
        print_section(f"Objects: nixl/obj vs s3 tier vs raw boto3, one SeaweedFS on 127.0.0.1 ({head})", objects, rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "nixl_tier.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
