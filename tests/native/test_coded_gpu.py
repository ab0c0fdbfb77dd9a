"""Quantized offload and onload on a CUDA cache: the encoding made on the GPU is byte for byte the
CPU codec's encoding of the same pages, and an encoding onloads to exactly the pages the CPU codec
decodes (the CPU twin: tests/unit/test_coded_transfer.py)."""

from __future__ import annotations

import pytest
import torch

from tests.support.coded_cases import CODECS, KINDS, check_coded_round_trip

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize(("kind", "scales"), KINDS)
def test_gpu_coded_transfers_write_and_read_exactly_the_cpu_codecs_bytes(kind: str, scales: str, codec: str) -> None:
    check_coded_round_trip("cuda", kind, scales, codec)
