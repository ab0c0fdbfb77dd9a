"""Paged KV caches of real-looking float values for the coded-transfer tests (CPU and GPU).

The same checks run on a CPU cache (tests/unit/test_coded_transfer.py) and a CUDA one
(tests/native/test_coded_gpu.py): what :func:`lmtier.transfer.coded.offload_coded` writes is the
CPU codec's encoding of what :func:`lmtier.transfer.offload` writes, and
:func:`~lmtier.transfer.coded.onload_coded` of an encoding lands the pages the CPU codec decodes.
"""

from __future__ import annotations

from typing import Any

import torch

from lmtier.codecs.base import KVGeometry
from lmtier.codecs.quant import Fp8Codec, Int8Codec, QuantOptions
from lmtier.transfer import _fallback, chunk_nbytes, describe_layout
from lmtier.transfer.coded import encoded_nbytes, offload_coded, onload_coded
from tests.native.kvcases import make_cache

__all__ = ["CODECS", "KINDS", "check_coded_round_trip", "float_cache"]

BLK, HEADS, HEAD, LAYERS, BLOCKS = 4, 2, 16, 3, 24
#: (page layout, codec): block_head scales need the kv-first page order
KINDS = [("vllm_blocks_first", "vector"), ("vllm_blocks_first", "layer"), ("flashinfer", "block_head"),
         ("vllm_kv_first", "vector")]
CODECS = {"fp8": Fp8Codec, "int8": Int8Codec}


def float_cache(kind: str, device: str, seed: int) -> list[torch.Tensor]:
    """A cache of ``kind`` holding Gaussian bf16 values with per-channel magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    cache = make_cache(kind, layers=LAYERS, blocks=BLOCKS, blk=BLK, heads=HEADS, head=HEAD, gen=gen)
    for layer in cache:
        x = torch.randn(layer.shape, generator=gen) * torch.linspace(0.2, 3.0, layer.shape[-1])
        layer.copy_(x.to(layer.dtype))
    return [layer.to(device) for layer in cache] if device != "cpu" else cache


def _geometry(kind: str, page_bytes: int) -> KVGeometry:
    return KVGeometry("bfloat16", kind, LAYERS, BLK, HEADS, HEAD, page_bytes)


def check_coded_round_trip(device: str, kind: str, scales: str, codec_name: str) -> None:
    """offload_coded == the CPU codec's encode of offload; onload_coded of it == onload of the CPU
    codec's decode; and a CPU encoding onloads through onload_coded to the same pages."""
    codec: Any = CODECS[codec_name](QuantOptions(scales=scales))  # type: ignore[arg-type]
    src = float_cache(kind, device, seed=1)
    layout = describe_layout(src[0], kind)
    kv = _geometry(kind, layout.page_bytes)
    assert codec.check_kv(kv) is None
    tables = [[3, 7, 1, 12], [5, 2], [20]]  # whole, shorter, a single page
    pin = device != "cpu"
    hosts = [torch.zeros(encoded_nbytes(codec, kv, layout, LAYERS, len(t)), dtype=torch.uint8, pin_memory=pin)
             for t in tables]
    sizes = offload_coded(src, layout, tables, hosts, codec, kv)
    if device != "cpu":
        torch.cuda.synchronize()
    cpu_src = [layer.cpu() for layer in src]
    cpu_layout = describe_layout(cpu_src[0], kind)
    exact: list[torch.Tensor] = []
    for t, host, n in zip(tables, hosts, sizes, strict=True):
        raw = torch.empty(chunk_nbytes(cpu_layout, LAYERS, len(t)), dtype=torch.uint8)
        _fallback.offload(cpu_src, cpu_layout, [t], [raw])
        exact.append(raw)
        want = bytearray(codec.max_encoded_bytes(raw.numel(), kv))
        m = codec.encode(memoryview(raw.numpy()), memoryview(want), kv)
        assert n == m == host.numel() and bytes(host.numpy()) == bytes(want[:m]), \
            f"{kind}/{scales} {codec_name} on {device}: the encoding differs from the CPU codec's"

    dst = float_cache(kind, device, seed=2)
    targets = [[0, 4, 8, 9], [10, 11], [23]]
    onload_coded(dst, layout, targets, hosts, codec)
    if device != "cpu":
        torch.cuda.synchronize()
    want_cache = [layer.cpu().clone() for layer in float_cache(kind, "cpu", seed=2)]
    for t, host, raw_exact in zip(targets, hosts, exact, strict=True):
        raw = bytearray(chunk_nbytes(cpu_layout, LAYERS, len(t)))
        codec.decode(memoryview(host.numpy()), memoryview(raw))
        decoded = torch.frombuffer(raw, dtype=torch.uint8)
        _fallback.onload(want_cache, cpu_layout, [t], [decoded])
        x, y = raw_exact.view(torch.bfloat16).float(), decoded.view(torch.bfloat16).float()
        assert 0 < float((x - y).norm() / x.norm()) < 0.05  # lossy, within the format's error
    for got, want in zip(dst, want_cache, strict=True):
        assert torch.equal(got.cpu(), want), f"{kind}/{scales} {codec_name} on {device}: onloaded pages differ"
