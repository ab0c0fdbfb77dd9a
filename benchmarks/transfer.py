"""Paged KV <-> pinned host throughput: the native kernel and the torch fallback against the link.

The link is measured in the same run: a pinned ``cudaMemcpy`` (torch copy of a pinned tensor) of
the same bytes, each way and both ways at once. Times are CUDA-event medians after warm-up, over
random data. Default shape: Qwen3-8B (36 layers, 8 KV heads, head 128, bf16, block 16), 40 chunks
of 256 tokens (1.51 GB each way); also the legacy (2,N,blk,H,D), the packed (N,H,blk,2D) and an
MLA (N,blk,576) cache of 61 layers. Prints a table last; ``--out`` writes the figures as JSON.

    PYTHONPATH=. python benchmarks/transfer.py --out results/
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmtier.transfer import PageLayout, _fallback, _native, chunk_nbytes, describe_layout
from lmtier.transfer._native import LaunchOptions

GB = 1e9
MIB = 1 << 20
MODES = ("mapped", "staged")
#: staged-path variants of the sweep: (MiB device->host, MiB host->device, slots, copy streams,
#: flags); the default first, the last beyond the 64 MiB budget (for reference)
STAGED_CONFIGS = [
    (32, 32, 2, 1, 0),
    (32, 32, 2, 1, 4),
    (32, 32, 4, 2, 0),
    (32, 32, 3, 1, 0),
    (16, 48, 2, 1, 0),
    (16, 48, 3, 1, 0),
    (24, 40, 2, 1, 0),
    (8, 56, 2, 1, 0),
    (64, 64, 2, 1, 0),
]

# name, kind, layers, per-block shape (dtype bf16)
LAYOUTS: list[tuple[str, str, int, tuple[int, ...]]] = [
    ("flashinfer (N,2,blk,H,D)", "flashinfer", 36, (2, 16, 8, 128)),
    ("legacy (2,N,blk,H,D)", "vllm_kv_first", 36, (16, 8, 128)),
    ("packed (N,H,blk,2D)", "vllm_blocks_first", 36, (8, 16, 256)),
    ("mla (N,blk,576) x61", "mla", 61, (16, 576)),
]


def timed(fn: Callable[[], None], reps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` between CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def both_ways(d2h: Callable[[], None], h2d: Callable[[], None], s1: Any, s2: Any) -> Callable[[], None]:
    def run() -> None:
        cur = torch.cuda.current_stream()
        s1.wait_stream(cur)
        s2.wait_stream(cur)
        with torch.cuda.stream(s1):
            d2h()
        with torch.cuda.stream(s2):
            h2d()
        cur.wait_stream(s1)
        cur.wait_stream(s2)

    return run


def staging_bytes(fn: Callable[[], None]) -> tuple[int, int]:
    """(peak torch allocation during fn, drop in free device memory) in bytes."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    free0 = torch.cuda.mem_get_info()[0]
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, free0 - torch.cuda.mem_get_info()[0]


