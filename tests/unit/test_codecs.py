"""Value codecs: exact round trips (lz4, zstd), bounded error (fp8, int8), the registry and config
errors, and the manager storing encoded values in a real disk tier (header codec id and raw
length, unknown ids left in place, lossy codecs only under namespaces that declare them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from lmtier.codecs.base import CodecSpec, KVGeometry
from lmtier.codecs.lossless import Lz4Codec, Lz4Options, ZstdCodec, ZstdOptions
from lmtier.codecs.quant import Fp8Codec, Int8Codec, QuantOptions
from lmtier.errors import ConfigError, PluginError
from lmtier.framing import HEADER_BYTES, READABLE_CODECS, decode_header
from lmtier.keys import KVNamespace, chunk_keys
from lmtier.manager import LOSSY_FIELD, StorageManager
from lmtier.registry import BackendRegistry, hookimpl
from lmtier.testing.backdoors import unknown_codec
from tests.support.backdoors import RawFiles
from tests.support.codec_tiers import CODECS, CodecCase, check_a_reader_without_the_codec_decodes

LAYERS, BLOCK, HEADS, HEAD = 2, 4, 2, 16
PAGES = 4
PAGE_BYTES = 2 * BLOCK * HEADS * HEAD * 2
GEO = KVGeometry("bfloat16", "vllm_kv_first", LAYERS, BLOCK, HEADS, HEAD, PAGE_BYTES)


def kv_bytes(seed: int = 0, pages: int = PAGES) -> bytes:
    """bf16 values shaped like KV: per-channel magnitudes (an outlier channel), not uniform noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(LAYERS, pages, 2, BLOCK, HEADS, HEAD, generator=g)
    x *= torch.linspace(0.2, 3.0, HEAD)
    x[..., 3] *= 8  # an outlier channel, as K has
    return x.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def roundtrip(codec: Any, raw: bytes, kv: KVGeometry | None = GEO) -> tuple[bytes, int]:
    dst = bytearray(codec.max_encoded_bytes(len(raw), kv))
    n = codec.encode(memoryview(raw), memoryview(dst), kv)
    out = bytearray(len(raw))
    codec.decode(memoryview(dst)[:n], memoryview(out))
    return bytes(out), n


def rel_error(raw: bytes, out: bytes) -> float:
    a = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float()
    b = torch.frombuffer(bytearray(out), dtype=torch.bfloat16).float()
    return float((a - b).norm() / a.norm())


# -- codecs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", [Lz4Codec(), Lz4Codec(Lz4Options(shuffle=True)), ZstdCodec(),
                                   ZstdCodec(ZstdOptions(level=-3)), ZstdCodec(ZstdOptions(level=9, shuffle=True))],
                         ids=["lz4", "lz4-shuffle", "zstd", "zstd-fast", "zstd9-shuffle"])
def test_lossless_codecs_give_back_every_byte(codec: Any) -> None:
    for raw in (kv_bytes(1), bytes(1000), np.random.default_rng(2).bytes(4097), b"x"):
        out, n = roundtrip(codec, raw, None)
        assert out == raw
        assert n <= codec.max_encoded_bytes(len(raw), None)
    assert not codec.lossy and codec.tag() == ""


def test_zstd_compresses_kv_with_and_without_shuffle() -> None:
    raw = kv_bytes(3, pages=16)
    _, plain = roundtrip(ZstdCodec(), raw)
    _, shuffled = roundtrip(ZstdCodec(ZstdOptions(shuffle=True)), raw)
    assert shuffled <= plain < len(raw)  # (real KV: 1.46x vs 1.29x, docs/codecs.md)


