"""KVCacheEngine on CPU tensors: chunk/block alignment, tails, partial loads, layer-wise loads, faults."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry

from lmtier.engine import KVCacheEngine
from lmtier.errors import ConfigError, InvalidArgumentError
from lmtier.keys import KVNamespace, chunk_keys

LAYERS, BLOCKS, HEADS, BLK, HEAD = 3, 64, 2, 4, 8
CHUNK = 16  # 4 blocks per chunk
PAGE_BYTES = HEADS * BLK * 2 * HEAD * 2  # bf16


def namespace(chunk: int = CHUNK, **kw: Any) -> KVNamespace:
    fields: dict[str, Any] = dict(model="unit", kv_layout="vllm_blocks_first", dtype="bfloat16",
                                  num_layers=LAYERS, block_size=BLK, num_kv_heads=HEADS, head_size=HEAD,
                                  page_bytes=PAGE_BYTES, chunk_tokens=chunk)
    fields.update(kw)
    return KVNamespace(**fields)


def make_cache(fill: bool = True, seed: int = 0) -> list[torch.Tensor]:
    """vLLM's CPU layout: every layer a (N, H, blk, 2D) view of one buffer."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.zeros(LAYERS, BLOCKS, HEADS, BLK, 2 * HEAD, dtype=torch.bfloat16)
    if fill:
        buf.copy_(torch.randn(buf.shape, generator=g).to(torch.bfloat16))
    return list(buf.unbind(0))


def tokens(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 30000, (n,), generator=g).tolist()


def config(tmp_path: Path, *, disk: bool = False, chunk: int = CHUNK) -> dict[str, Any]:
    tiers: list[dict[str, Any]] = [{"name": "hot", "backend": "cpu", "options": {"max_bytes": 8 << 20}}]
    if disk:
        tiers.append({"name": "local", "backend": "disk", "options": {"root": str(tmp_path / "disk")}})
    return {"chunk_tokens": chunk, "tiers": tiers, "host_pool_bytes": 4 << 20}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[KVCacheEngine]:
    with KVCacheEngine(config(tmp_path), namespace(), metrics_registry=CollectorRegistry()) as eng:
        yield eng


def blocks_equal(a: list[torch.Tensor], ablocks: list[int], b: list[torch.Tensor], bblocks: list[int]) -> bool:
    return all(torch.equal(x[ablocks], y[bblocks]) for x, y in zip(a, b, strict=True))


def test_store_then_retrieve_moves_every_page_of_every_layer(engine: KVCacheEngine) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(40)  # 2 whole chunks (32 tokens) + a 2-block tail (8 tokens)
    src_blocks, dst_blocks = list(range(10, 20)), list(range(30, 40))
    assert engine.store(toks, src, src_blocks, request_id="r1").wait() == 40
    assert engine.lookup(toks) == 40
    assert engine.retrieve(toks, dst, dst_blocks) == 40
    assert blocks_equal(src, src_blocks, dst, dst_blocks)
    untouched = [b for b in range(BLOCKS) if b not in dst_blocks]
    assert all(int(layer[untouched].abs().sum()) == 0 for layer in dst)


def test_partial_blocks_and_short_prompts_are_never_stored(engine: KVCacheEngine) -> None:
    src = make_cache()
    assert engine.store(tokens(3), src, [0]).wait() == 0  # shorter than one block
    assert engine.lookup(tokens(3)) == 0
    toks = tokens(23)  # 1 chunk + 1 whole block + 3 tokens of a partial block
    assert engine.store(toks, src, list(range(6))).wait() == 20
    assert engine.lookup(toks) == 20


def test_without_tails_only_whole_chunks_count(tmp_path: Path) -> None:
    with KVCacheEngine(config(tmp_path), namespace(), save_tail=False,
                       metrics_registry=CollectorRegistry()) as eng:
        toks = tokens(40)
        assert eng.store(toks, make_cache(), list(range(10))).wait() == 32
        assert eng.lookup(toks) == 32


def test_a_shared_prefix_hits_its_chunks_and_a_stored_tail(engine: KVCacheEngine) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    first = tokens(24)  # chunk 0 + a 2-block tail
    engine.store(first, src, list(range(6))).wait()
    longer = [*first, *tokens(30, seed=9)]  # chunk 1 of `longer` is new, but the tail of `first` holds 8 of it
    assert engine.lookup(longer) == 24
    other = [*first[:16], *tokens(20, seed=5)]  # diverges right after chunk 0
    assert engine.lookup(other) == 16
    # the tail is found through its own key although `longer` has the whole chunk 1
    assert engine.retrieve(longer, dst, list(range(40, 54)), end=24) == 24
    assert blocks_equal(src, list(range(6)), dst, list(range(40, 46)))


