"""``StorageManager.lookup`` of a 10,000-token prompt over two tiers (cpu + disk); goal < 1 ms.

The prompt is 10,000 tokens: 40 chunk keys of 256 tokens (39 full chunks and the trailing partial
one, ``include_partial=True``). Measured, as medians of ``--repeats``:

* ``chunk_keys`` alone (xxh3-128 chained hashing of the token bytes);
* ``lookup`` without hashing (keys precomputed) and ``chunk_keys + lookup`` (what a connector
  pays per request), for four placements: every chunk in the cpu tier; every chunk only on disk
  (the cpu tier is asked first and misses); the first half in cpu and the rest on disk; none
  stored (both tiers asked for everything);
* the raw baseline of the same run: the tiers' own ``contains`` called directly with the keys each
  one is asked by the manager, so ``lookup / raw`` is the manager's overhead (breakers, metrics,
  the prefix walk).

If the disk tier cannot be imported, two cpu tiers are used and the header says so. Nothing is
asserted.

    python benchmarks/lookup.py [--repeats 500] [--tokens 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
from _common import fmt_ratio, fmt_seconds, machine_line, median, print_table, time_async, time_sync
from prometheus_client import CollectorRegistry

from lmtier.keys import chunk_keys, make_namespace
from lmtier.manager import StorageManager

GOAL_S = 1e-3
CHUNK_TOKENS = 256


def _tiers(root: Path) -> tuple[list[dict], str]:
    hot = {"name": "hot", "backend": "cpu", "options": {"max_bytes": "64MiB", "pinned": False}}
    if importlib.util.find_spec("lmtier_backends.disk.backend") is not None:
        cold = {"name": "cold", "backend": "disk", "options": {"root": str(root), "max_bytes": "1GiB"}}
        return [hot, cold], "cpu + disk"
    cold = {"name": "cold", "backend": "cpu", "options": {"max_bytes": "64MiB", "pinned": False}}
    return [hot, cold], "cpu + cpu (the disk tier is not installed here)"


async def run(repeats: int, n_tokens: int, root: Path) -> None:
    tiers, which = _tiers(root)
    tokens = np.random.default_rng(7).integers(0, 151_936, n_tokens)
    ns = make_namespace(bench="lookup", model="Qwen/Qwen3-8B")
    keys = chunk_keys(tokens, ns, CHUNK_TOKENS, include_partial=True)
    n = len(keys)
    hashing = median(time_sync(lambda: chunk_keys(tokens, ns, CHUNK_TOKENS, include_partial=True),
                               repeats=repeats, warmup=5))

    mgr = await StorageManager.from_config({"chunk_tokens": CHUNK_TOKENS, "tiers": tiers},
                                           metrics_registry=CollectorRegistry())
    hot, cold = mgr.tiers[0].backend, mgr.tiers[1].backend
    value = bytes(4096)  # lookup reads presence only: the size of the values does not matter
    rows = []
    verdicts = []
    try:
        half = n // 2
        placements = {
            "all in cpu": (keys, keys),
            "all on disk only": ([], keys),
            "half cpu, half disk": (keys[:half], keys),
            "none stored": ([], []),
        }
        for name, (in_hot, in_cold) in placements.items():
            await hot.delete(keys)
            await cold.delete(keys)
            if in_cold:
                await cold.put([(k, value) for k in in_cold])
            if in_hot:
                await hot.put([(k, value) for k in in_hot])
            expected = n if in_cold else (len(in_hot) if in_hot else 0)
            got = await mgr.lookup(keys)
            if got != expected:  # the setup is wrong, not slow: the figures would mean nothing
                raise RuntimeError(f"{name}: lookup says {got}, expected {expected}")

            # what the manager asks each tier: cpu everything, disk what cpu lacks
            hot_set = set(in_hot)
            missing_in_hot = [k for k in keys if k not in hot_set]

            async def raw(missing: list = missing_in_hot) -> None:
                await hot.contains(keys)
                if missing:
                    await cold.contains(missing)

            async def hashed_lookup() -> None:
                await mgr.lookup(chunk_keys(tokens, ns, CHUNK_TOKENS, include_partial=True))

            t_raw = median(await time_async(raw, repeats=repeats, warmup=5))
            t_lookup = median(await time_async(lambda: mgr.lookup(keys), repeats=repeats, warmup=5))
            t_hashed = median(await time_async(hashed_lookup, repeats=repeats, warmup=5))
            rows.append([name, f"{got}/{n}", fmt_seconds(t_lookup), fmt_seconds(t_hashed), fmt_seconds(t_raw),
                         fmt_ratio(t_lookup / t_raw), "yes" if t_hashed < GOAL_S else "NO"])
            verdicts.append(t_hashed < GOAL_S)
        await hot.delete(keys)
        await cold.delete(keys)
    finally:
        await mgr.aclose()

    print(f"lookup of a {n_tokens:,}-token prompt: {n} keys of {CHUNK_TOKENS} tokens; tiers: {which}; "
          f"medians of {repeats}")
    print(f"chunk_keys alone (hashing {n_tokens:,} tokens): {fmt_seconds(hashing)}")
    print_table(["placement", "hit chunks", "lookup", "chunk_keys + lookup", "raw tier contains",
                 "lookup / raw", f"< {fmt_seconds(GOAL_S)}"], rows)
    print(f"  'raw tier contains' calls the tiers' contains directly with what the manager asks each; "
          f"goal {'met' if all(verdicts) else 'NOT met'} (< 1 ms incl. hashing) in every placement")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--tokens", type=int, default=10_000)
    args = p.parse_args(argv)
    print(f"lookup benchmark ({machine_line()})\n")
    with tempfile.TemporaryDirectory(prefix="lmtier-bench-lookup-") as tmp:
        asyncio.run(run(args.repeats, args.tokens, Path(tmp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