@pytest.mark.parametrize("scales", ["vector", "block_head", "layer"])
@pytest.mark.parametrize("kind,bound", [(Fp8Codec, 0.04), (Int8Codec, 0.03)])
def test_quantizers_halve_kv_within_their_error(kind: Any, bound: float, scales: str) -> None:
    codec = kind(QuantOptions(scales=scales))  # type: ignore[arg-type]
    raw = kv_bytes(4)
    out, n = roundtrip(codec, raw)
    assert rel_error(raw, out) < bound
    scale_bytes = {"vector": 4 / HEAD, "block_head": 4 / (BLOCK * HEAD), "layer": 0.0}[scales]
    assert n < (0.5 + scale_bytes / 2 + 0.02) * len(raw)  # one byte per element, four per scale
    assert codec.lossy and codec.tag() == f"{codec.name}/{scales}"


def test_a_zero_block_and_a_tail_chunk_quantize() -> None:
    raw = bytes(len(kv_bytes(0, pages=1)))  # all zeros: scale 1, no division by zero
    for codec in (Fp8Codec(QuantOptions(scales="block_head")), Int8Codec()):
        assert roundtrip(codec, raw)[0] == raw
    tail = kv_bytes(5, pages=3)  # fewer pages than a whole chunk
    assert rel_error(tail, roundtrip(Fp8Codec(QuantOptions(scales="block_head")), tail)[0]) < 0.04


