"""Value codecs through a StorageManager over a real remote tier, written once for every tier kind.

A tier's test module (``tests/backends/<kind>/test_codecs.py``) gives a ``tiers`` entry for its
server and a :class:`~lmtier.testing.backdoors.RawStore` reading and writing the stored bytes
around the backend; the scenarios here check what each codec stores (the header's codec id and
raw length, fewer payload bytes) and reads back through ``get``, ``get_into`` and ``fetch``
(lossless: every byte; lossy: exactly what the codec's own round trip gives, within its error),
and what a reader does with values it cannot decode (a miss, left in place and counted, or
deleted when the encoding is broken).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from lmtier.codecs.base import KVGeometry
from lmtier.framing import HEADER_BYTES, READABLE_CODECS, checksum, decode_header, encode_header
from lmtier.keys import KVNamespace, chunk_keys
from lmtier.manager import StorageManager
from lmtier.registry import BackendRegistry
from lmtier.testing.backdoors import RawStore, maybe_await, unknown_codec

__all__ = ["CODECS", "CodecCase", "check_a_broken_encoding_is_deleted", "check_a_reader_without_the_codec_decodes",
           "check_codec_round_trip", "check_unknown_codec_ids_are_misses_left_in_place", "kv_value", "namespace"]

LAYERS, BLOCK, HEADS, HEAD = 4, 16, 2, 64
PAGES = 4  # a whole chunk: 256 KiB of bf16 (the redis tier's pooled receive path); a tail has 2
PAGE_BYTES = 2 * BLOCK * HEADS * HEAD * 2
GEOMETRY = KVGeometry("bfloat16", "vllm_kv_first", LAYERS, BLOCK, HEADS, HEAD, PAGE_BYTES)


@dataclass(frozen=True)
class CodecCase:
    """One tier codec: its YAML value, the header id its values carry, and for a lossy codec
    the bound on the relative error of the KV read back."""

    spec: Any
    codec_id: int
    bound: float = 0.0

    @property
    def lossy(self) -> bool:
        return self.bound > 0

    def __str__(self) -> str:
        if isinstance(self.spec, str):
            return self.spec
        return "-".join(str(v) for v in self.spec.values())


CODECS = [
    CodecCase("lz4", 1), CodecCase("zstd", 2), CodecCase({"name": "zstd", "level": 3, "shuffle": True}, 2),
    CodecCase({"name": "fp8", "scales": "vector"}, 3, 0.04),
    CodecCase({"name": "fp8", "scales": "block_head"}, 3, 0.04),
    CodecCase({"name": "fp8", "scales": "layer"}, 3, 0.04),
    CodecCase({"name": "int8", "scales": "vector"}, 4, 0.02),
    CodecCase({"name": "int8", "scales": "block_head"}, 4, 0.03),
    CodecCase({"name": "int8", "scales": "layer"}, 4, 0.05),
]


def kv_value(seed: int, pages: int = PAGES) -> bytes:
    """bf16 bytes shaped like a chunk of KV (``[layers x pages x (2, block, heads, head)]``):
    channels of different magnitudes with an outlier, and one page still empty (zeros), as in a
    chunk whose last block was not filled; lz4 finds something to compress in it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(LAYERS, pages, 2, BLOCK, HEADS, HEAD, generator=g) * torch.linspace(0.2, 3.0, HEAD)
    x[..., 5] *= 8
    x[:, -1] = 0
    return bytes(x.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())


def namespace(**extra: str) -> KVNamespace:
    return KVNamespace(model="codec-tiers", kv_layout="vllm_kv_first", dtype="bfloat16", num_layers=LAYERS,
                       block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, page_bytes=PAGE_BYTES,
                       chunk_tokens=BLOCK * PAGES, extra=tuple(extra.items()))


def _relative_error(raw: bytes, got: bytes) -> float:
    a = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float()
    b = torch.frombuffer(bytearray(got), dtype=torch.bfloat16).float()
    return float((a - b).norm() / a.norm())


