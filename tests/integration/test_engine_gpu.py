"""KVCacheEngine on CUDA KV caches: copy-out on a stream, layer-wise onload on a side stream.

``LMTIER_REQUIRE_NATIVE=1`` for every test: a silent fall back to the torch path fails it. The
pages are compared as bytes. Run on the GPU machine (the lead's batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from lmtier.engine import KVCacheEngine
from lmtier.keys import KVNamespace
from tests.support.native import skip_unless_native

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LAYERS, BLOCKS, BLK, HEADS, HEAD = 4, 128, 16, 8, 128
CHUNK = 64
PAGE = 2 * BLK * HEADS * HEAD * 2  # flashinfer-like (num_blocks, 2, block, heads, head) bf16


@pytest.fixture(autouse=True)
def require_native(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_native()
    monkeypatch.setenv("LMTIER_REQUIRE_NATIVE", "1")
    monkeypatch.delenv("LMTIER_DISABLE_NATIVE", raising=False)


def _namespace() -> KVNamespace:
    return KVNamespace(model="gpu-engine", kv_layout="flashinfer", dtype="bfloat16", num_layers=LAYERS,
                       block_size=BLK, num_kv_heads=HEADS, head_size=HEAD, page_bytes=PAGE, chunk_tokens=CHUNK)


def _cache(fill: bool) -> list[torch.Tensor]:
    buf = torch.zeros(LAYERS, BLOCKS, 2, BLK, HEADS, HEAD, dtype=torch.bfloat16, device="cuda")
    if fill:
        buf.copy_(torch.randn(buf.shape, device="cuda").to(torch.bfloat16))
    return list(buf.unbind(0))


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 30000, (n,), generator=g).tolist()


def _config(tmp_path: Path, disk: bool) -> dict[str, Any]:
    tiers: list[dict[str, Any]] = [{"name": "hot", "backend": "cpu", "options": {"max_bytes": 256 << 20}}]
    if disk:
        tiers.append({"name": "local", "backend": "disk", "options": {"root": str(tmp_path / "disk")}})
    return {"chunk_tokens": CHUNK, "tiers": tiers, "host_pool_bytes": 64 << 20}


@pytest.fixture(params=[True, False], ids=["layerwise", "oneshot"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KVCacheEngine]:
    with KVCacheEngine(_config(tmp_path, False), _namespace(), layerwise=request.param,
                       metrics_registry=CollectorRegistry()) as eng:
        yield eng


def test_store_on_a_side_stream_then_layerwise_retrieve_is_byte_exact(engine: KVCacheEngine) -> None:
    src, dst = _cache(True), _cache(False)
    toks = _tokens(5 * CHUNK, seed=1)
    blocks = list(range(20))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    handle = engine.store(toks, src, blocks, stream=side)
    assert handle.copy_event is not None
    torch.cuda.current_stream().wait_event(handle.copy_event)  # a kernel reusing the blocks waits for it
    assert handle.wait() == 5 * CHUNK
    dst_blocks = list(range(40, 60))
    with engine.start_retrieve(toks, dst, dst_blocks) as load:
        for layer in range(LAYERS):
            assert load.wait_layer(layer) == 5 * CHUNK  # the current stream waits for this layer only
            got = dst[layer][dst_blocks].float().sum()  # a kernel ordered after the layer's event
            want = src[layer][blocks].float().sum()
            torch.testing.assert_close(got, want)
        assert load.staged_chunks == 0
    torch.cuda.synchronize()
    for a, b in zip(src, dst, strict=True):
        assert torch.equal(a[blocks].view(torch.uint8), b[dst_blocks].view(torch.uint8))


def test_colder_hits_are_read_into_pinned_memory_once_and_loaded(tmp_path: Path) -> None:
    src, dst = _cache(True), _cache(False)
    toks = _tokens(4 * CHUNK, seed=2)
    with KVCacheEngine(_config(tmp_path, True), _namespace(), metrics_registry=CollectorRegistry()) as eng:
        eng.store(toks, src, list(range(16))).wait()
    with KVCacheEngine(_config(tmp_path, True), _namespace(), metrics_registry=CollectorRegistry()) as eng:
        with eng.start_retrieve(toks, dst, list(range(16, 32)), end=3 * CHUNK + 2 * BLK) as load:
            events = load.enqueue(timing=True)
            assert events is not None and len(events) == LAYERS
            assert load.wait() == 3 * CHUNK + 2 * BLK
            assert load.staged_chunks == 1  # only the last chunk, of which 2 of 4 pages are wanted
        torch.cuda.synchronize()
        n = 3 * CHUNK // BLK + 2
        for a, b in zip(src, dst, strict=True):
            assert torch.equal(a[:n].view(torch.uint8), b[16:16 + n].view(torch.uint8))
