"""fp8 encode / decode of one Qwen3-8B-shaped chunk on one core: the numba kernels
(lmtier.codecs.kernels) vs torch's ops, alternating in one process, same bytes checked.

The chunk is 37.7 MB of bf16 (36 layers x 16 pages x (2, 16, 8, 128)), random values with
per-channel magnitudes (speed does not depend on them; ratios and errors are in benchmarks/codecs.py
on real KV). GB/s of raw bf16; the ratio is kernels over torch, per scales kind.

    flock /tmp/lmtier-bench.lock python benchmarks/fp8_kernels.py [--scales vector,block_head,layer]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import GB, QWEN3_8B_CHUNK_BYTES, fmt_ratio, machine_line, median, print_table

from lmtier.codecs.base import KVGeometry
from lmtier.codecs.kernels import fp8_kernels
from lmtier.codecs.quant import Fp8Codec, QuantOptions

LAYERS, BLOCK, HEADS, HEAD, TOKENS = 36, 16, 8, 128, 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="vector,block_head,layer")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    print(machine_line())
    if fp8_kernels() is None:
        raise SystemExit("the fp8 kernels are not available here (pip install lmtier[codecs])")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(LAYERS, TOKENS // BLOCK, 2, BLOCK, HEADS, HEAD, generator=g)
    x *= torch.rand(1, 1, 2, 1, HEADS, HEAD, generator=g) * 4
    raw = x.to(torch.bfloat16).view(-1).view(torch.uint8)
    assert raw.numel() == QWEN3_8B_CHUNK_BYTES
    kv = KVGeometry("bfloat16", "hf_vllm_kv_first", LAYERS, BLOCK, HEADS, HEAD, 2 * BLOCK * HEADS * HEAD * 2)
    rows = []
    for scales in args.scales.split(","):
        codec = Fp8Codec(QuantOptions(scales=scales))  # type: ignore[arg-type]
        n = codec.encoded_nbytes(raw.numel(), kv)
        encoded = {m: torch.empty(n, dtype=torch.uint8) for m in ("torch", "kernels")}
        decoded = {m: torch.empty_like(raw) for m in ("torch", "kernels")}
        times: dict[tuple[str, str], list[float]] = {}
        os.environ["LMTIER_CODEC_KERNELS"] = "torch"
        codec.encode_tensor(raw, encoded["torch"], kv)  # what both decode
        for r in range(args.repeats + 1):  # round 0 warms up
            for mode in ("torch", "kernels") if r % 2 else ("kernels", "torch"):
                os.environ["LMTIER_CODEC_KERNELS"] = mode
                for op in ("encode", "decode"):
                    t0 = time.perf_counter()
                    if op == "encode":
                        codec.encode_tensor(raw, encoded[mode], kv)
                    else:
                        codec.decode_tensor(encoded["torch"], decoded[mode])
                    if r:
                        times.setdefault((mode, op), []).append(time.perf_counter() - t0)
        os.environ.pop("LMTIER_CODEC_KERNELS", None)
        same = bool(torch.equal(encoded["torch"], encoded["kernels"])) and bool(
            torch.equal(decoded["torch"], decoded["kernels"]))
        row: list[object] = [scales]
        for op in ("encode", "decode"):
            t_torch, t_kernels = median(times[("torch", op)]), median(times[("kernels", op)])
            row += [f"{raw.numel() / t_torch / GB:.2f}", f"{raw.numel() / t_kernels / GB:.2f}",
                    fmt_ratio(t_torch / t_kernels)]
        rows.append([*row, "yes" if same else "NO"])
    print_table(["fp8 scales", "encode torch", "encode kernels", "ratio", "decode torch", "decode kernels", "ratio",
                 "same bytes"], rows,
                title=f"fp8 of one {raw.numel() / 1e6:.1f} MB bf16 chunk on 1 thread, GB/s of raw, "
                      f"median of {args.repeats}")


if __name__ == "__main__":
    main()
