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


def test_an_engine_with_a_device_codec_on_a_cuda_cache_loads_what_a_cpu_engine_stored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Chunks quantized by a CPU engine (on the host) load into a CUDA cache through the GPU
    decode, and chunks the CUDA engine quantizes load into a CPU cache: one format both ways."""
    from prometheus_client import CollectorRegistry

    from lmtier.engine import KVCacheEngine
    from tests.unit.test_engine import config, make_cache, namespace, tokens

    cfg = config(tmp_path, disk=True)
    toks = tokens(40)
    src = make_cache()
    with KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), device_codec="fp8") as cpu_engine:
        assert cpu_engine.store(toks, src, list(range(10, 20))).wait(30) == 40
        cpu_engine.flush(30)
        cpu_back = make_cache(fill=False)
        assert cpu_engine.retrieve(toks, cpu_back, list(range(30, 40))) == 40
    with KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), device_codec="fp8") as gpu_engine:
        gpu = [layer.cuda() for layer in make_cache(fill=False)]
        assert gpu_engine.retrieve(toks, gpu, list(range(30, 40))) == 40  # from the disk tier: the CPU's encodings
        torch.cuda.synchronize()
        assert all(torch.equal(g.cpu()[30:40], c[30:40]) for g, c in zip(gpu, cpu_back, strict=True))
        other = tokens(40, seed=7)
        gsrc = [layer.cuda() for layer in make_cache(seed=3)]
        assert gpu_engine.store(other, gsrc, list(range(10))).wait(30) == 40
        gpu_engine.flush(30)
    with KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), device_codec="fp8") as cpu_again:
        back = make_cache(fill=False)
        assert cpu_again.retrieve(other, back, list(range(50, 60))) == 40  # the GPU's encodings, on the CPU
        want = torch.stack([layer[:10] for layer in make_cache(seed=3)]).float()
        got = torch.stack([layer[50:60] for layer in back]).float()
        assert 0 < float((got - want).norm() / want.norm()) < 0.04