def make_cache(kind: str, layers: int, blocks: int, inner: tuple[int, ...]) -> list[torch.Tensor]:
    per_block = 1
    for d in inner:
        per_block *= d
    kv_dim = 2 if kind == "vllm_kv_first" else 1
    raw = torch.randint(0, 256, (layers * kv_dim * blocks * per_block * 2,), dtype=torch.uint8, device="cuda")
    buf = raw.view(torch.bfloat16)
    big = buf.view(layers, 2, blocks, *inner) if kind == "vllm_kv_first" else buf.view(layers, blocks, *inner)
    return [big[i] for i in range(layers)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.reps = args.reps
        self.s1, self.s2 = torch.cuda.Stream(), torch.cuda.Stream()
        most = max(chunk_nbytes_for(lay, args) for lay in LAYOUTS)
        self.host_out = torch.empty(most, dtype=torch.uint8, pin_memory=True)
        self.host_in = torch.empty(most, dtype=torch.uint8, pin_memory=True)
        self.host_in.copy_(torch.randint(0, 256, (most,), dtype=torch.uint8, device="cuda"))
        self.dev_a = torch.randint(0, 256, (most,), dtype=torch.uint8, device="cuda")
        self.dev_b = torch.empty_like(self.dev_a)
        # Clocks and the link's power state settle under load: about two seconds of copies
        # both ways before anything is timed (the first layout read low without it).
        deadline = time.perf_counter() + 2.0
        while time.perf_counter() < deadline:
            self.host_out.copy_(self.dev_a, non_blocking=True)
            self.dev_b.copy_(self.host_in, non_blocking=True)
            torch.cuda.synchronize()
        self.results: dict[str, Any] = {
            "device": torch.cuda.get_device_name(),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__,
            "library": _native.library_info()["library_version"],
            "chunks": args.chunks,
            "pages_per_chunk": args.pages,
            "layouts": {},
        }

    def memcpy(self, nbytes: int) -> dict[str, float]:
        """Pinned cudaMemcpy of nbytes: D2H, H2D and both at once, in GB/s."""
        out, inp, da, db = (
            self.host_out[:nbytes],
            self.host_in[:nbytes],
            self.dev_a[:nbytes],
            self.dev_b[:nbytes],
        )

        def d2h() -> None:
            out.copy_(da, non_blocking=True)

        def h2d() -> None:
            db.copy_(inp, non_blocking=True)

        return {
            "d2h": nbytes / timed(d2h, self.reps) / 1e6,
            "h2d": nbytes / timed(h2d, self.reps) / 1e6,
            "both": 2 * nbytes / timed(both_ways(d2h, h2d, self.s1, self.s2), self.reps) / 1e6,
        }

    def layout_case(self, name: str, kind: str, layers: int, inner: tuple[int, ...]) -> dict[str, Any]:
        args = self.args
        c, p = args.chunks, args.pages
        blocks = 2 * c * p + 17
        kv = make_cache(kind, layers, blocks, inner)
        layout = describe_layout(kv[0], kind)
        perm = torch.randperm(blocks).tolist()
        out_ids = [perm[i * p : (i + 1) * p] for i in range(c)]
        in_ids = [perm[c * p + i * p : c * p + (i + 1) * p] for i in range(c)]
        size = chunk_nbytes(layout, layers, p)
        total = size * c
        outs = [self.host_out[i * size : (i + 1) * size] for i in range(c)]
        ins = [self.host_in[i * size : (i + 1) * size] for i in range(c)]
        res: dict[str, Any] = {
            "kind": kind,
            "layers": layers,
            "page_bytes": layout.page_bytes,
            "bytes": total,
        }
        res["memcpy"] = self.memcpy(total)

        def nat_d2h(opts: LaunchOptions | None = None, mode: str = "mapped") -> Callable[[], None]:
            return lambda: _native.offload(kv, layout, out_ids, outs, options=opts, mode=mode)

        def nat_h2d(opts: LaunchOptions | None = None, mode: str = "mapped") -> Callable[[], None]:
            return lambda: _native.onload(kv, layout, in_ids, ins, options=opts, mode=mode)

        def per_layer_h2d(mode: str, opts: LaunchOptions | None = None) -> Callable[[], None]:
            def run() -> None:
                for layer in range(layers):
                    _native.onload(kv, layout, in_ids, ins, layers=[layer], mode=mode, options=opts)

            return run

        def per_layer_staged(opts: LaunchOptions) -> Callable[[], None]:
            return per_layer_h2d("staged", opts)

        for mode in MODES:
            r: dict[str, Any] = {}
            # the first staged call allocates the staging buffers: count what that costs the device
            r["staging_torch_peak"], r["staging_free_drop"] = staging_bytes(
                both_ways(nat_d2h(None, mode), nat_h2d(None, mode), self.s1, self.s2))
            r["d2h"] = total / timed(nat_d2h(None, mode), self.reps) / 1e6
            r["h2d"] = total / timed(nat_h2d(None, mode), self.reps) / 1e6
            r["both"] = 2 * total / timed(both_ways(nat_d2h(None, mode), nat_h2d(None, mode), self.s1, self.s2),
                                          self.reps) / 1e6
            r["h2d_per_layer"] = total / timed(per_layer_h2d(mode), self.reps) / 1e6
            r["staging_in_use"] = _native.staging_in_use()  # before the sweep adds its own buffers
            res[mode] = r
        res["correct"] = all(self.verify(kv, layout, out_ids, in_ids, outs, ins, layers, p, mode) for mode in MODES)

        fb_reps = max(3, self.reps // 2)
        res["fallback"] = {
            "d2h": total / timed(lambda: _fallback.offload(kv, layout, out_ids, outs), fb_reps, 1) / 1e6,
            "h2d": total / timed(lambda: _fallback.onload(kv, layout, in_ids, ins), fb_reps, 1) / 1e6,
        }
        res["fallback"]["staging_torch_peak"], _ = staging_bytes(
            lambda: _fallback.offload(kv, layout, out_ids, outs)
        )
        if kind == "flashinfer":
            res["latency"] = self.latency(kv, layout, out_ids, in_ids, outs, ins, layers)
            if args.sweep:
                res["sweep"] = self.sweep(nat_d2h, nat_h2d, total)
                res["staged_sweep"] = self.staged_sweep(nat_d2h, nat_h2d, per_layer_staged, total)
        return res

    def verify(
        self,
        kv: list[torch.Tensor],
        layout: PageLayout,
        out_ids: list[list[int]],
        in_ids: list[list[int]],
        outs: list[torch.Tensor],
        ins: list[torch.Tensor],
        layers: int,
        p: int,
        mode: str,
    ) -> bool:
        """Native output (``mode``) equals the fallback's on a few chunks, both directions."""
        size = chunk_nbytes(layout, layers, p)
        pick = [0, 1, len(out_ids) // 2, len(out_ids) - 1]
        check = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in pick]
        for o in outs:
            o.fill_(0xA5)
        _native.offload(kv, layout, out_ids, outs, mode=mode)
        _fallback.offload(kv, layout, [out_ids[i] for i in pick], check)
        torch.cuda.synchronize()
        ok = all(torch.equal(outs[i], chk) for i, chk in zip(pick, check, strict=True))
        _native.onload(kv, layout, in_ids, ins, mode=mode)
        _fallback.offload(kv, layout, [in_ids[i] for i in pick], check)
        torch.cuda.synchronize()
        return ok and all(torch.equal(ins[i], chk) for i, chk in zip(pick, check, strict=True))

    def latency(
        self,
        kv: list[torch.Tensor],
        layout: PageLayout,
        out_ids: list[list[int]],
        in_ids: list[list[int]],
        outs: list[torch.Tensor],
        ins: list[torch.Tensor],
        layers: int,
    ) -> dict[str, float]:
        """One chunk (all layers) and one layer of one chunk: GPU time, call time, end to end (us)."""
        res: dict[str, float] = {}
        cases = {
            "chunk_d2h": lambda o: _native.offload(kv, layout, out_ids[:1], outs[:1], options=o, mode="mapped"),
            "chunk_h2d": lambda o: _native.onload(kv, layout, in_ids[:1], ins[:1], options=o, mode="mapped"),
            "chunk_d2h_staged": lambda o: _native.offload(kv, layout, out_ids[:1], outs[:1], mode="staged"),
            "chunk_h2d_staged": lambda o: _native.onload(kv, layout, in_ids[:1], ins[:1], mode="staged"),
            "layer_h2d": lambda o: _native.onload(kv, layout, in_ids[:1], ins[:1], layers=[7], options=o,
                                                  mode="mapped"),
            "layer_h2d_staged": lambda o: _native.onload(kv, layout, in_ids[:1], ins[:1], layers=[7],
                                                         mode="staged"),
            "chunk_d2h_fallback": lambda o: _fallback.offload(kv, layout, out_ids[:1], outs[:1]),
            "chunk_h2d_fallback": lambda o: _fallback.onload(kv, layout, in_ids[:1], ins[:1]),
        }
        for name, fn in cases.items():
            res[name + "_gpu_us"] = 1000 * timed(lambda fn=fn: fn(None), 30)
            calls, e2e = [], []
            for _ in range(30):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(None)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                calls.append(t1 - t0)
                e2e.append(t2 - t0)
            res[name + "_call_us"] = 1e6 * statistics.median(calls)
            res[name + "_e2e_us"] = 1e6 * statistics.median(e2e)
        from lmtier.transfer._layout import plan_transfer

        plans = []
        for _ in range(30):
            t0 = time.perf_counter()
            plan_transfer(kv, layout, out_ids[:1], outs[:1], None, distinct=False)
            plans.append(time.perf_counter() - t0)
        res["python_checks_us"] = 1e6 * statistics.median(plans)
        trust = LaunchOptions(flags=_native.FLAG_TRUST_UVA)
        calls = []
        for _ in range(30):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            cases["chunk_d2h"](trust)
            calls.append(time.perf_counter() - t0)
        res["chunk_d2h_trust_uva_call_us"] = 1e6 * statistics.median(calls)
        torch.cuda.synchronize()
        return res

    def sweep(
        self,
        nat_d2h: Callable[..., Callable[[], None]],
        nat_h2d: Callable[..., Callable[[], None]],
        total: int,
    ) -> list[dict[str, Any]]:
        sms = self.results["sms"]
        configs = [
            (512, 4, sms, 0),
            (512, 4, 16, 0),
            (512, 4, 32, 0),
            (512, 4, 66, 0),
            (512, 4, 2 * sms, 0),
            (512, 2, sms, 0),
            (512, 8, sms, 0),
            (256, 4, sms, 0),
            (256, 8, sms, 0),
            (1024, 4, sms, 0),
            (512, 4, sms, _native.FLAG_PLAIN_ACCESS),
            (512, 4, sms, _native.FLAG_TRUST_UVA),
            (512, 8, 32, 0),
            (1024, 8, 16, 0),
        ]
        rows = []
        for threads, unroll, ctas, flags in configs:
            o = LaunchOptions(threads=threads, unroll=unroll, max_ctas=ctas, flags=flags)
            row = {
                "threads": threads,
                "unroll": unroll,
                "ctas": ctas,
                "plain": bool(flags & _native.FLAG_PLAIN_ACCESS),
                "trust_uva": bool(flags & _native.FLAG_TRUST_UVA),
            }
            row["d2h"] = total / timed(nat_d2h(o), max(5, self.reps // 2)) / 1e6
            row["h2d"] = total / timed(nat_h2d(o), max(5, self.reps // 2)) / 1e6
            if (ctas <= 66 or (threads, unroll, ctas) == (512, 4, sms)) and not flags:
                row["both"] = 2 * total / timed(both_ways(nat_d2h(o), nat_h2d(o), self.s1, self.s2), 5) / 1e6
            rows.append(row)
        return rows

    def staged_sweep(
        self,
        nat_d2h: Callable[..., Callable[[], None]],
        nat_h2d: Callable[..., Callable[[], None]],
        per_layer: Callable[[LaunchOptions], Callable[[], None]],
        total: int,
    ) -> list[dict[str, Any]]:
        """Staging buffer size, slots and copy streams (each configuration its own buffers)."""
        rows = []
        saved = {k: os.environ.get(k) for k in ("LMTIER_STAGING_D2H_BYTES", "LMTIER_STAGING_H2D_BYTES",
                                                 "LMTIER_STAGING_SLOTS", "LMTIER_STAGING_STREAMS")}
        try:
            for d2h_mib, h2d_mib, slots, streams, flags in STAGED_CONFIGS:
                os.environ.update(LMTIER_STAGING_D2H_BYTES=str(d2h_mib * MIB),
                                  LMTIER_STAGING_H2D_BYTES=str(h2d_mib * MIB),
                                  LMTIER_STAGING_SLOTS=str(slots), LMTIER_STAGING_STREAMS=str(streams))
                reps = max(5, self.reps // 2)
                o = LaunchOptions(flags=flags)
                row: dict[str, Any] = {"d2h_mib": d2h_mib, "h2d_mib": h2d_mib, "slots": slots, "streams": streams,
                                       "single_copies": bool(flags & _native.FLAG_SINGLE_COPIES)}
                row["d2h"] = total / timed(nat_d2h(o, "staged"), reps) / 1e6
                row["h2d"] = total / timed(nat_h2d(o, "staged"), reps) / 1e6
                row["both"] = 2 * total / timed(both_ways(nat_d2h(o, "staged"), nat_h2d(o, "staged"),
                                                          self.s1, self.s2), reps) / 1e6
                row["h2d_per_layer"] = total / timed(per_layer(o), reps) / 1e6
                rows.append(row)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return rows

    def run(self) -> dict[str, Any]:
        for name, kind, layers, inner in LAYOUTS:
            if self.args.only and kind != self.args.only:
                continue
            print(f"# {name} ...", file=sys.stderr, flush=True)
            self.results["layouts"][name] = self.layout_case(name, kind, layers, inner)
            torch.cuda.empty_cache()  # the cache of this layout is gone; make room for the next
        return self.results


def chunk_nbytes_for(lay: tuple[str, str, int, tuple[int, ...]], args: argparse.Namespace) -> int:
    _, kind, layers, inner = lay
    per_block = 2
    for d in inner:
        per_block *= d
    page = per_block * (2 if kind == "vllm_kv_first" else 1)
    return layers * args.pages * page * args.chunks


def table(res: dict[str, Any]) -> str:
    lines = [
        f"device {res['device']} ({res['sms']} SMs), torch {res['torch']}, {res['library']}",
        f"{res['chunks']} chunks x {res['pages_per_chunk']} pages; GB/s (1e9 B/s); % = of pinned cudaMemcpy, same run",
        f"{'layout':26} {'dir':9} {'memcpy':>7} {'mapped':>7} {'%':>6} {'staged':>7} {'%':>6} {'fallback':>8} {'%':>6}",
    ]
    for name, r in res["layouts"].items():
        for d in ("d2h", "h2d", "both", "h2d_per_layer"):
            m = r["memcpy"]["h2d" if d == "h2d_per_layer" else d]
            a, b = r["mapped"][d], r["staged"][d]
            fb = r["fallback"].get(d)
            fbs = f"{fb:8.1f} {100 * fb / m:5.1f}%" if fb else f"{'-':>8} {'':6}"
            label = name if d == "d2h" else f"  {r['bytes'] / GB:.2f} GB" if d == "h2d" else ""
            lines.append(f"{label:26} {d:9} {m:7.1f} {a:7.1f} {100 * a / m:5.1f}% {b:7.1f} {100 * b / m:5.1f}% {fbs}")
        lines.append(
            f"{'':26} device memory: mapped {r['mapped']['staging_free_drop'] / MIB:.1f} MiB; staged "
            f"{r['staged']['staging_in_use'] / MIB:.0f} MiB of staging (free memory dropped "
            f"{r['staged']['staging_free_drop'] / MIB:.1f} MiB at its first use); fallback "
            f"{r['fallback']['staging_torch_peak'] / MIB:.1f} MiB; native==fallback: {r['correct']}"
        )
        if "latency" in r:
            lat = r["latency"]
            for k in (
                "chunk_d2h",
                "chunk_d2h_staged",
                "chunk_h2d",
                "chunk_h2d_staged",
                "layer_h2d",
                "layer_h2d_staged",
                "chunk_d2h_fallback",
                "chunk_h2d_fallback",
            ):
                lines.append(
                    f"  latency {k:20} gpu {lat[k + '_gpu_us']:8.0f} us  call {lat[k + '_call_us']:7.0f} us"
                    f"  end-to-end {lat[k + '_e2e_us']:8.0f} us"
                )
            lines.append(
                f"  latency chunk_d2h call with LMT_FLAG_TRUST_UVA {lat['chunk_d2h_trust_uva_call_us']:.0f} us;"
                f" Python argument checks of one call {lat.get('python_checks_us', float('nan')):.0f} us"
            )
        for row in r.get("sweep", []):
            both = f" both {row['both']:5.1f}" if "both" in row else ""
            lines.append(
                f"  sweep threads {row['threads']:4} unroll {row['unroll']} ctas {row['ctas']:3}"
                f"{' plain' if row['plain'] else ' trust' if row.get('trust_uva') else '      '}: d2h {row['d2h']:5.1f} h2d {row['h2d']:5.1f}{both}"
            )
        for row in r.get("staged_sweep", []):
            lines.append(
                f"  staged {row['d2h_mib']:2}+{row['h2d_mib']:2} MiB x {row['slots']} slots, {row['streams']} streams"
                f"{', single copies' if row['single_copies'] else ''}: d2h {row['d2h']:5.1f} h2d {row['h2d']:5.1f} "
                f"both {row['both']:5.1f} h2d per layer {row['h2d_per_layer']:5.1f}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--pages", type=int, default=16, help="pages per chunk (256 tokens / block 16)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--sweep", action="store_true", help="also time kernel variants (notes)")
    ap.add_argument("--only", default="", help="one layout kind")
    ap.add_argument("--out", type=Path, default=None, help="directory for transfer.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    reason = _native.unavailable_reason()
    if reason:
        sys.exit(f"native library unavailable: {reason}")
    with torch.cuda.stream(torch.cuda.Stream()):  # a serving engine's side stream
        res = Bench(args).run()
    if args.out:  # the figures first: they survive a bug in the table below
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "transfer.json").write_text(json.dumps(res, indent=2))
    text = table(res)
    if args.out:
        (args.out / "transfer.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
