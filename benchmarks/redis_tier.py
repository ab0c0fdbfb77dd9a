"""Redis tier throughput against the raw client and redis-benchmark, same servers, same run.

Starts its own servers on 127.0.0.1 (a standalone one and a 3-primary Cluster; persistence off)
and, for values of 1 MiB, 4 MiB and 37.7 MB (one Qwen3-8B chunk of 256 tokens: 37,748,736
bytes), measures SET/GET throughput of:

* ``redis-benchmark -d <size> -t set,get --csv`` (the C client: the server's limit here);
  ``-c 1`` standalone (one stream, like one tier batch), ``--cluster -c 3`` on the Cluster; run
  once in every repeat, among the other modes, so that tier/C is a ratio within one repeat;
* raw redis-py, every mode worth trying, the best one per op being the reference (GET results
  are kept until the pass ends, as a caller needing the whole batch keeps them: a result freed at
  once would let the next one reuse the same, cache-hot memory, which no real caller does):
  ``Redis`` with hiredis parsing and the default packer; with ``PythonRespSerializer`` as the
  packer (SERVICES.md's fastest); pipelines; ``redis.asyncio``; on the Cluster ``RedisCluster``
  one by one and pipelined (it ignores the packer argument);
* the tier (``RedisBackend``): one ``put`` of the whole batch (default ``put_streams=2``, and
  with ``put_streams=1``: one stream per node), one ``get`` (read-only views of the warm receive
  slab, header and checksum verified), one ``get_into`` (the caller's reused buffers, verified),
  and one item per call.

The raw modes store the bare payload; the tier stores the 64-byte header too and checksums every
byte both ways. To show what that costs, also measured: the tier's put of values whose checksum
another tier already computed (``lmtier.kit.Payload``: what write-through after the disk tier, or
a demotion from it, costs; stored values are valid), the xxh3 pass alone per value, and what
``header + payload`` (a ``b"".join``) would cost per value.

Each repeat moves about ``--batch-mib`` MiB per mode, in a fresh random order of modes; MB/s is
the median over repeats, and tier/raw and tier/C are medians over repeats of the ratio within one
repeat (tier pass vs the best raw mode's, or redis-benchmark's, pass of that repeat), which
cancels the machine's slow drifts. Every tier mode gets its own tier/C; the summary's tier
row is the default call (batch ``put`` / batch ``get``, never the best of several tier modes,
which would flatter the tier), with ``get_into`` beside it. Nothing is asserted.

    flock /tmp/lmtier-bench.lock python benchmarks/redis_tier.py [--repeats 5] [--batch-mib 128]
        [--sizes 1MiB,4MiB,37.7MB] [--ops put,get] [--no-cluster | --no-standalone] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, when run as a script

import redis
import redis.asyncio as aredis
from redis.cluster import RedisCluster
from redis.connection import ConnectionPool, Encoder, PythonRespSerializer

from lmtier.framing import checksum, encode_header
from lmtier.keys import ChunkKey, make_namespace
from lmtier.kit import Payload
from lmtier_backends.redis.backend import RedisBackend, open_redis_backend
from lmtier_backends.redis.config import RedisConfig
from tests.support.redis_server import redis_available, start_cluster, start_redis

MB = 1e6
QWEN3_8B_CHUNK = 36 * 2 * 8 * 128 * 2 * 256  # 37,748,736 bytes
SIZES = {"1MiB": 1 << 20, "4MiB": 4 << 20, "37.7MB": QWEN3_8B_CHUNK}

Pass = Callable[[], float]  # runs one pass, returns seconds
CARRIED = "tier batch, checksum carried from another tier"
C_CLIENT = "redis-benchmark (C)"


# -- raw redis-py modes (blocking) ------------------------------------------------------------------
def _sync_modes(client: Any, names: list[bytes], values: list[bytes], tag: str,
                pipelined: bool = True) -> dict[str, tuple[Pass, Pass]]:
    def put_each() -> float:
        t = time.perf_counter()
        for n, v in zip(names, values, strict=True):
            client.set(n, v)
        return time.perf_counter() - t

    def get_each() -> float:
        t = time.perf_counter()
        got = [client.get(n) for n in names]  # kept, like a caller that needs the whole batch
        dt = time.perf_counter() - t
        del got
        return dt

    def put_pipe() -> float:
        t = time.perf_counter()
        p = client.pipeline(transaction=False)
        for n, v in zip(names, values, strict=True):
            p.set(n, v)
        p.execute()
        return time.perf_counter() - t

    def get_pipe() -> float:
        t = time.perf_counter()
        p = client.pipeline(transaction=False)
        for n in names:
            p.get(n)
        got = p.execute()
        dt = time.perf_counter() - t
        del got
        return dt

    modes = {f"{tag} one by one": (put_each, get_each)}
    if pipelined:
        modes[f"{tag} pipeline"] = (put_pipe, get_pipe)
    return modes


def _async_mode(port: int, names: list[bytes], values: list[bytes], loop: asyncio.AbstractEventLoop,
                holder: list[Any]) -> dict[str, tuple[Pass, Pass]]:
    client = aredis.Redis(host="127.0.0.1", port=port)
    holder.append(client)

    async def put() -> None:
        for n, v in zip(names, values, strict=True):
            await client.set(n, v)

    async def get() -> None:
        got = [await client.get(n) for n in names]
        del got

    def timed(fn: Callable[[], Any]) -> Pass:
        def run() -> float:
            t = time.perf_counter()
            loop.run_until_complete(fn())
            return time.perf_counter() - t
        return run

    return {"redis.asyncio one by one": (timed(put), timed(get))}


# -- the tier ------------------------------------------------------------------------------------
TIER_BATCH = "tier batch (put / get)"


def _tier_modes(backend: RedisBackend, keys: list[ChunkKey], values: list[bytes],
                loop: asyncio.AbstractEventLoop) -> dict[str, tuple[Pass | None, Pass | None]]:
    items = list(zip(keys, values, strict=True))
    outs = [bytearray(len(v)) for v in values]
    for o in outs:  # pre-touch the caller's buffers, like an engine's reused pinned pages
        o[:] = b"\0" * len(o)

    def timed(fn: Callable[[], Any]) -> Pass:
        def run() -> float:
            t = time.perf_counter()
            loop.run_until_complete(fn())
            return time.perf_counter() - t
        return run

    async def put_batch() -> None:
        await backend.put(items)

    async def get_batch() -> None:
        got = await backend.get(keys)
        assert all(g is not None for g in got)
        del got  # the views go back to the slab

    async def get_into_batch() -> None:
        assert all(await backend.get_into(keys, outs))

    async def put_each() -> None:
        for it in items:
            await backend.put([it])

    async def get_each() -> None:
        for k in keys:
            (g,) = await backend.get([k])
            assert g is not None
            del g

    return {  # get_into reads what the batch put stored (the same puts, timed once)
        TIER_BATCH: (timed(put_batch), timed(get_batch)),
        "tier batch (get_into)": (None, timed(get_into_batch)),
        "tier one per call (put / get)": (timed(put_each), timed(get_each)),
    }


def _same_keys_get(reader: RedisBackend, keys: list[ChunkKey], loop: asyncio.AbstractEventLoop) -> Pass:
    """A batch get through ``reader`` (another handle on the tier's keys)."""
    def run() -> float:
        t = time.perf_counter()
        got = loop.run_until_complete(reader.get(keys))
        dt = time.perf_counter() - t
        assert all(g is not None for g in got)
        del got
        return dt
    return run


def _carried_put(backend: RedisBackend, keys: list[ChunkKey], values: list[bytes],
                 loop: asyncio.AbstractEventLoop) -> Pass:
    """The tier's batch put of values that carry their checksum (computed here, untimed)."""
    items = [(k, Payload.of(v, checksum=checksum(v))) for k, v in zip(keys, values, strict=True)]

    def run() -> float:
        t = time.perf_counter()
        loop.run_until_complete(backend.put(items))
        return time.perf_counter() - t
    return run


# -- redis-benchmark -------------------------------------------------------------------------------
def redis_benchmark(port: int, size: int, requests: int, clients: int, cluster: bool) -> dict[str, float]:
    """MB/s of SET and GET from ``redis-benchmark --csv`` (rps x value size)."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-d", str(size),
           "-n", str(requests), "-c", str(clients), "-P", "1", "--csv"]
    if cluster:
        cmd.append("--cluster")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    rates: dict[str, float] = {}
    for row in csv.reader(io.StringIO(out)):
        if len(row) >= 2 and row[0] in ("SET", "GET"):
            rates[row[0]] = float(row[1]) * size / MB
    return rates


# -- driver --------------------------------------------------------------------------------------
def measure(topology: str, port: int, size: int, args: argparse.Namespace,
            loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
    count = max(2, round(args.batch_mib * (1 << 20) / size))
    ns = make_namespace(bench="redis_tier", size=size, run=os.urandom(4).hex())
    keys = [ChunkKey(ns, os.urandom(16)) for _ in range(count)]
    names = [f"raw:{k}".encode() for k in keys]
    values = [os.urandom(size) for _ in range(count)]
    cluster = topology == "cluster"
    holder: list[Any] = []

    modes: dict[str, tuple[Pass | None, Pass | None]] = {}
    if cluster:
        rc = RedisCluster(host="127.0.0.1", port=port)
        holder.append(rc)
        modes.update(_sync_modes(rc, names, values, "RedisCluster"))
    else:
        default = redis.Redis(host="127.0.0.1", port=port)
        enc = Encoder("utf-8", "strict", False)
        packer = redis.Redis(connection_pool=ConnectionPool(
            host="127.0.0.1", port=port, command_packer=PythonRespSerializer(6000, enc.encode)))
        holder += [default, packer]
        modes.update(_sync_modes(default, names, values, "Redis (hiredis packer)", pipelined=False))
        modes.update(_sync_modes(packer, names, values, "Redis (PythonRespSerializer)"))
        modes.update(_async_mode(port, names, values, loop, holder))
    raw_modes = list(modes)
    options = {"url": f"redis://127.0.0.1:{port}/0", "cluster": cluster, "read_timeout_s": 60,
               "recv_pool_bytes": max(256 << 20, int(count * size * 1.1))}
    backend = loop.run_until_complete(open_redis_backend(RedisConfig(key_prefix="tier:", **options)))
    carried = loop.run_until_complete(open_redis_backend(RedisConfig(
        key_prefix="carried:", **{**options, "recv_pool_bytes": 0})))
    single = loop.run_until_complete(open_redis_backend(RedisConfig(
        key_prefix="tier1:", put_streams=1, **{**options, "recv_pool_bytes": 0})))
    modes.update(_tier_modes(backend, keys, values, loop))
    if "put" in args.ops:
        modes[CARRIED] = (_carried_put(carried, keys, values, loop), None)
        modes["tier batch, put_streams=1"] = (_tier_modes(single, keys, values, loop)[TIER_BATCH][0], None)
    one_stream_reader = loop.run_until_complete(open_redis_backend(RedisConfig(
        key_prefix="tier:", get_streams=1, **options)))  # reads what the batch put stored
    if "get" in args.ops:
        modes["tier batch get, get_streams=1"] = (None, _same_keys_get(one_stream_reader, keys, loop))
    tier_modes = [m for m in modes if m not in raw_modes]

    for mode in modes:  # one untimed pass: every key exists, first-touch costs are paid
        for timed_pass in modes[mode]:
            if timed_pass is not None:
                timed_pass()
    runs: dict[tuple[str, str], list[float]] = {}
    order = [*modes, C_CLIENT]
    bench_clients = 3 if cluster else 1
    for _ in range(args.repeats):
        random.shuffle(order)
        for mode in order:
            if mode == C_CLIENT:  # SET then GET of the same volume, in this repeat's order
                rates = redis_benchmark(port, size, count, bench_clients, cluster)
                for op in args.ops:
                    runs.setdefault((C_CLIENT, op), []).append(rates["SET" if op == "put" else "GET"])
                continue
            for op, timed_pass in zip(("put", "get"), modes[mode], strict=True):
                if timed_pass is not None and op in args.ops:
                    runs.setdefault((mode, op), []).append(count * size / timed_pass() / MB)

    # the checksum pass alone, over the same (cache-cold) values the puts send
    hashes = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for v in values:
            checksum(v)
        hashes.append((time.perf_counter() - t) / count)

    # b"".join(header, payload): what a tier that joins before SET would pay per value
    header = encode_header(keys[0], values[0])
    joins = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for v in values:
            b"".join((header, v))
        joins.append((time.perf_counter() - t) / count)

    loop.run_until_complete(backend.aclose())
    loop.run_until_complete(carried.aclose())
    loop.run_until_complete(single.aclose())
    loop.run_until_complete(one_stream_reader.aclose())
    for c in holder:
        if isinstance(c, aredis.Redis):
            loop.run_until_complete(c.aclose())
        else:
            c.close()
    cleanup = RedisCluster(host="127.0.0.1", port=port) if cluster else redis.Redis(host="127.0.0.1", port=port)
    if cluster:
        cleanup.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        cleanup.flushall()
    cleanup.close()

    result: dict[str, Any] = {"topology": topology, "size": size, "count": count, "repeats": args.repeats,
                              "ops": {}}
    for op in args.ops:
        best_raw = max(raw_modes, key=lambda m: statistics.median(runs[(m, op)]))
        # the tier's row against redis-benchmark is its default call (batch put / batch get), not
        # the best of several tier modes: a max over noisy modes would flatter the tier
        best_tier = TIER_BATCH
        c_runs = runs[(C_CLIENT, op)]
        rows = []
        for mode in modes:
            if (mode, op) not in runs:
                continue
            per_raw = [t / r for t, r in zip(runs[(mode, op)], runs[(best_raw, op)], strict=True)]
            q1, _, q3 = statistics.quantiles(per_raw, n=4)
            row = {"mode": mode, "MBps": statistics.median(runs[(mode, op)]),
                   "vs_best_raw": statistics.median(per_raw), "vs_best_raw_iqr": [q1, q3],
                   "is_tier": mode in tier_modes}
            if mode in tier_modes:  # each tier mode against redis-benchmark, within each repeat
                per_c = [t / c for t, c in zip(runs[(mode, op)], c_runs, strict=True)]
                q1c, _, q3c = statistics.quantiles(per_c, n=4)
                row.update(vs_redis_benchmark=statistics.median(per_c), vs_redis_benchmark_iqr=[q1c, q3c])
            rows.append(row)
        tier_row = next(r for r in rows if r["mode"] == best_tier)
        result["ops"][op] = {"rows": rows, "best_raw": best_raw, "best_tier": best_tier,
                             "redis_benchmark_MBps": statistics.median(c_runs),
                             "best_tier_vs_redis_benchmark": tier_row["vs_redis_benchmark"],
                             "best_tier_vs_redis_benchmark_iqr": tier_row["vs_redis_benchmark_iqr"],
                             "redis_benchmark_cmd": f"redis-benchmark -t set,get -d {size} -n {count} "
                                                    f"-c {bench_clients} -P 1"
                                                    f"{' --cluster' if cluster else ''} --csv"}
    if "put" in args.ops:
        per_set = size / (statistics.median(runs[(result["ops"]["put"]["best_raw"], "put")]) * MB)
        result["join_ms_per_value"] = statistics.median(joins) * 1e3
        result["join_share_of_best_raw_put"] = statistics.median(joins) / per_set
        result["checksum_ms_per_value"] = statistics.median(hashes) * 1e3
        result["checksum_share_of_best_raw_put"] = statistics.median(hashes) / per_set
    return result


def report(r: dict[str, Any]) -> None:
    label = next(k for k, v in SIZES.items() if v == r["size"]) if r["size"] in SIZES.values() else str(r["size"])
    print(f"\n== {r['topology']}, {label} values x {r['count']} per pass")
    for op, o in r["ops"].items():
        cli = o["redis_benchmark_MBps"]
        print(f"  {op.upper():3}  redis-benchmark {cli:8.0f} MB/s   ({o['redis_benchmark_cmd']})")
        for row in sorted(o["rows"], key=lambda x: -x["MBps"]):
            mark = "*" if row["mode"] == o["best_raw"] else " "
            q1, q3 = row["vs_best_raw_iqr"]
            vs_c = ""
            if "vs_redis_benchmark" in row:
                c1, c3 = row["vs_redis_benchmark_iqr"]
                vs_c = f"   x{row['vs_redis_benchmark']:.2f} of redis-benchmark [IQR {c1:.2f}-{c3:.2f}]"
            print(f"     {mark} {row['mode']:42} {row['MBps']:8.0f} MB/s   x{row['vs_best_raw']:.2f} of best raw"
                  f" [IQR {q1:.2f}-{q3:.2f}]{vs_c}")
        q1, q3 = o["best_tier_vs_redis_benchmark_iqr"]
        print(f"       {o['best_tier']} / redis-benchmark, per repeat: x{o['best_tier_vs_redis_benchmark']:.2f}"
              f" [IQR {q1:.2f}-{q3:.2f}]")
    if "checksum_ms_per_value" in r:
        print(f"  xxh3 pass alone: {r['checksum_ms_per_value']:.3f} ms per value = "
              f"{100 * r['checksum_share_of_best_raw_put']:.1f}% of the best raw SET time")
        print(f"  b''.join(header, payload): {r['join_ms_per_value']:.3f} ms per value = "
              f"{100 * r['join_share_of_best_raw_put']:.1f}% of the best raw SET time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-mib", type=float, default=128.0, help="MiB moved per mode per repeat")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {list(SIZES)}")
    ap.add_argument("--ops", default="put,get", help="comma-separated, of put,get")
    ap.add_argument("--no-cluster", action="store_true")
    ap.add_argument("--no-standalone", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if not redis_available() or shutil.which("redis-benchmark") is None:
        print("redis_tier: skipped, redis-server / redis-cli / redis-benchmark not on PATH")
        return 0
    sizes = [SIZES[s] for s in args.sizes.split(",")]
    args.ops = [op for op in ("put", "get") if op in args.ops.split(",")]
    base = Path(tempfile.mkdtemp(prefix="lmtier-redis-bench-"))
    loop = asyncio.new_event_loop()
    results = []
    print(f"redis_tier: redis-py {redis.__version__}, {os.cpu_count()} CPUs, repeats={args.repeats}, "
          f"~{args.batch_mib:.0f} MiB per pass; MB/s = 1e6 bytes/s of payload; medians")
    try:
        if not args.no_standalone:
            server = start_redis(base)
            try:
                for size in sizes:
                    results.append(measure("standalone", server.port, size, args, loop))
                    report(results[-1])
            finally:
                server.stop()
        if not args.no_cluster:
            cluster = start_cluster(base)
            try:
                for size in sizes:
                    results.append(measure("cluster", cluster.nodes[0].port, size, args, loop))
                    report(results[-1])
            finally:
                cluster.stop()
    finally:
        loop.close()
        shutil.rmtree(base, ignore_errors=True)
    print("\nsummary: the tier (batch put / batch get, default options) vs the best raw redis-py mode and "
          "redis-benchmark (same run; ratios are medians of per-repeat ratios)")
    print(f"  {'topology':10} {'size':7} {'op':3} {'tier MB/s':>9} {'raw MB/s':>9} {'C MB/s':>8} "
          f"{'tier/raw':>8} {'IQR':>9} {'tier/C':>7}  best tier mode / best raw mode")
    for r in results:
        label = next((k for k, v in SIZES.items() if v == r["size"]), str(r["size"]))
        for op, o in r["ops"].items():
            rows = {row["mode"]: row for row in o["rows"]}
            t, raw = rows[o["best_tier"]], rows[o["best_raw"]]
            q1, q3 = t["vs_best_raw_iqr"]
            print(f"  {r['topology']:10} {label:7} {op:3} {t['MBps']:9.0f} {raw['MBps']:9.0f} "
                  f"{o['redis_benchmark_MBps']:8.0f} {t['vs_best_raw']:8.2f} {q1:4.2f}-{q3:4.2f} "
                  f"{o['best_tier_vs_redis_benchmark']:7.2f}  {o['best_tier']} / {o['best_raw']}")
            for extra, what in (("tier batch, put_streams=1", "tier batch put, one stream per node"),
                                (CARRIED, "tier batch put, checksum carried from another tier: no hashing"),
                                ("tier batch (get_into)", "tier batch get_into, the caller's buffers")):
                if extra in rows:
                    d = rows[extra]
                    q1, q3 = d["vs_best_raw_iqr"]
                    print(f"  {'':10} {'':7} {'':3} {d['MBps']:9.0f} {'':9} {'':8} {d['vs_best_raw']:8.2f} "
                          f"{q1:4.2f}-{q3:4.2f} {d['vs_redis_benchmark']:7.2f}  ({what})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
