"""Quantized offload and onload (lmtier.transfer.coded) on a CPU cache: the same functions the GPU
runs write exactly the CPU codec's encoding and land exactly the CPU codec's decoding, so a chunk
quantized on one side decodes on the other (the CUDA twin: tests/native/test_coded_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from lmtier.codecs.base import KVGeometry
from lmtier.codecs.quant import Fp8Codec, QuantOptions
from lmtier.errors import InvalidArgumentError
from lmtier.transfer import describe_layout
from lmtier.transfer.coded import offload_coded
from tests.support.coded_cases import CODECS, KINDS, check_coded_round_trip, float_cache


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize(("kind", "scales"), KINDS)
def test_coded_transfers_write_and_read_exactly_the_cpu_codecs_bytes(kind: str, scales: str, codec: str) -> None:
    check_coded_round_trip("cpu", kind, scales, codec)


def test_the_device_settings_of_the_codec_give_the_same_bytes() -> None:
    """What the GPU path runs (the whole chunk at once, no inf/NaN check) against the CPU codec's
    steps, on the same bytes."""
    codec = Fp8Codec(QuantOptions(scales="vector"))
    kv = KVGeometry("bfloat16", "vllm_blocks_first", 4, 16, 2, 64, 8192)
    raw = (torch.randn(4 * 8 * 4096) * 3).to(torch.bfloat16).view(torch.uint8)
    n = codec.encoded_nbytes(raw.numel(), kv)
    stepped, whole = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    codec.encode_tensor(raw, stepped, kv)
    codec.encode_tensor(raw, whole, kv, step=None, check=False)
    assert torch.equal(stepped, whole)
    a, b = torch.empty_like(raw), torch.empty_like(raw)
    codec.decode_tensor(whole, a)
    codec.decode_tensor(whole, b, prefix=bytes(whole[:32].numpy()), step=None)
    assert torch.equal(a, b)


def test_a_host_chunk_too_small_for_the_encoding_is_refused() -> None:
    cache = float_cache("vllm_blocks_first", "cpu", seed=3)
    layout = describe_layout(cache[0], "vllm_blocks_first")
    codec = Fp8Codec()
    kv = KVGeometry("bfloat16", "vllm_blocks_first", 3, 4, 2, 16, layout.page_bytes)
    with pytest.raises(InvalidArgumentError, match="cannot hold"):
        offload_coded(cache, layout, [[0, 1]], [torch.zeros(16, dtype=torch.uint8)], codec, kv)