def _codec_round_trip(case: CodecCase, raw: bytes) -> bytes:
    """What the codec alone makes of ``raw`` (the bytes a lossy tier must give back)."""
    spec = case.spec if isinstance(case.spec, dict) else {"name": case.spec}
    codec = BackendRegistry.discover().create_codec(spec["name"], {k: v for k, v in spec.items() if k != "name"})
    dst = bytearray(codec.max_encoded_bytes(len(raw), GEOMETRY))
    n = codec.encode(memoryview(raw), memoryview(dst), GEOMETRY)
    out = bytearray(len(raw))
    codec.decode(memoryview(dst)[:n], memoryview(out))
    return bytes(out)


async def _registered(manager: StorageManager) -> KVNamespace:
    """The engine's part: its namespace, declaring the chain's lossy codecs, registered."""
    kv = manager.declare_lossy(namespace())
    manager.register_namespace(kv)
    return kv


async def check_codec_round_trip(tier: dict[str, Any], raw_store: RawStore, case: CodecCase) -> None:
    """A codec tier stores each value encoded (header: the codec's id, the raw length; fewer
    bytes) and gives back every byte (lossless) or the codec's own round trip (lossy) through
    ``get``, ``get_into`` and ``fetch``; the codec's metrics count what it did."""
    registry = CollectorRegistry()
    config = {"chunk_tokens": BLOCK * PAGES, "tiers": [{**tier, "codec": case.spec}]}
    async with await StorageManager.from_config(config, metrics_registry=registry) as manager:
        kv = await _registered(manager)
        keys = chunk_keys(list(range(BLOCK * PAGES * 3)), kv.namespace, BLOCK * PAGES)
        values = [kv_value(1), kv_value(2), kv_value(3, pages=2)]  # two whole chunks and a tail
        await manager.put(list(zip(keys, values, strict=True)))
        for key, value in zip(keys, values, strict=True):
            stored = await maybe_await(raw_store.read(key))
            assert stored is not None, f"{case}: {key} was not stored"
            head = decode_header(key, stored, codecs=READABLE_CODECS)
            assert (head.codec, head.raw_length) == (case.codec_id, len(value)), f"{case}: header {head}"
            assert head.payload_length == len(stored) - HEADER_BYTES < len(value)
            if case.lossy:  # one byte per element and its scales
                assert head.payload_length < 0.56 * len(value)

        expected = [_codec_round_trip(case, v) if case.lossy else v for v in values]
        if case.lossy:
            for value, back in zip(values, expected, strict=True):
                assert 0 < _relative_error(value, back) < case.bound

        got = await manager.get(keys)
        assert [bytes(v) if v is not None else None for v in got] == expected  # type: ignore[arg-type]
        del got
        outs = [bytearray(len(v)) for v in values]
        assert await manager.get_into(keys, outs) == [True] * 3
        assert [bytes(o) for o in outs] == expected
        fetched = await manager.fetch(keys, [len(v) for v in values])
        try:
            assert [bytes(b.view()) if b is not None else None for b in fetched] == expected
        finally:
            for b in fetched:
                if b is not None:
                    b.release()
        name = case.spec if isinstance(case.spec, str) else case.spec["name"]
        labels = {"tier": tier["name"], "codec": name}
        raw_bytes = registry.get_sample_value("lmtier_codec_raw_bytes_total", labels)
        stored_bytes = registry.get_sample_value("lmtier_codec_stored_bytes_total", labels)
        assert raw_bytes == sum(map(len, values))
        assert stored_bytes is not None and stored_bytes < raw_bytes