def test_a_prefix_of_a_chunk_loads_only_the_blocks_asked_for(engine: KVCacheEngine) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(32)
    engine.store(toks, src, list(range(8))).wait()
    # vLLM loads at most len-1 tokens: 28 = chunk 0 + 3 blocks of chunk 1; blocks 0-1 are local hits
    dst_blocks = list(range(20, 28))
    assert engine.retrieve(toks, dst, dst_blocks, start=8, end=28) == 20
    assert blocks_equal(src, list(range(2, 7)), dst, dst_blocks[2:7])
    for b in (20, 21, 27):  # before start, and past end
        assert all(int(layer[b].abs().sum()) == 0 for layer in dst)


def test_a_capped_lookup_finds_the_leading_blocks_of_a_chunk_stored_whole(engine: KVCacheEngine) -> None:
    src = make_cache()
    toks = tokens(32)  # 2 whole chunks, no tail
    engine.store(toks, src, list(range(8))).wait()
    # a caller that computes the last token itself: the whole prompt, capped at 31 -> 28 (7 blocks)
    assert engine.lookup(toks, limit=31) == 28
    assert engine.lookup(toks[:31]) == 16  # a shortened prompt names only chunk 1's tail keys
    assert engine.lookup(toks, limit=3) == 0
    assert engine.lookup(toks + tokens(40, seed=9), limit=31) == 28
    with pytest.raises(InvalidArgumentError):
        engine.lookup(toks, limit=-1)


def test_layer_wise_retrieval_loads_one_layer_at_a_time(engine: KVCacheEngine) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(32)
    engine.store(toks, src, list(range(8))).wait()
    with engine.start_retrieve(toks, dst, list(range(8, 16))) as handle:
        assert handle.wait_layer(0) == 32
        assert torch.equal(dst[0][8:16], src[0][0:8])
        assert int(dst[1][8:16].abs().sum()) == 0  # not yet
        handle.wait_layer(2)  # also loads the skipped layer 1
        assert blocks_equal(src, list(range(8)), dst, list(range(8, 16)))
        assert handle.wait() == 32


def test_a_missing_chunk_ends_the_loaded_prefix(engine: KVCacheEngine) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(48)
    engine.store(toks, src, list(range(12))).wait()
    middle = chunk_keys(toks, engine.namespace, CHUNK)[1]
    engine.kvstore.delete([middle])
    assert engine.lookup(toks) == 16
    # a caller that trusted an older lookup asks for everything: only chunk 0 arrives
    assert engine.retrieve(toks, dst, list(range(20, 32))) == 16
    assert blocks_equal(src, list(range(4)), dst, list(range(20, 24)))
    assert all(int(layer[24:32].abs().sum()) == 0 for layer in dst)


def test_a_value_of_the_wrong_size_is_a_miss_and_is_deleted(engine: KVCacheEngine) -> None:
    toks = tokens(16)
    key = chunk_keys(toks, engine.namespace, CHUNK)[0]
    engine.kvstore.put([(key, b"\x00" * 100)]).result()
    assert engine.retrieve(toks, make_cache(fill=False), list(range(4))) == 0
    engine.flush()
    assert engine.lookup(toks) == 0


