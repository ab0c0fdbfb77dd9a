"""TTFT with prefix reuse: HF transformers + lmtier on the GPU, the seeds' CPU-offloading workload.

A Qwen3-8B-shaped model built from its config with random bf16 weights (no download), 10
prompts of 10,000 random tokens (shared-nothing), one output token each; run 1 computes and
stores every full 256-token chunk, run 2 reuses them. Everything a ratio is taken against is
measured in the same run:

* ``full``: HF's own full prefill (``DynamicCache``, sdpa), median over the prompts;
* ``bound``: ``full / (suffix + link)``, where ``suffix`` is the suffix forward with the prefix
  KV already on the GPU (our cache, cropped back to the hit) and ``link`` the pinned
  ``cudaMemcpy`` (torch copy pinned -> device) of the prefix's bytes;
* retrieval GB/s: the native onload of the hit chunks straight from the cpu tier's pinned slab,
  alone (all layers in one launch, and one launch per layer) and inside the cached prefill
  (overlapped with compute), against the link;
* logits: max |difference| of the last-position logits to HF's full prefill, next to the same
  difference for HF itself computing prefix and suffix in two forwards (the bf16 noise floor).

Then the second run from a disk-only tier (each pass a fresh cache over the stored prompts, warmed
up by one miss and one hit of a prompt outside the measured set, so its engine knows its prefill
speed): cold (page cache dropped file by file with ``posix_fadvise(DONTNEED)`` after ``fsync``;
residency measured with ``mincore``) with ``load_policy: always`` (every hit loaded, the behaviour
before lmtier weighed hits) and with ``load_policy: cost`` (the default: a hit is loaded only
where that is expected to beat recomputing it; the first prompt, with no estimate of the disk
yet, loads to learn), then warm (every file read into the page cache first), and last a cpu tier
over the disk tier with the first half of each prompt's chunks in RAM and the second half only on
the cold disk, with both policies.

    PYTHONPATH=. python benchmarks/ttft_gpu.py --out results/
    PYTHONPATH=. python benchmarks/ttft_gpu.py --tiny          # CPU smoke test of the script
    PYTHONPATH=. python benchmarks/ttft_gpu.py --only-disk     # skip the cpu-tier pass
    PYTHONPATH=. python benchmarks/ttft_gpu.py --report results/ttft_gpu.json   # the table of a run cut short

Prints a table last; ``--out`` also writes the figures as JSON, after each phase and each disk pass
(a run cut short keeps what it finished). Timings are wall-clock TTFT
(call to logits ready) and CUDA-event medians; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

GB = 1e9


# -- setup ---------------------------------------------------------------------------------------
def registry() -> Any:
    """The backend registry; registers the built-in tiers when entry points are not installed."""
    from lmtier.registry import BackendRegistry

    reg = BackendRegistry.discover()
    if "cpu" not in reg.names():  # running from a checkout on PYTHONPATH, not pip-installed
        import lmtier_backends.cpu.plugin
        import lmtier_backends.disk.plugin

        reg.register_plugin(lmtier_backends.cpu.plugin)
        reg.register_plugin(lmtier_backends.disk.plugin)
    return reg


def build_model(args: argparse.Namespace, device: torch.device) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if args.tiny:
        cfg = Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, vocab_size=2000, max_position_embeddings=4096)
    else:
        cfg = Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # weights are created (and randomly initialised) on the GPU
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


# -- timing --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def wall_ms(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def event_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    """Median CUDA-event milliseconds of ``fn`` on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max().item())