async def check_a_reader_without_the_codec_decodes(tier: dict[str, Any], raw_store: RawStore, case: CodecCase) -> None:
    """A process whose tier has no ``codec:`` reads what another process stored there encoded:
    ``lookup`` counts it and ``get``, ``get_into`` and ``fetch`` give back the writer's bytes (the
    codec's round trip), decoded by the header's codec id; the reader counts them
    (``lmtier_codec_foreign_values_total``) and leaves them stored as they were."""
    spec = case.spec if isinstance(case.spec, dict) else {"name": case.spec}
    config = {"chunk_tokens": BLOCK * PAGES, "tiers": [{**tier, "codec": spec}]}
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as writer:
        kv = await _registered(writer)
        keys = chunk_keys(list(range(BLOCK * PAGES * 3)), kv.namespace, BLOCK * PAGES)
        values = [kv_value(31), kv_value(32), kv_value(33, pages=2)]
        await writer.put(list(zip(keys, values, strict=True)))
    stored = [await maybe_await(raw_store.read(k)) for k in keys]
    assert all(s is not None and decode_header(k, s, codecs=READABLE_CODECS).codec == case.codec_id
               for k, s in zip(keys, stored, strict=True)), f"{case}: not stored encoded"
    expected = [_codec_round_trip(case, v) if case.lossy else v for v in values]

    registry = CollectorRegistry()
    config = {"chunk_tokens": BLOCK * PAGES, "tiers": [{**tier, "codec": "none"}]}
    async with await StorageManager.from_config(config, metrics_registry=registry) as reader:
        assert await reader.lookup(keys) == 3
        outs = [bytearray(len(v)) for v in values]
        assert await reader.get_into(keys, outs) == [True] * 3, f"{case}: get_into missed encoded values"
        assert [bytes(o) for o in outs] == expected
        fetched = await reader.fetch(keys, [len(v) for v in values])
        try:
            assert [bytes(b.view()) if b is not None else None for b in fetched] == expected
        finally:
            for b in fetched:
                if b is not None:
                    b.release()
        got = await reader.get(keys)
        assert [bytes(v) if v is not None else None for v in got] == expected  # type: ignore[arg-type]
        del got
        foreign = registry.get_sample_value("lmtier_codec_foreign_values_total", {"tier": tier["name"]})
        assert foreign == 6, f"{case}: counted {foreign} foreign values (get_into and fetch: 3 each)"
    assert [await maybe_await(raw_store.read(k)) for k in keys] == stored, f"{case}: the reader changed them"


async def check_unknown_codec_ids_are_misses_left_in_place(tier: dict[str, Any], raw_store: RawStore) -> None:
    """A value whose codec id this process cannot decode — a third-party plugin's id not
    installed here, or an lmtier id newer than this build — is a miss for ``get``, ``get_into``
    and ``fetch``, whatever the tier's own codec, and stays stored for readers that can; the
    plugin's id is counted (``lmtier_codec_unknown_values_total``), the newer id by the backend
    (``stats()["newer_format"]``)."""
    config = {"chunk_tokens": BLOCK * PAGES, "tiers": [{**tier, "codec": "zstd"}]}
    value = kv_value(4)
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as manager:
        kv = await _registered(manager)
        (key,) = chunk_keys(list(range(BLOCK * PAGES)), kv.namespace, BLOCK * PAGES)
        await manager.put([(key, value)])
        original = await maybe_await(raw_store.read(key))
    assert original is not None
    for codec_id in (0x8123, 0x7F01):
        written = unknown_codec(original, codec_id)
        await maybe_await(raw_store.write(key, written))
        for tier_codec in ("zstd", "none"):  # read through get (a codec tier) or get_into (raw)
            registry = CollectorRegistry()
            config = {"chunk_tokens": BLOCK * PAGES, "tiers": [{**tier, "codec": tier_codec}]}
            async with await StorageManager.from_config(config, metrics_registry=registry) as manager:
                where = f"codec id {codec_id:#x}, tier codec {tier_codec}"
                assert await manager.get([key]) == [None], where
                assert await manager.get_into([key], [bytearray(len(value))]) == [False], where
                assert await manager.fetch([key], [len(value)]) == [None], where
                unknown = registry.get_sample_value("lmtier_codec_unknown_values_total", {"tier": tier["name"]})
                if codec_id >= 0x8000:  # the backend passes plugin ids on; only the manager knows
                    assert unknown is not None and unknown >= 1, where
                else:  # an lmtier id newer than this build: the backend's newer-format count
                    assert manager.stats()[tier["name"]].get("newer_format", 0) >= 1, where
            assert await maybe_await(raw_store.read(key)) == written, f"{where}: the value was not left in place"


