"""Where a device codec's time goes: each stage of one chunk's quantized offload and onload.

On one CUDA device, for a Qwen3-8B-shaped paged cache (36 layers, 8 KV heads of 128, bf16, blocks
of 16; 16 chunks of 256 tokens, 37.7 MB raw each, random values): the torch page gather and
scatter, the codec's encode and decode of one chunk, the PCIe copy of one encoded and one raw
chunk, then whole 16-chunk calls of ``lmtier.transfer.coded`` next to the raw native path in the
same run. Each line prints the CUDA-event median (GPU time) and the host's launch time, both in
ms: a launch time close to the GPU time means the host's enqueueing bounds the call. This is how
the coded path's 0.52x / 0.70x of raw on an H100 was traced to the torch gather and one stream
(docs/codecs.md, "Measured on an H100"). For the throughput table, see benchmarks/codecs_gpu.sh.

    PYTHONPATH=. python benchmarks/codec_stages_gpu.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lmtier.codecs.base import KVGeometry
from lmtier.codecs.quant import Fp8Codec, Int8Codec, QuantOptions
from lmtier.transfer import (
    PageLayout,
    _fallback,
    chunk_nbytes,
    describe_layout,
    offload,
    onload,
    transfer_status,
)
from lmtier.transfer.coded import encoded_nbytes, offload_coded, onload_coded

LAYERS, HEADS, HEAD, BLOCK, CHUNK_TOKENS, CHUNKS = 36, 8, 128, 16, 256, 16


def timed(fn: Callable[[], object], repeats: int = 15) -> tuple[float, float]:
    """(GPU ms, host launch ms), medians after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu, launch = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        fn()
        launch.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return sorted(gpu)[repeats // 2], sorted(launch)[repeats // 2]


def line(what: str, ms: tuple[float, float]) -> None:
    print(f"{what:<42} gpu {ms[0]:8.3f} ms   launch {ms[1]:8.3f} ms")


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("codec_stages_gpu.py needs a CUDA GPU")
    pages = CHUNK_TOKENS // BLOCK
    cache = [torch.randn(2, CHUNKS * pages, BLOCK, HEADS, HEAD, device="cuda", dtype=torch.bfloat16)
             for _ in range(LAYERS)]
    dst = [torch.empty_like(c) for c in cache]
    layout = describe_layout(cache[0], "vllm_kv_first")
    kv = KVGeometry("bfloat16", "vllm_kv_first", LAYERS, BLOCK, HEADS, HEAD, layout.page_bytes)
    tables = [list(range(c * pages, (c + 1) * pages)) for c in range(CHUNKS)]
    raw_n = chunk_nbytes(layout, LAYERS, pages)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {CHUNKS} chunks of {raw_n / 1e6:.1f} MB; "
          f"raw path: {transfer_status().get('active')}")
    raw_hosts = [torch.empty(raw_n, dtype=torch.uint8, pin_memory=True) for _ in tables]
    line(f"raw offload, {CHUNKS} chunks", timed(lambda: offload(cache, layout, tables, raw_hosts)))
    line(f"raw onload, {CHUNKS} chunks", timed(lambda: onload(dst, layout, tables, raw_hosts)))
    raw_dev = torch.empty(raw_n, dtype=torch.uint8, device="cuda")
    for codec in (Fp8Codec(QuantOptions(scales="vector")), Int8Codec(QuantOptions(scales="vector")),
                  Fp8Codec(QuantOptions(scales="block_head"))):
        stages(codec, cache, dst, layout, kv, tables, raw_dev, raw_hosts[0])


def stages(codec: Fp8Codec | Int8Codec, cache: list[torch.Tensor], dst: list[torch.Tensor], layout: PageLayout,
           kv: KVGeometry, tables: list[list[int]], raw_dev: torch.Tensor, raw_host: torch.Tensor) -> None:
    """One codec's lines: each stage of one chunk, then whole calls of all the chunks."""
    n = encoded_nbytes(codec, kv, layout, LAYERS, len(tables[0]))
    hosts = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in tables]
    coded_dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    tag = codec.tag()
    line(f"{tag} torch gather, 1 chunk", timed(lambda: _fallback.offload(cache, layout, [tables[0]], [raw_dev])))
    line(f"{tag} torch scatter, 1 chunk", timed(lambda: _fallback.onload(dst, layout, [tables[0]], [raw_dev])))
    line(f"{tag} encode, 1 chunk", timed(lambda: codec.encode_tensor(raw_dev, coded_dev, kv, step=None, check=False)))
    offload_coded(cache, layout, tables[:1], hosts[:1], codec, kv)
    torch.cuda.synchronize()
    prefix = bytes(hosts[0][:32].numpy())
    line(f"{tag} decode, 1 chunk", timed(lambda: codec.decode_tensor(coded_dev, raw_dev, prefix=prefix, step=None)))
    line(f"{tag} D2H of the encoding, 1 chunk", timed(lambda: hosts[0].copy_(coded_dev, non_blocking=True)))
    line(f"{tag} D2H raw, 1 chunk", timed(lambda: raw_host.copy_(raw_dev, non_blocking=True)))
    line(f"{tag} offload_coded, {len(tables)} chunks",
         timed(lambda: offload_coded(cache, layout, tables, hosts, codec, kv)))
    line(f"{tag} onload_coded, {len(tables)} chunks", timed(lambda: onload_coded(dst, layout, tables, hosts, codec)))

if __name__ == "__main__":
    main()
