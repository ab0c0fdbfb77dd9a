"""``lmtier demo``: :func:`lmtier.demo.run_demo` when it exists, else the storage-level demo defined here."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmtier.cli._common import EXIT_PROBLEMS, QWEN3_8B_BYTES_PER_TOKEN, fmt_bytes
from lmtier.errors import ConfigError

__all__ = ["add_parser", "demo_dir", "storage_demo"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # add_help=False: `lmtier demo --help` reaches the demo's own parser with the other arguments
    m = sub.add_parser("demo", add_help=False, help="run the demo (try `lmtier demo --help`)")
    m.add_argument("--storage", action="store_true", help="run the storage-level demo even if lmtier.demo exists")
    m.add_argument("--server", action="store_true",
                   help="run the workload through one lmtier serve and two engine processes (lmtier.server.demo)")
    m.set_defaults(run=_cmd_demo, passes_extra=True)


def _cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    if args.server:
        from lmtier.server.demo import run_server_demo

        return run_server_demo(extra)
    # lmtier.demo (the engine-level demo) takes over when it exists; it parses its own arguments
    if not args.storage and importlib.util.find_spec("lmtier.demo") is not None:
        from lmtier.demo import run_demo  # type: ignore[import-not-found,unused-ignore]

        return int(run_demo(extra) or 0)
    return storage_demo(extra)


def _demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmtier demo",
        description="Storage-level demo: a synthetic prompt's KV chunks stored in cpu + disk tiers, then "
                    "retrieved by a fresh StorageManager (an empty cpu tier, as a new process sees it) from disk.")
    p.add_argument("--storage", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=10_000, help="prompt length in tokens (default 10000)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--scale", type=int, default=16,
                   help="divide Qwen3-8B's KV bytes per token (147,456) by this, so the demo runs in "
                        "seconds (default 16: 2.4 MB per 256-token chunk)")
    p.add_argument("--dir", metavar="PATH", help="disk tier root to use and keep (default: a temporary directory)")
    return p


@contextmanager
def demo_dir(path: str | None) -> Iterator[Path]:
    """The demos' working directory: ``path`` (created, kept) or a temporary one (removed)."""
    if path:
        root = Path(path).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="lmtier-demo-") as tmp:
        yield Path(tmp)


def storage_demo(argv: Sequence[str] | None = None) -> int:
    """The storage-level demo (``lmtier demo`` until :mod:`lmtier.demo` exists).

    Prints grep-able lines: ``stored N of M tokens`` and ``hit N of M tokens``. Exit 0 when the
    second pass hits every stored token from disk and every byte read back matches.
    """
    args = _demo_parser().parse_args(list(argv or []))
    if args.tokens < 1 or args.chunk_tokens < 1 or args.scale < 1:
        raise ConfigError("--tokens, --chunk-tokens and --scale must be positive")
    with demo_dir(args.dir) as root:
        return asyncio.run(_storage_demo(args.tokens, args.chunk_tokens, args.scale, root))


def _demo_value(key: Any, nbytes: int) -> bytes:
    """Deterministic stand-in for the KV bytes of one chunk (a function of its key)."""
    import numpy as np

    return np.random.default_rng(int.from_bytes(key.digest[:8], "little")).bytes(nbytes)