def test_a_lossy_codec_refuses_kv_it_cannot_quantize() -> None:
    fp8 = Fp8Codec()
    assert fp8.check_kv(KVGeometry("uint8", "vllm_kv_first", 2, 4, 2, 16, 256)) is not None
    assert "block_head" in str(Fp8Codec(QuantOptions(scales="block_head")).check_kv(
        KVGeometry("bfloat16", "vllm_blocks_first", 2, 4, 2, 16, PAGE_BYTES)))
    infinite = torch.full((len(kv_bytes()) // 2,), float("inf"), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="inf or NaN"):
        roundtrip(fp8, infinite.view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("codec", [ZstdCodec(), Lz4Codec(), Fp8Codec(), Int8Codec()], ids=lambda c: c.name)
def test_a_damaged_or_short_encoding_does_not_decode(codec: Any) -> None:
    raw = kv_bytes(6)
    dst = bytearray(codec.max_encoded_bytes(len(raw), GEO))
    n = codec.encode(memoryview(raw), memoryview(dst), GEO)
    with pytest.raises(ValueError):
        codec.decode(memoryview(dst)[: n // 2], memoryview(bytearray(len(raw))))
    with pytest.raises(ValueError):  # the right encoding, the wrong raw length
        codec.decode(memoryview(dst)[:n], memoryview(bytearray(len(raw) + 64)))


# -- registry and config ---------------------------------------------------------------------------
def test_lmtiers_codecs_are_registered_by_entry_point() -> None:
    reg = BackendRegistry.discover()
    assert {"lz4", "zstd", "fp8", "int8"} <= set(reg.codec_names())
    assert {c.codec_id for c in reg.codec_specs()} >= {1, 2, 3, 4}
    assert reg.create_codec("zstd", {"level": 5}).level == 5  # type: ignore[attr-defined]


class _ZlibCodec:
    """A third party's codec (lossless, id in the plugin range): stdlib zlib."""

    name, codec_id, lossy = "plusone", 0x8123, False

    def tag(self) -> str:
        return ""

    def check_kv(self, kv: KVGeometry) -> str | None:
        return None

    def max_encoded_bytes(self, raw_nbytes: int, kv: KVGeometry | None) -> int:
        return raw_nbytes + raw_nbytes // 100 + 64

    def encode(self, src: memoryview, dst: memoryview, kv: KVGeometry | None) -> int:
        import zlib

        out = zlib.compress(src, 1)
        dst[: len(out)] = out
        return len(out)

    def decode(self, src: memoryview, dst: memoryview) -> None:
        import zlib

        out = zlib.decompress(src)
        if len(out) != dst.nbytes:
            raise ValueError("wrong length")
        dst[:] = out


class _PlusOneOptions:
    pass


class ThirdParty:
    @staticmethod
    @hookimpl
    def lmtier_value_codecs() -> list[CodecSpec]:
        return [CodecSpec("plusone", 0x8123, f"{__name__}:make_plusone", "lmtier.codecs.lossless:Lz4Options")]


def make_plusone(options: object) -> _ZlibCodec:
    return _ZlibCodec()


def test_a_third_party_codec_registers_and_bad_ones_are_refused() -> None:
    reg = BackendRegistry.discover()
    reg.register_plugin(ThirdParty, name="plusone-plugin")
    assert "plusone" in reg.codec_names() and 0x8123 in reg.decoders()

    class TakesLmtiersId:
        @staticmethod
        @hookimpl
        def lmtier_value_codecs() -> list[CodecSpec]:
            return [CodecSpec("mine", 7, f"{__name__}:make_plusone", "lmtier.codecs.lossless:Lz4Options")]

    class TakesAnId:
        @staticmethod
        @hookimpl
        def lmtier_value_codecs() -> list[CodecSpec]:
            return [CodecSpec("other", 0x8123, f"{__name__}:make_plusone", "lmtier.codecs.lossless:Lz4Options")]

    with pytest.raises(PluginError, match="below 0x8000 are lmtier's own"):
        reg.register_plugin(TakesLmtiersId, name="a")
    with pytest.raises(PluginError, match="claimed by codecs 'plusone' and 'other'"):
        reg.register_plugin(TakesAnId, name="b")
    assert "mine" not in reg.codec_names() and "other" not in reg.codec_names()


def config(tmp_path: Path, codec: Any, *, hot: bool = True, **disk: Any) -> dict[str, Any]:
    tiers = [{"name": "hot", "backend": "cpu", "options": {"max_bytes": 1 << 20}}] if hot else []
    tiers.append({"name": "disk", "backend": "disk", "codec": codec,
                  "options": {"root": str(tmp_path / "disk"), "max_bytes": 64 << 20, **disk}})
    return {"chunk_tokens": BLOCK * PAGES, "tiers": tiers}


@pytest.mark.asyncio
@pytest.mark.parametrize("codec,message", [
    ("zstx", "unknown codec 'zstx' (did you mean 'zstd'?); known codecs: none, fp8, int8, lz4, zstd"),
    ({"name": "zstd", "levle": 3}, "tiers[1].codec.levle: unknown key"),
    ({"name": "fp8", "scales": "token"}, "tiers[1].codec.scales"),
    ({"name": "none", "level": 3}, "options ['level'] given with codec none"),
])
async def test_bad_codec_config_is_a_config_error_naming_it(tmp_path: Path, codec: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        await StorageManager.from_config(config(tmp_path, codec), metrics_registry=CollectorRegistry())
    assert message in str(err.value)


@pytest.mark.asyncio
async def test_a_codec_on_the_in_memory_hot_tier_is_refused_at_open(tmp_path: Path) -> None:
    cfg = {"tiers": [{"name": "hot", "backend": "cpu", "codec": "zstd", "options": {"max_bytes": 1 << 20}}]}
    with pytest.raises(ConfigError, match=r"tiers\[0\] \(hot\).codec: zstd on an in-memory tier"):
        await StorageManager.from_config(cfg, metrics_registry=CollectorRegistry())


def kvns(dtype: str = "bfloat16", **extra: str) -> KVNamespace:
    return KVNamespace(model="m", kv_layout="vllm_kv_first", dtype=dtype, num_layers=LAYERS, block_size=BLOCK,
                       num_kv_heads=HEADS, head_size=HEAD, page_bytes=PAGE_BYTES, chunk_tokens=BLOCK * PAGES,
                       extra=tuple(extra.items()))


@pytest.mark.asyncio
async def test_a_lossy_codec_on_non_float_kv_is_a_config_error_at_registration(tmp_path: Path) -> None:
    async with await StorageManager.from_config(config(tmp_path, "int8"), metrics_registry=CollectorRegistry()) as m:
        with pytest.raises(ConfigError, match=r"tiers\[1\] \(disk\).codec: codec int8 quantizes float KV"):
            m.register_namespace(m.declare_lossy(kvns("uint8")))
        m.register_namespace(kvns())  # float KV is fine, with or without the declaration


# -- the manager and a real disk tier --------------------------------------------------------------
def stored(tmp_path: Path, manager: StorageManager, key: Any) -> bytes:
    path = manager.tier("disk").backend.path_of(key)  # type: ignore[attr-defined]
    return Path(path).read_bytes()


@pytest.mark.asyncio
@pytest.mark.parametrize("codec", ["zstd", {"name": "zstd", "level": 3, "shuffle": True}])
async def test_a_lossless_tier_stores_fewer_bytes_and_reads_back_exactly(tmp_path: Path, codec: Any) -> None:
    reg = CollectorRegistry()
    async with await StorageManager.from_config(config(tmp_path, codec, hot=False), metrics_registry=reg) as m:
        keys = chunk_keys(list(range(BLOCK * PAGES * 3)), kvns().namespace, BLOCK * PAGES)
        values = [kv_bytes(i) for i in range(3)]
        await m.put(list(zip(keys, values, strict=True)))
        data = stored(tmp_path, m, keys[0])
        head = decode_header(keys[0], data, codecs=READABLE_CODECS)
        assert head.codec == 2 and head.raw_length == len(values[0]) and head.payload_length < len(values[0])
        assert [bytes(v) for v in await m.get(keys)] == values  # type: ignore[arg-type]
        outs = [bytearray(len(v)) for v in values]
        assert await m.get_into(keys, outs) == [True] * 3 and outs == values
        fetched = await m.fetch(keys, [len(v) for v in values])
        try:
            assert [bytes(b.view()) for b in fetched if b is not None] == values
        finally:
            for b in fetched:
                if b is not None:
                    b.release()
        name = "zstd"
        raw_in = reg.get_sample_value("lmtier_codec_raw_bytes_total", {"tier": "disk", "codec": name})
        out = reg.get_sample_value("lmtier_codec_stored_bytes_total", {"tier": "disk", "codec": name})
        assert raw_in == sum(map(len, values)) and out is not None and out < raw_in


@pytest.mark.asyncio
async def test_a_codec_tier_batch_goes_out_and_comes_back_in_slices(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import lmtier.manager

    monkeypatch.setattr(lmtier.manager, "CODEC_SLICE_BYTES", len(kv_bytes()) + 1)  # a slice per value
    reg = CollectorRegistry()
    async with await StorageManager.from_config(config(tmp_path, "zstd", hot=False), metrics_registry=reg) as m:
        keys = chunk_keys(list(range(BLOCK * PAGES * 7)), kvns().namespace, BLOCK * PAGES)
        values = [kv_bytes(20 + i) for i in range(7)]  # more slices than MAX_IN_FLIGHT
        assert await m.put(list(zip(keys, values, strict=True))) == 7
        assert all(decode_header(k, stored(tmp_path, m, k), codecs=READABLE_CODECS).codec == 2 for k in keys)
        written = reg.get_sample_value("lmtier_tier_written_bytes_total", {"tier": "disk"})
        assert written == reg.get_sample_value("lmtier_codec_stored_bytes_total", {"tier": "disk", "codec": "zstd"})
        outs = [bytearray(len(v)) for v in values]
        assert await m.get_into(keys, outs) == [True] * 7 and outs == values
        fetched = await m.fetch(keys, [len(v) for v in values])
        try:
            assert [bytes(b.view()) for b in fetched if b is not None] == values
        finally:
            for b in fetched:
                if b is not None:
                    b.release()


@pytest.mark.asyncio
async def test_coded_values_demoted_and_promoted_stay_exact(tmp_path: Path) -> None:
    cfg = config(tmp_path, "zstd")
    cfg["tiers"][0]["options"]["max_bytes"] = len(kv_bytes()) * 2  # the hot tier evicts: demotions
    async with await StorageManager.from_config(cfg, metrics_registry=CollectorRegistry()) as m:
        keys = chunk_keys(list(range(BLOCK * PAGES * 6)), kvns().namespace, BLOCK * PAGES)
        values = [kv_bytes(10 + i) for i in range(6)]
        for k, v in zip(keys, values, strict=True):
            await m.put([(k, v)])
        await m.flush()
        assert [bytes(v) for v in await m.get(keys)] == values  # type: ignore[arg-type]
        await m.flush()  # promotions of the disk hits into the hot tier, decoded
        assert [bytes(v) for v in await m.get(keys[-2:])] == values[-2:]  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_value_of_an_unknown_codec_is_a_miss_left_in_place_and_counted(tmp_path: Path) -> None:
    async with await StorageManager.from_config(config(tmp_path, "none", hot=False),
                                                metrics_registry=CollectorRegistry()) as m:
        (key,) = chunk_keys(list(range(BLOCK * PAGES)), kvns().namespace, BLOCK * PAGES)
        await m.put([(key, kv_bytes())])
        path = Path(m.tier("disk").backend.path_of(key))  # type: ignore[attr-defined]
        original = path.read_bytes()
    for codec in (0x8123, 0x7F01):  # a plugin not installed here; a newer lmtier's codec
        written = unknown_codec(original, codec)
        path.write_bytes(written)
        async with await StorageManager.from_config(config(tmp_path, "none", hot=False),
                                                    metrics_registry=CollectorRegistry()) as fresh:
            assert await fresh.get([key]) == [None]
            assert await fresh.get_into([key], [bytearray(len(kv_bytes()))]) == [False]
            assert await fresh.contains([key]) == [codec == 0x8123]  # a plugin's id: only the manager can tell
            # a newer lmtier's id: the disk tier found it when it opened (scan of headers) and counts it
            assert fresh.stats()["disk"]["newer_format"] == (codec == 0x7F01)
        assert path.read_bytes() == written, f"codec {codec:#x}: the value was not left in place"


@pytest.mark.asyncio
async def test_unknown_plugin_codec_is_counted_by_the_manager(tmp_path: Path) -> None:
    registry = BackendRegistry.discover()
    registry.register_plugin(ThirdParty, name="plusone-plugin")
    cfg = config(tmp_path, "plusone", hot=False)
    async with await StorageManager.from_config(cfg, registry=registry, metrics_registry=CollectorRegistry()) as m:
        (key,) = chunk_keys(list(range(BLOCK * PAGES)), kvns().namespace, BLOCK * PAGES)
        await m.put([(key, kv_bytes())])
        (value,) = await m.get([key])
        assert bytes(value) == kv_bytes()  # type: ignore[arg-type]
        del value
        path = Path(m.tier("disk").backend.path_of(key))  # type: ignore[attr-defined]
        written = path.read_bytes()
    reg = CollectorRegistry()  # a process without the plugin
    async with await StorageManager.from_config(config(tmp_path, "none", hot=False), metrics_registry=reg,
                                                registry=BackendRegistry.discover()) as m:
        assert await m.get([key]) == [None]
        assert reg.get_sample_value("lmtier_codec_unknown_values_total", {"tier": "disk"}) == 1
    assert path.read_bytes() == written


@pytest.mark.asyncio
async def test_an_encoding_that_does_not_decode_is_a_miss_and_deleted(tmp_path: Path) -> None:
    async with await StorageManager.from_config(config(tmp_path, "zstd", hot=False),
                                                metrics_registry=CollectorRegistry()) as m:
        (key,) = chunk_keys(list(range(BLOCK * PAGES)), kvns().namespace, BLOCK * PAGES)
        await m.put([(key, kv_bytes())])
        path = Path(m.tier("disk").backend.path_of(key))  # type: ignore[attr-defined]
        data = path.read_bytes()
        head = decode_header(key, data, codecs=READABLE_CODECS)
        from lmtier.framing import encode_header

        garbage = b"\x00" + bytes(head.payload_length - 1)  # no zstd frame, a valid checksum
        path.write_bytes(encode_header(key, garbage, codec=2, raw_length=head.raw_length) + garbage)
    async with await StorageManager.from_config(config(tmp_path, "zstd", hot=False),
                                                metrics_registry=CollectorRegistry()) as m:
        assert await m.get([key]) == [None]
        assert not path.exists()


@pytest.mark.asyncio
async def test_a_lossy_tier_encodes_only_namespaces_that_declare_it(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    cfg = config(tmp_path, {"name": "fp8", "scales": "block_head"}, hot=False)
    async with await StorageManager.from_config(cfg, metrics_registry=reg) as m:
        assert m.lossy_tags() == ("fp8/block_head",)
        declared = m.declare_lossy(kvns())
        assert (LOSSY_FIELD, "fp8/block_head") in declared.extra and declared.namespace != kvns().namespace
        m.register_namespace(declared)
        m.register_namespace(kvns())  # an engine that did not declare it (e.g. through another store)
        raw = kv_bytes(7)
        lossy_key = chunk_keys(list(range(BLOCK * PAGES)), declared.namespace, BLOCK * PAGES)[0]
        exact_key = chunk_keys(list(range(BLOCK * PAGES)), kvns().namespace, BLOCK * PAGES)[0]
        await m.put([(lossy_key, raw), (exact_key, raw)])
        assert decode_header(lossy_key, stored(tmp_path, m, lossy_key), codecs=READABLE_CODECS).codec == 3
        assert decode_header(exact_key, stored(tmp_path, m, exact_key)).codec == 0
        got_lossy, got_exact = await m.get([lossy_key, exact_key])
        assert bytes(got_exact) == raw  # type: ignore[arg-type]
        assert 0 < rel_error(raw, bytes(got_lossy)) < 0.04  # type: ignore[arg-type]
        assert len(stored(tmp_path, m, lossy_key)) < 0.55 * len(raw) + HEADER_BYTES
        assert reg.get_sample_value("lmtier_codec_raw_values_total", {"tier": "disk", "reason": "namespace"}) == 1


def test_an_engine_on_a_lossy_chain_keys_under_its_own_namespace(tmp_path: Path) -> None:
    from lmtier.engine import KVCacheEngine

    kv_cache = [torch.randn(2, 8, BLOCK, HEADS, HEAD).to(torch.bfloat16) for _ in range(LAYERS)]
    tokens = list(range(BLOCK * PAGES * 2))
    blocks = list(range(8))
    plain = KVCacheEngine(config(tmp_path, "zstd"), kvns(), name="plain")
    lossy = KVCacheEngine(config(tmp_path / "b", {"name": "int8"}), kvns(), name="lossy")
    try:
        assert lossy.namespace != plain.namespace and plain.namespace == kvns().namespace
        assert lossy.derive_namespace(("salt", "x")) != plain.derive_namespace(("salt", "x"))
        lossy.store(tokens, kv_cache, blocks).wait(30)
        lossy.flush(30)
        lossy.kvstore.loop.call_soon_threadsafe(lambda: None)  # (the hot tier is cleared on its loop)
        import asyncio

        asyncio.run_coroutine_threadsafe(lossy.manager.tiers[0].backend.clear(), lossy.kvstore.loop).result()  # type: ignore[attr-defined]
        target = [torch.zeros_like(t) for t in kv_cache]
        assert lossy.retrieve(tokens, target, blocks) == len(tokens)
        for a, b in zip(kv_cache, target, strict=True):
            assert 0 < float((a.float() - b.float()).norm() / a.float().norm()) < 0.03
    finally:
        plain.close()
        lossy.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("case", [CODECS[0], CODECS[1], CODECS[2], CODECS[3], CODECS[6]], ids=str)
async def test_a_disk_tier_without_the_codec_reads_what_another_process_stored_encoded(tmp_path: Path,
                                                                                     case: CodecCase) -> None:
    tier = {"name": "disk", "backend": "disk", "timeout_s": 30,
            "options": {"root": str(tmp_path / "tier"), "max_bytes": 64 << 20}}
    await check_a_reader_without_the_codec_decodes(tier, RawFiles(tmp_path / "tier"), case)