# -- page cache ----------------------------------------------------------------------------------
def files_under(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            yield Path(dirpath) / name


def drop_page_cache(root: Path, paths: list[Path] | None = None) -> None:
    """Write back and evict the tier's files (or just ``paths``) from the page cache (no root needed)."""
    for path in paths if paths is not None else files_under(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(root: Path) -> float:
    """Fraction of the tier's file pages in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = resident = 0
    for path in files_under(root):
        size = path.stat().st_size
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) == 0:
                resident += sum(v & 1 for v in vec)
                total += pages
            libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else float("nan")


def raw_disk_reads(kv: Any, prompts: list[torch.Tensor], root: Path, threads: int) -> dict[str, float]:
    """The disk's own speed for these files: cold then warm, plain reads into pinned memory."""
    import concurrent.futures

    import numpy as np

    backend = kv.manager.tiers[0].backend
    paths = [Path(backend.path_of(k)) for p in prompts for k in kv.keys(p)[: (p.shape[1] - 1) // kv.chunk_tokens]]
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    dst = torch.empty(total, dtype=torch.uint8, pin_memory=torch.cuda.is_available()).numpy()
    offs = np.cumsum([0, *sizes[:-1]]).tolist()

    def read(i: int) -> None:
        view = dst[offs[i]: offs[i] + sizes[i]].data
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            got = 0
            while got < sizes[i]:
                got += os.preadv(fd, [view[got:]], got)
        finally:
            os.close(fd)

    out: dict[str, float] = {"bytes": float(total), "files": float(len(paths))}
    drop_page_cache(root, paths)  # only these: the other prompts' files stay as the cold pass left them
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for state in ("cold", "warm"):
            t = time.perf_counter()
            list(pool.map(read, range(len(paths))))
            out[f"{state}_GBps"] = total / (time.perf_counter() - t) / GB
    return out


# -- the phases ----------------------------------------------------------------------------------
def hf_full_prefill(model: Any, ids: torch.Tensor) -> torch.Tensor:
    from transformers import DynamicCache

    with torch.no_grad():
        return model(ids, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1).logits[:, -1]


def hf_split_prefill(model: Any, ids: torch.Tensor, hit: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """HF computing the prefix, then (timed) the suffix with the prefix on the GPU."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        model(ids[:, :hit], past_key_values=cache, use_cache=True, logits_to_keep=1)
        ms, out = wall_ms(lambda: model(ids[:, hit:], past_key_values=cache, use_cache=True,
                                        logits_to_keep=1), device)
    return ms, out.logits[:, -1]


def cached_runs(model: Any, prompts: list[torch.Tensor], cfg: dict[str, Any], args: argparse.Namespace,
                device: torch.device, full_logits: list[torch.Tensor], *, label: str) -> dict[str, Any]:
    """Run 1 (compute + store) and run 2 (reuse) over ``prompts`` on one cache."""
    from lmtier.integrations.transformers import KVPrefixCache

    reg = registry()
    res: dict[str, Any] = {"label": label}
    opts = dict(model_id="qwen3-8b-shaped-random-bf16-seed0", registry=reg, timing=device.type == "cuda",
                layerwise=not args.no_layerwise, block_size=args.block_size)
    kv = KVPrefixCache(model, cfg, **opts)
    try:
        # warm-up on prompts outside the measured set: miss, store, hit
        warm = torch.randint(0, model.config.vocab_size, (1, args.tokens),
                             generator=torch.Generator().manual_seed(10_000))
        kv.prefill(warm)
        kv.flush()
        kv.prefill(warm)
        sync(device)
        first = []
        for ids in prompts:
            ms, _ = wall_ms(partial(kv.prefill, ids), device)
            first.append(ms)
        t0 = time.perf_counter()
        kv.flush()
        res["store_flush_ms"] = (time.perf_counter() - t0) * 1e3
        res["first_ms"] = first
        for name, measure_extras in (("second", True),):
            ttft, hits, diffs, load_ms, staged, suffix, fetch = [], [], [], [], [], [], []
            for i, ids in enumerate(prompts):
                ms, out = wall_ms(partial(kv.prefill, ids), device)
                logits, cache, hit = out
                ttft.append(ms)
                hits.append(hit)
                diffs.append(maxdiff(logits[:, -1], full_logits[i]))
                assert kv.last is not None
                staged.append(kv.last.staged_chunks)
                fetch.append(kv.last.fetch_ms)
                lm = kv.last.load_ms()
                if lm is not None:
                    load_ms.append(lm)
                if measure_extras and hit:
                    # the suffix alone, with the prefix KV already on the GPU (same cache, cropped)
                    n = ids.shape[1]
                    rest = ids[:, hit:].to(device)
                    times = []
                    for _ in range(args.suffix_reps):
                        cache.crop(-(n - hit))
                        with torch.no_grad():
                            t, _ = wall_ms(partial(model, rest, past_key_values=cache, use_cache=True,
                                                   logits_to_keep=1), device)
                        times.append(t)
                    suffix.append(med(times))
                del logits, cache, out
            res[f"{name}_ms"] = ttft
            res[f"{name}_hit_tokens"] = hits
            res[f"{name}_logit_maxdiff"] = diffs
            res[f"{name}_load_ms"] = load_ms
            res[f"{name}_staged_chunks"] = staged
            res[f"{name}_fetch_ms"] = fetch
            if suffix:
                res["suffix_on_gpu_ms"] = suffix
        res["chunk_bytes"] = kv.chunk_bytes
        res["isolated"] = isolated_transfers(kv, prompts[0], device, args) if measure_isolated(device, label) else None
        res["tier_stats"] = kv.manager.stats()
    finally:
        kv.close()
        release_host_memory()
    return res


def surviving(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One pass; a pass that fails is an ``error`` entry (the traceback on stderr), so the passes
    after it still run and the table keeps the ones before it."""
    try:
        return run()
    except Exception as exc:
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def release_host_memory() -> None:
    """After a cache closed: collect what still references its objects, and give torch's cached
    pinned blocks back (each pass's tiers pin GBs; kept, they starved the later passes: an H100
    run's last pass found 11.7 of 125.8 GiB free)."""
    from lmtier.memory import empty_pinned_cache

    gc.collect()
    empty_pinned_cache()


def mem_available_gb() -> float:
    """The host's MemAvailable (GB), or NaN where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            for row in f:
                if row.startswith("MemAvailable:"):
                    return int(row.split()[1]) * 1024 / GB
    except OSError:
        pass
    return float("nan")


def measure_isolated(device: torch.device, label: str) -> bool:
    return device.type == "cuda" and label == "cpu-tier"


def isolated_transfers(kv: Any, ids: torch.Tensor, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Onload of one prompt's hit chunks straight from the cpu tier (no compute) vs the link."""
    from lmtier.integrations.transformers import PagedKVCache
    from lmtier.memory import host_tensor_of
    from lmtier.transfer import offload, onload

    n = ids.shape[1]
    keys = kv.keys(ids)[: (n - 1) // kv.chunk_tokens]
    values = asyncio.run_coroutine_threadsafe(kv.manager.get(keys), kv.loop).result()
    hosts = [t for t in (host_tensor_of(v) for v in values) if t is not None and t.is_pinned()]
    assert len(hosts) == len(values), "cpu tier values must be pinned slab views"
    chunks = len(hosts)
    nbytes = chunks * kv.chunk_bytes
    cache = PagedKVCache(num_layers=kv.num_layers, kv_heads=kv.kv_heads, head_dim=kv.head_dim,
                         block_size=kv.block_size, capacity_tokens=n, dtype=kv.dtype, device=device)
    ppc = kv.pages_per_chunk
    ids_ = [list(range(c * ppc, (c + 1) * ppc)) for c in range(chunks)]
    layers, layout = cache.storage_layers, cache.layout
    # the default (auto: these sizes take the staged copy-engine path) and the mapped kernel
    all_layers = event_ms(lambda: onload(layers, layout, ids_, hosts), args.reps)
    all_mapped = event_ms(lambda: onload(layers, layout, ids_, hosts, mode="mapped"), args.reps)

    def per_layer(mode: str | None = None) -> None:
        for layer in range(kv.num_layers):
            onload(layers, layout, ids_, hosts, layers=[layer], mode=mode)

    layer_by_layer = event_ms(per_layer, args.reps)
    layer_mapped = event_ms(lambda: per_layer("mapped"), args.reps)
    runs_memcpy = float("nan")
    if ppc == 1:
        # the copy engine instead of the kernel: one cudaMemcpyAsync per (chunk, layer, K/V) run
        run_bytes = layout.run_bytes
        src = [h[: kv.chunk_bytes].view(kv.num_layers, 2, run_bytes) for h in hosts]
        dst = [t.view(2, -1, run_bytes) for t in (x.view(torch.uint8) for x in layers)]

        def per_run() -> None:
            for layer in range(kv.num_layers):
                for c in range(chunks):
                    dst[layer][0, c].copy_(src[c][layer, 0], non_blocking=True)
                    dst[layer][1, c].copy_(src[c][layer, 1], non_blocking=True)

        runs_memcpy = event_ms(per_run, max(3, args.reps // 3))
    # pinned cudaMemcpy of the same bytes, both ways, and the native offload (store path)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    pinned.copy_(dev)
    h2d = event_ms(lambda: dev.copy_(pinned, non_blocking=True), args.reps)
    d2h = event_ms(lambda: pinned.copy_(dev, non_blocking=True), args.reps)
    outs = [pinned[c * kv.chunk_bytes:(c + 1) * kv.chunk_bytes] for c in range(chunks)]
    off = event_ms(lambda: offload(layers, layout, ids_, outs), args.reps)
    off_mapped = event_ms(lambda: offload(layers, layout, ids_, outs, mode="mapped"), args.reps)
    values.clear()  # drop the lease views (the closures above still hold the tensors until return)
    return {"bytes": nbytes, "chunks": chunks, "onload_ms": all_layers, "onload_layerwise_ms": layer_by_layer,
            "onload_mapped_ms": all_mapped, "onload_layerwise_mapped_ms": layer_mapped,
            "onload_memcpy_per_run_ms": runs_memcpy,
            "link_h2d_ms": h2d, "link_d2h_ms": d2h, "offload_ms": off, "offload_mapped_ms": off_mapped}


def warm_page_cache(root: Path) -> None:
    """Read every file of the tier once, so the next reads come from the page cache."""
    for path in files_under(root):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def reuse_pass(model: Any, prompts: list[torch.Tensor], cfg: dict[str, Any], args: argparse.Namespace,
               device: torch.device, full_logits: list[torch.Tensor], *, label: str, policy: str,
               setup: Callable[[Any], dict[str, float]], host_pool_bytes: int | None, warm_seed: int,
               after: Callable[[Any, list[torch.Tensor]], dict[str, float]] | None = None) -> dict[str, Any]:
    """A fresh cache over prompts stored earlier: warm-up, ``setup(kv)``, then TTFT of each prompt.

    The warm-up (a miss, then a hit, of a prompt outside the measured set and new to the tiers:
    ``warm_seed`` must differ per pass) gives the engine its prefill speed and the hot tier's read
    speed, as a running server has them; ``setup`` then puts the tiers in the state measured (page
    cache dropped or warm, a half in RAM).
    """
    from lmtier.integrations.transformers import KVPrefixCache

    res: dict[str, Any] = {"label": label, "policy": policy}
    kv = KVPrefixCache(model, {**cfg, "load_policy": policy}, model_id="qwen3-8b-shaped-random-bf16-seed0",
                       registry=registry(), timing=device.type == "cuda", layerwise=not args.no_layerwise,
                       host_pool_bytes=host_pool_bytes, block_size=args.block_size)
    try:
        # two misses (two timed full prefills: an engine's first may be held up by what it sets up),
        # then a hit of the first
        warm, other = (torch.randint(0, model.config.vocab_size, (1, args.tokens),
                                     generator=torch.Generator().manual_seed(seed)) for seed in (warm_seed, warm_seed + 500))
        kv.prefill(warm)
        kv.prefill(other)
        kv.flush()
        kv.prefill(warm)
        sync(device)
        res["mem_available_GB"] = mem_available_gb()
        res["setup"] = setup(kv)
        ttft, loaded, diffs, fetch = [], [], [], []
        for i, ids in enumerate(prompts):
            ms, out = wall_ms(partial(kv.prefill, ids), device)
            logits, _, hit = out
            ttft.append(ms)
            loaded.append(hit)
            diffs.append(maxdiff(logits[:, -1], full_logits[i]))
            assert kv.last is not None
            fetch.append(kv.last.fetch_ms)
            del logits, out
        res.update(ms=ttft, loaded_tokens=loaded, logit_maxdiff=diffs, fetch_ms=fetch)
        costs = kv.manager.read_costs()
        res["learned_read_GBps"] = {t: (c.bytes_per_s / GB if c is not None else None) for t, c in costs.items()}
        rc = kv.engine.recompute.cost()
        res["learned_prefill_tokens_per_s"] = rc.tokens_per_s(args.tokens) if rc is not None else None
        res["learned_prefill_samples"] = rc.samples if rc is not None else 0
        if after is not None:
            res["raw"] = after(kv, prompts)
        kv.flush()  # promotions of skipped chunks: not to overlap the next pass
    finally:
        kv.close()
        release_host_memory()
    return res


def store_prompts(model: Any, prompts: list[torch.Tensor], cfg: dict[str, Any], args: argparse.Namespace,
                  device: torch.device, host_pool_bytes: int | None) -> dict[str, Any]:
    """Run 1 on a fresh cache: every prompt computed and stored (TTFT and the store's flush time)."""
    from lmtier.integrations.transformers import KVPrefixCache

    kv = KVPrefixCache(model, cfg, model_id="qwen3-8b-shaped-random-bf16-seed0", registry=registry(),
                       layerwise=not args.no_layerwise, host_pool_bytes=host_pool_bytes, block_size=args.block_size)
    try:
        first = []
        for ids in prompts:
            ms, _ = wall_ms(partial(kv.prefill, ids), device)
            first.append(ms)
        t0 = time.perf_counter()
        kv.flush()
        return {"first_ms": first, "store_flush_ms": (time.perf_counter() - t0) * 1e3, "chunk_bytes": kv.chunk_bytes}
    finally:
        kv.close()
        release_host_memory()


def disk_passes(model: Any, prompts: list[torch.Tensor], args: argparse.Namespace, device: torch.device,
                full_logits: list[torch.Tensor], root: Path, out: dict[str, Any], save: Callable[[], None]) -> None:
    """Run 2 from a disk-only tier: cold with both policies, then warm (see the module doc); each
    pass lands in ``out`` as it finishes, then ``save()``."""
    cfg = {"chunk_tokens": args.chunk_tokens,
           "tiers": [{"name": "nvme", "backend": "disk",
                      "options": {"root": str(root), "max_bytes": "48GiB", "max_concurrency": 16}}]}
    pool = _disk_pool_bytes(model, args)
    out.update(fs=str(root), run1=store_prompts(model, prompts, cfg, args, device, pool))
    save()

    def cold(kv: Any) -> dict[str, float]:
        before = resident_fraction(root)
        t = time.perf_counter()
        drop_page_cache(root)
        return {"resident_before_drop": before, "drop_s": time.perf_counter() - t,
                "resident_after_drop": resident_fraction(root)}

    def warm(kv: Any) -> dict[str, float]:
        warm_page_cache(root)
        return {"resident": resident_fraction(root)}

    out["cold_always"] = surviving(partial(reuse_pass, model, prompts, cfg, args, device, full_logits, label="disk cold",
                                           policy="always", setup=cold, host_pool_bytes=pool, warm_seed=20_001))
    save()
    out["cold_cost"] = surviving(partial(reuse_pass, model, prompts, cfg, args, device, full_logits, label="disk cold",
                                         policy="cost", setup=cold, host_pool_bytes=pool, warm_seed=20_002,
                                         after=lambda kv, ps: raw_disk_reads(kv, ps[:3], root, 16)))
    save()
    out["warm_cost"] = surviving(partial(reuse_pass, model, prompts, cfg, args, device, full_logits, label="disk warm",
                                         policy="cost", setup=warm, host_pool_bytes=pool, warm_seed=20_003))
    save()


def mixed_passes(model: Any, prompts: list[torch.Tensor], args: argparse.Namespace, device: torch.device,
                 full_logits: list[torch.Tensor], root: Path, out: dict[str, Any], save: Callable[[], None]) -> None:
    """A cpu tier over a disk tier: half of each prompt's chunks in RAM, the rest on the cold disk
    (each pass lands in ``out`` as it finishes, then ``save()``)."""
    cfg = {"chunk_tokens": args.chunk_tokens,
           "tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": args.cpu_tier_bytes}},
                     {"name": "nvme", "backend": "disk",
                      "options": {"root": str(root), "max_bytes": "48GiB", "max_concurrency": 16}}]}
    pool = _disk_pool_bytes(model, args)
    out.update(fs=str(root), run1=store_prompts(model, prompts, cfg, args, device, pool))
    save()

    def half_in_ram(kv: Any) -> dict[str, float]:
        hot = kv.manager.tier("hot").backend
        asyncio.run_coroutine_threadsafe(hot.clear(), kv.loop).result()
        chunks = 0
        for ids in prompts:
            keys = kv.keys(ids)[: (ids.shape[1] - 1) // kv.chunk_tokens]
            half = keys[: (len(keys) + 1) // 2]
            for buf in kv.store.fetch(half, [kv.chunk_bytes] * len(half)).result():  # read once, adopted by RAM
                if buf is not None:
                    chunks += 1
                    buf.release()
        kv.flush()
        drop_page_cache(root)
        return {"chunks_in_ram": float(chunks), "ram_objects": float(hot.stats()["objects"]),
                "disk_resident_after_drop": resident_fraction(root)}

    for seed, policy in enumerate(("always", "cost"), 20_011):
        out[policy] = surviving(partial(reuse_pass, model, prompts, cfg, args, device, full_logits,
                                        label="half RAM, half cold disk", policy=policy, setup=half_in_ram,
                                        host_pool_bytes=pool, warm_seed=seed))
        save()


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=None, help="tokens per page (default: chunk)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--suffix-reps", type=int, default=3)
    ap.add_argument("--split-ref-prompts", type=int, default=3, help="prompts for HF's own split prefill")
    ap.add_argument("--disk-prompts", type=int, default=10, help="0 skips the disk passes")
    ap.add_argument("--mixed-prompts", type=int, default=10, help="0 skips the half-RAM / half-disk passes")
    ap.add_argument("--only-disk", action="store_true", help="skip the cpu-tier pass (disk and mixed only)")
    ap.add_argument("--disk-root", type=Path, default=None)
    ap.add_argument("--cpu-tier-bytes", default="18GiB")
    ap.add_argument("--no-layerwise", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small model and prompts (CPU smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="print the table of the figures an earlier run wrote (one cut short, say) and exit")
    args = ap.parse_args()
    if args.report is not None:
        info = json.loads(args.report.read_text())
        for key in ("prompts", "tokens", "chunk_tokens"):
            setattr(args, key, int(info["args"][key]))
        args.out = None
        report(info, args)
        return
    if args.tiny:
        args.tokens, args.chunk_tokens = min(args.tokens, 300), min(args.chunk_tokens, 32)
        args.prompts, args.reps, args.cpu_tier_bytes = min(args.prompts, 3), 2, "256MiB"
        args.disk_prompts, args.mixed_prompts = min(args.disk_prompts, 2), min(args.mixed_prompts, 2)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    import transformers

    from lmtier.transfer import transfer_status

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                            "transfer": transfer_status()["active"], "args": {k: str(v) for k, v in vars(args).items()}}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(args, device)
    info["model_build_s"] = time.perf_counter() - t0
    info["attn"] = model.config._attn_implementation
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(i))
               for i in range(args.prompts)]
    gpu_prompts = [p.to(device) for p in prompts]

    # HF's own full prefill: the reference logits and time
    hf_full_prefill(model, gpu_prompts[0])
    full_ms, full_logits = [], []
    for p in gpu_prompts:
        ms, lg = wall_ms(partial(hf_full_prefill, model, p), device)
        full_ms.append(ms)
        full_logits.append(lg)
    info["full_ms"] = full_ms
    info["logit_absmax"] = max(float(x.float().abs().max()) for x in full_logits)
    hit_ref = (args.tokens - 1) // args.chunk_tokens * args.chunk_tokens
    split_ms, split_diff = [], []
    if args.split_ref_prompts:
        hf_split_prefill(model, gpu_prompts[0], hit_ref, device)  # warm-up (first masked attention)
    for i in range(min(args.split_ref_prompts, len(prompts))):
        ms, lg = hf_split_prefill(model, gpu_prompts[i], hit_ref, device)
        split_ms.append(ms)
        split_diff.append(maxdiff(lg, full_logits[i]))
    info["hf_suffix_on_gpu_ms"], info["hf_split_logit_maxdiff"] = split_ms, split_diff

    cpu_cfg = {"chunk_tokens": args.chunk_tokens,
               "tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": args.cpu_tier_bytes}}]}
    if not args.only_disk:
        cpu = surviving(partial(cached_runs, model, prompts, cpu_cfg, args, device, full_logits, label="cpu-tier"))
        info["cpu" if "error" not in cpu else "cpu_error"] = cpu
        dump(info, args)  # partial results survive a disk phase that runs out of time

    for key, count, passes in (("disk", args.disk_prompts, disk_passes), ("mixed", args.mixed_prompts, mixed_passes)):
        if not count:
            continue
        k = min(count, len(prompts))
        root = Path(tempfile.mkdtemp(prefix=f"lmtier-ttft-{key}-", dir=args.disk_root))
        info[key] = {}
        try:
            passes(model, prompts[:k], args, device, full_logits[:k], root, info[key], partial(dump, info, args))
        except Exception as exc:  # run 1 failed: the table still prints what finished
            traceback.print_exc()
            info[key]["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(root, ignore_errors=True)

    report(info, args)


def _disk_pool_bytes(model: Any, args: argparse.Namespace) -> int:
    cfg = model.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2
    chunks = args.tokens // args.chunk_tokens + 1
    return int(1.25 * chunks * args.chunk_tokens * per_token) + (64 << 20)


def dump(info: dict[str, Any], args: argparse.Namespace) -> None:
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ttft_gpu.json").write_text(json.dumps(info, indent=1, default=str))


def report(info: dict[str, Any], args: argparse.Namespace) -> None:
    dump(info, args)
    full = med(info["full_ms"])
    rows: list[tuple[str, str]] = []
    rows.append(("device / torch / transformers / attn", f"{info['device']} / {info['torch']} / "
                 f"{info['transformers']} / {info['attn']}; transfer={info['transfer']}"))
    rows.append(("prompts x tokens, chunk", f"{args.prompts} x {args.tokens}, {args.chunk_tokens}"))
    rows.append(("HF full prefill (DynamicCache) median", f"{full:.1f} ms"))
    if "cpu" in info:
        rows += cpu_rows(info, full)
    if "cpu_error" in info:
        rows.append(("cpu tier runs", f"FAILED: {info['cpu_error']['error']}"))
    rows += disk_rows(info, full)
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cpu_rows(info: dict[str, Any], full: float) -> list[tuple[str, str]]:
    cpu = info["cpu"]
    rows: list[tuple[str, str]] = []
    rows.append(("run 1 TTFT median (miss + store)", f"{med(cpu['first_ms']):.1f} ms"))
    ttft2 = med(cpu["second_ms"])
    hit = med([float(h) for h in cpu["second_hit_tokens"]])
    rows.append(("run 2 TTFT median (cpu tier hit)", f"{ttft2:.1f} ms  (hit {hit:.0f} tokens)"))
    rows.append(("  of which lookup + get (host) median", f"{med(cpu['second_fetch_ms']):.2f} ms"))
    rows.append(("speedup full / run 2", f"{full / ttft2:.2f}x  (run1/run2 {med(cpu['first_ms']) / ttft2:.2f}x)"))
    iso = cpu.get("isolated")
    suffix = med(cpu.get("suffix_on_gpu_ms", []))
    if iso:
        gbs = lambda ms: iso["bytes"] / (ms * 1e-3) / GB  # noqa: E731
        link = iso["link_h2d_ms"]
        bound = full / (suffix + link)
        rows.append(("suffix with KV on GPU (ours) median", f"{suffix:.1f} ms"))
        rows.append(("HF suffix with KV on GPU (DynamicCache)", f"{med(info['hf_suffix_on_gpu_ms']):.1f} ms"))
        rows.append(("link: pinned H2D copy of the prefix", f"{link:.1f} ms = {gbs(link):.1f} GB/s "
                     f"({iso['bytes'] / GB:.2f} GB); D2H {gbs(iso['link_d2h_ms']):.1f} GB/s"))
        rows.append(("bound = full / (suffix + link)", f"{bound:.2f}x"))
        rows.append(("run 2 speedup / bound (goal >= 0.95)", f"{full / ttft2 / bound:.3f}"))
        for label, key in (("retrieval alone, all layers, staged (default)", "onload_ms"),
                           ("retrieval alone, one call per layer, staged", "onload_layerwise_ms"),
                           ("retrieval alone, all layers, mapped kernel", "onload_mapped_ms"),
                           ("retrieval alone, one call per layer, mapped", "onload_layerwise_mapped_ms")):
            goal = " (goal >= 96%)" if key == "onload_ms" else ""
            rows.append((label, f"{iso[key]:.1f} ms = {gbs(iso[key]):.1f} GB/s = {link / iso[key]:.1%} of link{goal}"))
        if iso["onload_memcpy_per_run_ms"] == iso["onload_memcpy_per_run_ms"]:
            mc = iso["onload_memcpy_per_run_ms"]
            rows.append(("  (alt.) cudaMemcpyAsync per 512 KB run", f"{mc:.1f} ms = {gbs(mc):.1f} GB/s = "
                         f"{link / mc:.1%} of link"))
        if cpu["second_load_ms"]:
            lm = med(cpu["second_load_ms"])
            rows.append(("retrieval inside run 2 (overlapped)", f"{lm:.1f} ms = {gbs(lm):.1f} GB/s = "
                         f"{link / lm:.1%} of link"))
        for label, key in (("store: native offload alone, staged", "offload_ms"),
                           ("store: native offload alone, mapped", "offload_mapped_ms")):
            rows.append((label, f"{iso[key]:.1f} ms = {gbs(iso[key]):.1f} GB/s "
                         f"= {iso['link_d2h_ms'] / iso[key]:.1%} of D2H link"))
    rows.append(("max |logit diff| run 2 vs full (max over prompts)", f"{max(cpu['second_logit_maxdiff']):.4g}"))
    if info["hf_split_logit_maxdiff"]:
        rows.append(("  HF prefix+suffix vs full (noise floor)", f"{max(info['hf_split_logit_maxdiff']):.4g}"))
    rows.append(("  max |logit| of the full prefill (scale)", f"{info['logit_absmax']:.4g}"))
    return rows


def disk_rows(info: dict[str, Any], full: float) -> list[tuple[str, str]]:
    """The disk and half-RAM passes: TTFT against the full prefill, what was loaded, what was learned."""
    rows: list[tuple[str, str]] = []

    def line(res: dict[str, Any]) -> str:
        if "error" in res:
            return f"FAILED: {res['error']}"
        t = med(res["ms"])
        loaded = ", ".join(str(x) for x in res["loaded_tokens"])
        learned = ", ".join(f"{k} {v:.2f} GB/s" for k, v in res["learned_read_GBps"].items() if v is not None)
        speed = res["learned_prefill_tokens_per_s"]
        learned += f"; prefill {speed:,.0f} tok/s" if speed else ""
        learned += f" ({res['learned_prefill_samples']} prefills)" if "learned_prefill_samples" in res else ""
        return (f"{t:.1f} ms = {full / t:.2f}x of full prefill; loaded [{loaded}]; "
                f"max|dlogit| {max(res['logit_maxdiff']):.4g}; learned: {learned}")

    disk = info.get("disk") or {}
    if "run1" in disk:
        run1 = disk["run1"]
        rows.append(("disk tier: run 1 TTFT median", f"{med(run1['first_ms']):.1f} ms; store flush "
                     f"{run1['store_flush_ms']:.0f} ms"))
    if "cold_cost" in disk and "setup" in disk["cold_cost"]:
        pc = disk["cold_cost"]["setup"]
        rows.append(("disk: page cache resident before/after drop", f"{pc['resident_before_drop']:.1%} / "
                     f"{pc['resident_after_drop']:.1%}"))
        raw = disk["cold_cost"].get("raw")
        if raw:
            rows.append(("disk: raw preadv of 3 prompts' files (16 threads)", f"cold {raw['cold_GBps']:.2f} GB/s, "
                         f"warm {raw['warm_GBps']:.2f} GB/s ({raw['bytes'] / GB:.2f} GB)"))
    for key, label in (("cold_always", "disk run 2 cold, load_policy always (before)"),
                       ("cold_cost", "disk run 2 cold, load_policy cost (goal >= 1.0x)"),
                       ("warm_cost", "disk run 3 warm page cache, cost (was 2.6x)")):
        if key in disk:
            rows.append((label, line(disk[key])))
    mixed = info.get("mixed") or {}
    setups = [mixed[k]["setup"] for k in ("cost", "always") if "setup" in mixed.get(k, {})]
    if setups:
        setup = setups[0]
        rows.append(("half RAM / half cold disk: chunks in RAM", f"{setup['chunks_in_ram']:.0f} "
                     f"(disk resident after drop {setup['disk_resident_after_drop']:.1%})"))
    for key in ("always", "cost"):
        if key in mixed:
            rows.append((f"half RAM / half cold disk, {key}", line(mixed[key])))
    for name, part in (("disk", disk), ("half RAM / half cold disk", mixed)):
        if "error" in part:
            rows.append((f"{name}: run 1", f"FAILED: {part['error']}"))
    avail = [f"{part[k]['mem_available_GB']:.0f}" for part in (disk, mixed) for k in part
             if isinstance(part[k], dict) and "mem_available_GB" in part[k]]
    if avail:
        rows.append(("host memory available at each pass (GB)", ", ".join(avail)))
    return rows


if __name__ == "__main__":
    main()