async def _storage_demo(n_tokens: int, chunk_tokens: int, scale: int, root: Path) -> int:
    import numpy as np
    import xxhash
    from prometheus_client import CollectorRegistry

    from lmtier.keys import chunk_keys, make_namespace
    from lmtier.manager import StorageManager

    bytes_per_token = max(1, QWEN3_8B_BYTES_PER_TOKEN // scale)
    chunk_bytes = bytes_per_token * chunk_tokens
    tokens = np.random.default_rng(2024).integers(0, 151_936, n_tokens)  # Qwen3's vocabulary size
    ns = make_namespace(engine="lmtier-demo", model="Qwen/Qwen3-8B", bytes_per_token=bytes_per_token,
                        chunk_tokens=chunk_tokens)
    keys = chunk_keys(tokens, ns, chunk_tokens)  # full chunks only: a partial chunk is recomputed
    total = chunk_bytes * len(keys)
    config = {"chunk_tokens": chunk_tokens, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": max(total * 5 // 4, 16 << 20), "pinned": False}},
        {"name": "local", "backend": "disk", "options": {"root": str(root), "max_bytes": max(total * 2, 16 << 20)}},
    ]}
    print(f"lmtier storage demo: {n_tokens} prompt tokens -> {len(keys)} chunks of {chunk_tokens} tokens, "
          f"{fmt_bytes(chunk_bytes)} each (Qwen3-8B KV shape / {scale}); tiers: hot (cpu) -> local (disk at {root})")
    if not keys:
        print(f"stored 0 of {n_tokens} tokens (the prompt is shorter than one chunk)")
        return 0

    def hits_by_tier(mgr: StorageManager) -> str:
        return ", ".join(f"{t.name} {int(mgr.metrics.registry.get_sample_value('lmtier_tier_hits_total', {'tier': t.name}) or 0)}"
                         for t in mgr.tiers)

    # pass 1: process A computes the KV, misses, stores it
    expected: dict[Any, int] = {}
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        hit = await mgr.lookup(keys) * chunk_tokens
        print(f"[pass 1] lookup: hit {hit} of {n_tokens} tokens")
        computed = [_demo_value(k, chunk_bytes) for k in keys]  # "the engine computed the KV"
        expected.update((k, xxhash.xxh3_64_intdigest(v)) for k, v in zip(keys, computed, strict=True))
        t0 = time.perf_counter()
        for start in range(0, len(keys), 8):  # 8 chunks per put: the engine stores as it goes
            await mgr.put(list(zip(keys[start:start + 8], computed[start:start + 8], strict=True)))
        await mgr.flush()
        dt = time.perf_counter() - t0
        present = await mgr.contains(keys)
        stored = sum(present) * chunk_tokens
        print(f"[pass 1] stored {stored} of {n_tokens} tokens ({sum(present)} chunks, {fmt_bytes(total)}) "
              f"in {dt:.2f} s ({total / dt / 1e9:.2f} GB/s) into hot and local")
        del computed
        if n_tokens - len(keys) * chunk_tokens:
            print(f"[pass 1] the last {n_tokens - len(keys) * chunk_tokens} tokens do not fill a chunk: not stored")
        hit = await mgr.lookup(keys) * chunk_tokens
        print(f"[pass 1] lookup after storing: hit {hit} of {n_tokens} tokens")

    # pass 2: a fresh manager (what a new process opens): empty cpu tier, same disk root
    ok = True
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        hit = await mgr.lookup(keys) * chunk_tokens
        print(f"[pass 2, fresh process] lookup: hit {hit} of {n_tokens} tokens")
        t0 = time.perf_counter()
        fetched = await mgr.get(keys[: hit // chunk_tokens])
        dt = time.perf_counter() - t0
        good = sum(1 for k, v in zip(keys, fetched, strict=False)
                   if v is not None and xxhash.xxh3_64_intdigest(v) == expected[k])
        nbytes = sum(memoryview(v).nbytes for v in fetched if v is not None)
        del fetched
        print(f"[pass 2, fresh process] retrieved {good * chunk_tokens} of {n_tokens} tokens byte-exact "
              f"({fmt_bytes(nbytes)} in {dt:.2f} s, {nbytes / max(dt, 1e-9) / 1e9:.2f} GB/s); "
              f"chunk hits by tier: {hits_by_tier(mgr)}")
        await mgr.flush()  # promotions into the cpu tier
        await mgr.get(keys)  # the values are dropped at once: only the hit counts matter here
        print(f"[pass 2, fresh process] read again after promotion: chunk hits by tier so far: {hits_by_tier(mgr)}")
        ok = hit == stored and good * chunk_tokens == stored and stored == len(keys) * chunk_tokens
    print("demo OK" if ok else "demo FAILED: the fresh pass did not hit every stored token byte-exact")
    return 0 if ok else EXIT_PROBLEMS