async def check_a_broken_encoding_is_deleted(tier: dict[str, Any], raw_store: RawStore) -> None:
    """A value whose header and checksum are intact but whose encoding does not decode (a
    writer's bug) is a miss, and the reader deletes it."""
    config = {"chunk_tokens": BLOCK * PAGES, "tiers": [{**tier, "codec": "zstd"}]}
    value = kv_value(5)
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as manager:
        kv = await _registered(manager)
        keys = chunk_keys(list(range(BLOCK * PAGES * 2)), kv.namespace, BLOCK * PAGES)
        for key, codec_id in zip(keys, (2, 3), strict=True):  # not a zstd frame; not an fp8 prefix
            garbage = b"\x00" + bytes(len(value) // 3)
            framed = encode_header(key, garbage, codec=codec_id, raw_length=len(value),
                                   payload_checksum=checksum(garbage))
            await maybe_await(raw_store.write(key, framed + garbage))
        assert await manager.get(keys) == [None, None]
        for key in keys:
            assert await maybe_await(raw_store.read(key)) is None, f"{key}: a broken encoding was left stored"



async def check_a_frozen_codec_tier_is_a_miss_at_its_deadline(remote: Any, slice_bytes: int) -> None:
    """A frozen server (SIGSTOP) behind an fp8 tier whose batches go out in several slices
    (``slice_bytes``, the test's :data:`~lmtier.manager.CODEC_SLICE_BYTES`): reads are misses and
    the write is skipped at the deadline, nothing half-decoded is shown, and once the server
    thaws and the stuck calls end, the values stored before read back as before."""
    metrics = CollectorRegistry()
    now = [1000.0]  # the breaker's clock: its cooldown passes when the test says so
    deadlines = {"lookup": 0.5, "get": 0.5, "put": 1.0, "delete": 0.5}
    tier = remote.tier(timeout_s=deadlines, codec={"name": "fp8", "scales": "vector"}, breaker={"cooldown_s": 60})
    config = {"chunk_tokens": BLOCK * PAGES, "tiers": [tier]}
    async with await StorageManager.from_config(config, metrics_registry=metrics, clock=lambda: now[0]) as manager:
        kv = await _registered(manager)
        keys = chunk_keys(list(range(BLOCK * PAGES * 6)), kv.namespace, BLOCK * PAGES)
        values = [kv_value(10 + i) for i in range(6)]
        assert len(values[0]) * 6 > 2 * slice_bytes, "the batch must take several slices"
        await manager.put(list(zip(keys[:4], values[:4], strict=True)))
        before = [bytes(o) for o in await _read_into(manager, keys[:4], values[:4])]

        remote.freeze()
        try:
            outs = [bytearray(len(v)) for v in values[:4]]
            assert await manager.get_into(keys[:4], outs) == [False] * 4
            assert outs == [bytearray(len(v)) for v in values[:4]], "a miss wrote into the caller's buffers"
            assert await manager.fetch(keys[:4], [len(v) for v in values[:4]]) == [None] * 4
            await manager.put(list(zip(keys[4:], values[4:], strict=True)))
            assert (metrics.get_sample_value("lmtier_tier_deadline_misses_total", {"tier": tier["name"], "op": "get"})
                    or 0) >= 1
        finally:
            remote.thaw()
        assert await manager.settle(120)
        now[0] += 120
        assert await manager.lookup(keys[:4]) == 4  # the breaker's probe: the circuit closes
        assert [bytes(o) for o in await _read_into(manager, keys[:4], values[:4])] == before


async def _read_into(manager: StorageManager, keys: list[Any], values: list[bytes]) -> list[bytearray]:
    outs = [bytearray(len(v)) for v in values]
    assert await manager.get_into(keys, outs) == [True] * len(keys)
    return outs