def test_corrupt_disk_chunks_are_misses_and_outputs_never_wrong(tmp_path: Path) -> None:
    src = make_cache()
    toks = tokens(32)
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry()) as eng:
        eng.store(toks, src, list(range(8))).wait()
    files = sorted(p for p in (tmp_path / "disk").rglob("*") if p.is_file() and "-" in p.name)
    assert len(files) == 2
    raw = bytearray(files[1].read_bytes())
    raw[-1] ^= 0xFF
    files[1].write_bytes(bytes(raw))  # which file is chunk 1 does not matter: one of two is bad
    dst = make_cache(fill=False)
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry()) as eng:
        loaded = eng.retrieve(toks, dst, list(range(8, 16)))
        assert loaded in (0, 16)
        assert blocks_equal(src, list(range(loaded // BLK)), dst, list(range(8, 8 + loaded // BLK)))
        assert all(int(layer[8 + loaded // BLK:16].abs().sum()) == 0 for layer in dst)
        assert eng.manager.stats()["local"]["corrupt"] == 1


def test_a_fresh_engine_finds_chunks_on_disk(tmp_path: Path) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(40)
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry()) as eng:
        eng.store(toks, src, list(range(10))).wait()
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry()) as eng:
        assert eng.lookup(toks) == 40
        assert eng.retrieve(toks, dst, list(range(50, 60))) == 40
    assert blocks_equal(src, list(range(10)), dst, list(range(50, 60)))


def test_another_namespace_never_sees_the_chunks(tmp_path: Path) -> None:
    toks = tokens(32)
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry()) as eng:
        eng.store(toks, make_cache(), list(range(8))).wait()
    with KVCacheEngine(config(tmp_path, disk=True), namespace(model="other"),
                       metrics_registry=CollectorRegistry()) as eng:
        assert eng.lookup(toks) == 0


def test_a_derived_namespace_keeps_its_chunks_apart_in_one_engine(engine: KVCacheEngine) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(40)
    tenant_a = engine.derive_namespace(("cache_salt", "a"))
    tenant_b = engine.derive_namespace(("cache_salt", "b"))
    assert len({engine.namespace, tenant_a, tenant_b}) == 3
    assert engine.derive_namespace() == engine.namespace
    assert engine.store(toks, src, list(range(10)), namespace=tenant_a).wait() == 40
    assert [engine.lookup(toks, namespace=ns) for ns in (tenant_a, tenant_b, None)] == [40, 0, 0]
    assert engine.retrieve(toks, dst, list(range(20, 30)), namespace=tenant_b) == 0
    assert engine.retrieve(toks, dst, list(range(20, 30)), namespace=tenant_a) == 40
    assert blocks_equal(src, list(range(10)), dst, list(range(20, 30)))
    with pytest.raises(InvalidArgumentError, match="16 lowercase hex"):
        engine.lookup(toks, namespace="tenant-a")


def test_stores_of_present_chunks_are_skipped_and_logged(engine: KVCacheEngine,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    toks = tokens(32)
    caplog.set_level(logging.INFO, logger="lmtier.engine")
    assert engine.store(toks, make_cache(), list(range(8)), request_id="a").wait() == 32
    assert engine.store(toks, make_cache(), list(range(8)), request_id="b").wait() == 0
    engine.lookup(toks, request_id="c")
    text = caplog.text
    assert "Stored 32 of 32 tokens for request a" in text
    assert "Stored 0 of 32 tokens for request b (32 already present)" in text
    assert "Request c: total 32 tokens, hit 32" in text


def test_hit_metrics_count_recorded_lookups(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    with KVCacheEngine(config(tmp_path), namespace(), metrics_registry=reg) as eng:
        toks = tokens(32)
        eng.store(toks[:16], make_cache(), list(range(4))).wait()
        assert eng.lookup(toks) == 16
        assert eng.lookup(toks, record=False) == 16
        eng.retrieve(toks, make_cache(fill=False), list(range(8)), end=16)
    assert reg.get_sample_value("lmtier_requested_tokens_total") == 32
    assert reg.get_sample_value("lmtier_hit_tokens_total") == 16
    assert reg.get_sample_value("lmtier_hit_ratio") == 0.5
    assert reg.get_sample_value("lmtier_loaded_tokens_total") == 16
    assert reg.get_sample_value("lmtier_stored_tokens_total") == 16


def test_bad_geometry_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple"):
        KVCacheEngine(config(tmp_path, chunk=18), namespace(chunk=18))
    with pytest.raises(ConfigError, match="chunk_tokens"):
        KVCacheEngine(config(tmp_path, chunk=32), namespace(chunk=16))
    with (KVCacheEngine(config(tmp_path), namespace(page_bytes=PAGE_BYTES * 2),
                        metrics_registry=CollectorRegistry()) as eng,
          pytest.raises(InvalidArgumentError, match="namespace")):
        eng.store(tokens(16), make_cache(), list(range(4)))
    with KVCacheEngine(config(tmp_path), namespace(), metrics_registry=CollectorRegistry()) as eng:
        with pytest.raises(InvalidArgumentError, match="block ids"):
            eng.retrieve(tokens(16), make_cache(), [0])
        with pytest.raises(InvalidArgumentError, match="multiples"):
            eng.retrieve(tokens(16), make_cache(), list(range(4)), start=2)


def test_a_closed_engine_refuses_work(tmp_path: Path) -> None:
    eng = KVCacheEngine(config(tmp_path), namespace(), metrics_registry=CollectorRegistry())
    eng.close()
    eng.close()
    with pytest.raises(Exception, match="closed"):
        eng.lookup(tokens(16))


# -- the critical path never waits on a tier; one copy per hit ------------------------------------
def _stuck_config(tmp_path: Path) -> dict[str, Any]:
    cfg = config(tmp_path)
    cfg["tiers"].append({"name": "cold", "backend": "stuck_cpu", "options": {"pinned": False},
                         "timeout_s": {"lookup": 0.05, "get": 0.05, "put": 0.05}})
    return cfg


@pytest.fixture
def stuck_registry() -> Any:
    from lmtier.registry import BackendRegistry, BackendSpec

    reg = BackendRegistry.discover()
    reg.register(BackendSpec("stuck_cpu", "tests.unit.test_deadlines:_stuck_cpu", "lmtier_backends.cpu.config:CpuConfig"))
    return reg


def test_store_returns_without_asking_a_stuck_tier_and_writes_it_behind(tmp_path: Path, stuck_registry: Any) -> None:
    from tests.unit.test_deadlines import STUCK

    reg = CollectorRegistry()
    with KVCacheEngine(_stuck_config(tmp_path), namespace(), registry=stuck_registry, metrics_registry=reg) as eng:
        stuck = STUCK["cpu"]
        stuck.hold("contains", "thread")
        stuck.hold("put", "thread")
        toks = tokens(32)
        handle = eng.store(toks, make_cache(), list(range(8)))
        assert handle.copied.done()  # returned with the pages copied; no tier was asked yet
        assert handle.wait() == 32  # the hot tier has them; the stuck tier's check/write is skipped
        assert reg.get_sample_value("lmtier_tier_deadline_misses_total", {"tier": "cold", "op": "contains"}) == 1
        assert eng.lookup(toks) == 32  # every chunk hot: the open circuit is not even consulted
        stuck.free()


def test_a_store_of_chunks_the_hot_tier_holds_copies_nothing(engine: KVCacheEngine) -> None:
    toks = tokens(32)
    engine.store(toks, make_cache(), list(range(8))).wait()
    handle = engine.store(toks, make_cache(seed=7), list(range(8)))  # other bytes: must not be taken
    assert handle.wait() == 0
    dst = make_cache(fill=False)
    assert engine.retrieve(toks, dst, list(range(8))) == 32
    assert blocks_equal(make_cache(), list(range(8)), dst, list(range(8)))


def test_a_colder_hit_is_loaded_in_place_and_promoted(tmp_path: Path) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(32)
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry()) as eng:
        eng.store(toks, src, list(range(8))).wait()
    reg = CollectorRegistry()
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=reg) as eng:
        with eng.start_retrieve(toks, dst, list(range(8, 16))) as handle:
            assert handle.wait() == 32
            assert handle.staged_chunks == 0  # whole chunks: the onload read the fetched memory itself
        assert reg.get_sample_value("lmtier_tier_promotions_total", {"tier": "hot"}) == 2
        assert reg.get_sample_value("lmtier_tier_hits_total", {"tier": "local"}) == 2
        assert eng.retrieve(toks, make_cache(fill=False), list(range(8))) == 32
        assert reg.get_sample_value("lmtier_tier_hits_total", {"tier": "hot"}) == 2  # now from RAM
    assert blocks_equal(src, list(range(8)), dst, list(range(8, 16)))


def test_a_part_of_a_chunk_is_staged_once(engine: KVCacheEngine) -> None:
    toks = tokens(32)
    engine.store(toks, make_cache(), list(range(8))).wait()
    with engine.start_retrieve(toks, make_cache(fill=False), list(range(8)), start=8, end=28) as handle:
        assert handle.wait() == 20
        assert handle.staged_chunks == 2  # chunk 0 from its third page, chunk 1 up to its third


def test_a_handle_closed_before_any_wait_returns_every_chunk(engine: KVCacheEngine) -> None:
    toks = tokens(32)
    engine.store(toks, make_cache(), list(range(8))).wait()
    handle = engine.start_retrieve(toks, make_cache(fill=False), list(range(8)))
    handle.close()  # the autouse leak check fails the test if a lent chunk is not returned
    assert handle.wait() == 0
    assert engine.retrieve(toks, make_cache(fill=False), list(range(8))) == 32


def test_an_engine_over_a_store_it_did_not_open_leaves_it_open(tmp_path: Path) -> None:
    from lmtier.store import LocalStore

    with LocalStore.open(config(tmp_path), metrics_registry=CollectorRegistry()) as store:
        toks = tokens(32)
        with KVCacheEngine(None, namespace(), kvstore=store) as eng:
            eng.store(toks, make_cache(), list(range(8))).wait()
        with KVCacheEngine(None, namespace(), kvstore=store) as eng:
            assert eng.lookup(toks) == 32


def test_locate_says_which_tier_holds_each_part_of_the_hit(tmp_path: Path) -> None:
    toks = tokens(40)  # 2 chunks + a 2-block tail
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry()) as eng:
        eng.store(toks, make_cache(), list(range(10))).wait()
    with KVCacheEngine(config(tmp_path, disk=True), namespace(), metrics_registry=CollectorRegistry()) as eng:
        assert eng.retrieve(toks, make_cache(fill=False), list(range(4)), end=16) == 16  # chunk 0 -> RAM
        found = eng.locate_async(toks).result()
        assert found.tokens == 40
        assert found.runs == (("hot", 16), ("local", 24))  # chunk 1 and the tail on disk
        assert eng.locate_async(toks, limit=20).result().runs == (("hot", 16), ("local", 4))
        assert eng.locate_async(tokens(8, seed=4)).result().runs == ()
