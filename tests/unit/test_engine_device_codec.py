"""KVCacheEngine with a device codec: chunks are quantized where the cache is (here a CPU cache,
running the very functions a GPU runs) and stored as encodings in every tier; loads decode them
into the pages, within the codec's error; bad configurations are ConfigErrors naming the key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from lmtier.codecs.base import KVGeometry
from lmtier.codecs.quant import Fp8Codec, QuantOptions
from lmtier.engine import DEVICE_CODEC_FIELD, KVCacheEngine
from lmtier.errors import ConfigError
from lmtier.keys import chunk_keys
from tests.unit.test_engine import BLK, CHUNK, LAYERS, PAGE_BYTES, config, make_cache, namespace, tokens


def relative_error(a: list[torch.Tensor], ablocks: list[int], b: list[torch.Tensor], bblocks: list[int]) -> float:
    x = torch.stack([layer[ablocks] for layer in a]).float()
    y = torch.stack([layer[bblocks] for layer in b]).float()
    return float((x - y).norm() / x.norm())


def engine(tmp_path: Path, **kw: Any) -> KVCacheEngine:
    return KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry(), **kw)


def test_chunks_are_stored_as_the_codecs_encoding_and_load_within_its_error(tmp_path: Path) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(40)  # 2 whole chunks + a 2-block tail
    with engine(tmp_path, device_codec="fp8") as eng:
        assert (DEVICE_CODEC_FIELD, "fp8/vector") in eng.kv.extra and eng.namespace != namespace().namespace
        assert eng.store(toks, src, list(range(10, 20))).wait(30) == 40
        eng.flush(30)
        codec = Fp8Codec(QuantOptions(scales="vector"))
        geo = KVGeometry.of(eng.kv)
        keys = chunk_keys(toks, eng.namespace, CHUNK, include_partial=True)
        values = asyncio.run_coroutine_threadsafe(eng.manager.get(keys), eng.kvstore.loop).result()  # type: ignore[attr-defined]
        for value, pages in zip(values, [4, 4, 2], strict=True):  # the hot tier holds encodings
            raw = LAYERS * pages * PAGE_BYTES
            assert value is not None and memoryview(value).nbytes == codec.encoded_nbytes(raw, geo) < 0.8 * raw
            codec.decode(memoryview(value), memoryview(bytearray(raw)))  # the CPU codec's own format
        del values
        assert eng.retrieve(toks, dst, list(range(30, 40))) == 40
        error = relative_error(src, list(range(10, 20)), dst, list(range(30, 40)))
        assert 0 < error < 0.04, error
        part = make_cache(fill=False)  # a load from the middle of the first chunk: part of its pages
        assert eng.retrieve(toks, part, list(range(40, 50)), start=2 * BLK, end=24) == 24 - 2 * BLK
        assert torch.equal(torch.stack([layer[42:46] for layer in part]), torch.stack([layer[32:36] for layer in dst]))
        assert all(int(layer[40:42].abs().sum()) == 0 for layer in part), "blocks before start were written"


def test_a_fresh_engine_loads_the_encodings_from_the_disk_tier(tmp_path: Path) -> None:
    src = make_cache()
    toks = tokens(32, seed=4)
    with engine(tmp_path, device_codec={"name": "int8", "scales": "layer"}) as first:
        assert first.store(toks, src, list(range(8))).wait(30) == 32
        first.flush(30)
    with KVCacheEngine(config(tmp_path, disk=True) | {"device_codec": {"name": "int8", "scales": "layer"}},
                       namespace(), metrics_registry=CollectorRegistry()) as second:  # the config's device_codec
        assert second.namespace == first.namespace
        dst = make_cache(fill=False)
        assert second.retrieve(toks, dst, list(range(20, 28))) == 32
        assert 0 < relative_error(src, list(range(8)), dst, list(range(20, 28))) < 0.05


@pytest.mark.parametrize(("device_codec", "message"), [
    ("zstd", "device_codec: zstd does not run on the KV cache's device"),
    ("fp9", "unknown codec 'fp9'"),
    ({"name": "fp8", "scales": "token"}, "device_codec.scales"),
    ({"name": "fp8", "scales": "block_head"}, "device_codec: scales: block_head needs pages of"),
])
def test_a_device_codec_that_cannot_run_is_a_config_error(tmp_path: Path, device_codec: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        engine(tmp_path, device_codec=device_codec)


def test_a_device_codec_over_a_lossy_tier_would_quantize_twice(tmp_path: Path) -> None:
    cfg = config(tmp_path, disk=True)
    cfg["tiers"][1]["codec"] = "int8"
    with pytest.raises(ConfigError, match="would quantize the KV twice"):
        KVCacheEngine(cfg, namespace(), metrics_registry=CollectorRegistry(), device_codec="fp8")
