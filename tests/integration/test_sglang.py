"""lmtier as SGLang's HiCache L3 storage, against SGLang 0.5.23's real classes on CPU.

SGLang's backend factory builds the backend from the extra-config JSON a user passes; SGLang's
own host pools (MHA and MLA, every layout they offer) are the memory the zero-copy v1 calls read
and write; keys come from SGLang's page hashing; SGLang's own HiCacheController, on CPU, drives a
backup and a prefetch through its storage threads. Not run here: the SGLang engine end to end
(its scheduler and model runner, and the GPU<->host kernels, need CUDA and sgl-kernel; see
docs/sglang.md).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry

from lmtier.errors import ConfigError, InvalidArgumentError, NotSupportedError
from tests.integration.sglang_env import (
    EXTRA,
    cache_controller,
    fill_random,
    mha_pool,
    mla_pool,
    storage_config,
)

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(300)]

#: The extra config of the issue, as a user passes it on SGLang's command line.
ISSUE_JSON = ('{"backend_name": "lmtier", "module_path": "lmtier.integrations.sglang", '
              '"class_name": "LMTierHiCacheStorage", "interface_v1": 1}')
MHA_LAYOUTS = ["page_first", "page_first_direct", "page_head", "layer_first"]
MLA_LAYOUTS = ["page_first", "page_first_direct", "layer_first"]


@pytest.fixture(autouse=True, scope="module")
def sglang_installed() -> None:
    # imported when the first test runs, not at collection: importing sglang patches transformers
    # process-wide, and tests/integration/conftest.py runs these tests after every other one
    pytest.importorskip("sglang.srt.mem_cache.hicache_storage",
                        reason="needs SGLang: pip install --no-deps sglang==0.5.23 orjson IPython gguf")


def page_keys(tokens: list[int], page_size: int = 4) -> list[str]:
    """SGLang's own storage keys for ``tokens`` (chained SHA-256 per page)."""
    from sglang.srt.mem_cache.utils import get_hash_str

    keys = get_hash_str(tokens, None, page_size=page_size)
    assert isinstance(keys, list)
    return keys


def pages_of(pool: Any, indices: torch.Tensor) -> list[torch.Tensor]:
    """Each page's bytes, through SGLang's own accessor (independent of get_page_buffer_meta)."""
    ps = pool.page_size
    return [pool.get_data_page(int(indices[i]), flat=True).view(torch.uint8).clone()
            for i in range(0, len(indices), ps)]


def write_config(path: Path, *tiers: dict[str, Any]) -> Path:
    tiers = tiers or ({"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20}},)
    path.write_text(yaml.safe_dump({"chunk_tokens": 256, "tiers": list(tiers)}))
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "lmtier.yaml")


def make_backend(config: Path, extra: dict[str, Any] | None = None, **fields: Any) -> Any:
    from lmtier.integrations.sglang import LMTierHiCacheStorage

    return LMTierHiCacheStorage(storage_config({**EXTRA, "lmtier_config": str(config), **(extra or {})},
                                               **fields), {})


@pytest.fixture
def backend(config_file: Path) -> Iterator[Any]:
    b = make_backend(config_file)
    yield b
    b.close()


def shared_store(config: Path) -> Any:
    """One store for several backends (ranks of one process in these tests)."""
    from lmtier.config import load_config
    from lmtier.integrations.sglang import _open_store

    return _open_store(load_config(config), storage_config())


# -- SGLang's factory and bad input -----------------------------------------------------------
def test_sglang_factory_builds_the_backend_from_the_issue_json(config_file: Path) -> None:
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    from lmtier.integrations.sglang import LMTierHiCacheStorage

    extra = {**json.loads(ISSUE_JSON), "lmtier_config": str(config_file)}
    backend = StorageBackendFactory.create_backend("dynamic", storage_config(extra), None)
    try:
        assert isinstance(backend, LMTierHiCacheStorage)
        assert backend.interface_v1 is True
        pool = mha_pool()
        backend.register_mem_pool_host(pool)
        indices = pool.alloc(8)
        fill_random(pool, 1)
        keys = page_keys(list(range(8)))
        assert backend.batch_set_v1(keys, indices) == [True, True]
        backend.store.flush()
        assert backend.batch_exists(keys) == 2
    finally:
        backend.close()


def test_lmtier_config_env_is_the_fallback(config_file: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    monkeypatch.setenv("LMTIER_CONFIG", str(config_file))
    with caplog.at_level(logging.INFO, logger="lmtier.sglang"):
        backend = StorageBackendFactory.create_backend("dynamic", storage_config(json.loads(ISSUE_JSON)), None)
    backend.close()
    assert f"config LMTIER_CONFIG={config_file}" in caplog.text


def test_an_unknown_extra_config_key_fails_startup_naming_it(config_file: Path) -> None:
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    extra = {**json.loads(ISSUE_JSON), "lmtier_confg": str(config_file)}
    with pytest.raises(ConfigError) as err:
        StorageBackendFactory.create_backend("dynamic", storage_config(extra), None)
    msg = str(err.value)
    assert "'lmtier_confg'" in msg and "lmtier_config" in msg and "lmtier_namespace_salt" in msg


def test_a_missing_config_file_fails_startup_naming_the_key(tmp_path: Path) -> None:
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

    missing = tmp_path / "nope.yaml"
    extra = {**json.loads(ISSUE_JSON), "lmtier_config": str(missing)}
    with pytest.raises(ConfigError, match=rf"lmtier_config={missing}.*cannot read"):
        StorageBackendFactory.create_backend("dynamic", storage_config(extra), None)


def test_an_invalid_config_file_fails_startup_naming_the_tier_key(tmp_path: Path) -> None:
    bad = write_config(tmp_path / "bad.yaml", {"name": "hot", "backend": "cpu", "write": "sometimes"})
    with pytest.raises(ConfigError, match=r"lmtier_config=.*tiers\.0\.write|tiers\[0\]\.write"):
        make_backend(bad)


def test_head_splitting_across_tp_sizes_is_refused(config_file: Path) -> None:
    with pytest.raises(NotSupportedError, match="tp_lcm_size"):
        make_backend(config_file, tp_lcm_size=4, should_split_heads=True)


def test_a_layout_sglang_cannot_describe_for_zero_copy_fails_at_registration(backend: Any) -> None:
    pool = mha_pool("page_unified")
    with pytest.raises(NotSupportedError, match=r"page_unified.*--hicache-mem-layout page_first"):
        backend.register_mem_pool_host(pool)


def test_a_hybrid_side_pool_fails_at_registration(backend: Any) -> None:
    pool = mha_pool()
    backend.register_mem_pool_host(pool)
    backend.register_mem_host_pool_v2(pool, "kv")  # the KV pool under its v2 name is fine
    with pytest.raises(NotSupportedError, match="'mamba' pool"):
        backend.register_mem_host_pool_v2(mla_pool(), "mamba")


def test_v1_calls_before_a_pool_is_registered_are_invalid(backend: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="registered host pool"):
        backend.batch_get_v1(page_keys(list(range(4))), torch.arange(4))


# -- SGLang's own cache controller --------------------------------------------------------------
def test_sglangs_cache_controller_backs_up_and_prefetches_pages_through_lmtier(
        config_file: Path, tmp_path: Path) -> None:
    """SGLang's HiCacheController threads make the calls: backup, hit query, transfer, acks."""
    from lmtier.integrations.sglang import LMTierHiCacheStorage

    pool = mha_pool()
    extra = {**json.loads(ISSUE_JSON), "lmtier_config": str(config_file)}
    with cache_controller(pool, extra, tmp_path) as controller:
        assert isinstance(controller.storage_backend, LMTierHiCacheStorage)
        assert controller.page_get_func == controller._page_get_zero_copy  # "interface_v1": 1
        tokens = list(range(1000, 1024))
        src = pool.alloc(len(tokens))
        fill_random(pool, 5)
        expected = pages_of(pool, src)
        # backup thread: batch_set_v1 of the pages, keyed by SGLang's own page hashes
        controller.write_storage(src, tokens, hash_value=page_keys(tokens))
        assert controller.ack_backup_queue.get(timeout=60).completed_tokens == 24
        # prefetch thread: batch_exists; then, as the scheduler does, host slots for the hit
        op = controller.prefetch("req-1", tokens)
        assert controller.prefetch_hit_queue.get(timeout=60) is op
        assert op.storage_hit_count == 24
        pool.kv_buffer.zero_()
        op.host_indices = controller.alloc_prefetch_host_buffers(op, op.storage_hit_count)
        controller.prefetch_buffer.put(op)  # transfer thread: batch_get_v1, then the sync thread's acks
        acks = [controller.ack_prefetch_queue.get(timeout=60)]
        while not acks[-1].completed_req:
            acks.append(controller.ack_prefetch_queue.get(timeout=60))
        assert [a.completed_tokens for a in acks[:-1]] == [24]
        got = pages_of(pool, op.host_indices)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


# -- zero-copy v1 round trips through SGLang's host pools --------------------------------------
@pytest.mark.parametrize("kind,layout", [*(("mha", lay) for lay in MHA_LAYOUTS),
                                         *(("mla", lay) for lay in MLA_LAYOUTS)])
def test_v1_round_trip_restores_pages_in_place(config_file: Path, kind: str, layout: str) -> None:
    backend = make_backend(config_file, is_mla_model=kind == "mla")
    try:
        pool = (mha_pool if kind == "mha" else mla_pool)(layout)
        backend.register_mem_pool_host(pool)
        written = pool.alloc(5 * pool.page_size)
        fill_random(pool, 7)
        expected = pages_of(pool, written)
        keys = page_keys(list(range(100, 120)))
        assert backend.batch_set_v1(keys, written) == [True] * 5
        backend.store.flush()
        # read into other slots of a wiped pool: every byte must come from lmtier
        pool.kv_buffer.zero_()
        target = pool.alloc(5 * pool.page_size)
        assert not set(target.tolist()) & set(written.tolist())
        assert backend.batch_exists(keys) == 5
        assert backend.batch_get_v1(keys, target) == [True] * 5
        got = pages_of(pool, target)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
        assert all(not p.any() for p in pages_of(pool, written))  # the source slots stayed wiped
    finally:
        backend.close()


def fill_kv(pool: Any, seed: int) -> None:
    """Fill the host pool with KV-like floats (per-channel magnitudes): what a lossy codec quantizes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(pool.kv_buffer.shape, generator=gen) * torch.linspace(0.2, 3.0, pool.kv_buffer.shape[-1])
    pool.kv_buffer.copy_(x.to(pool.kv_buffer.dtype))


@pytest.mark.parametrize("kind,codec,bound", [("mha", "fp8", 0.04), ("mha", "int8", 0.02), ("mla", "fp8", 0.04)])
def test_a_lossy_tier_quantizes_pages_under_a_namespace_naming_its_codec(tmp_path: Path, kind: str, codec: str,
                                                                         bound: float) -> None:
    """A disk tier with ``codec: fp8`` (int8) stores SGLang's pages quantized (its codec's id in each
    file's header, about half the bytes) under a namespace that names the codec, so a deployment
    without it never shares a key with them; the pages come back within the codec's error."""
    from lmtier.framing import READABLE_CODECS, decode_header

    disk = {"name": "disk", "backend": "disk", "options": {"root": str(tmp_path / "disk"), "max_bytes": 64 << 20}}
    lossy = make_backend(write_config(tmp_path / "lossy.yaml", {**disk, "codec": codec}), is_mla_model=kind == "mla")
    exact = make_backend(write_config(tmp_path / "exact.yaml", {**disk, "options": {
        **disk["options"], "root": str(tmp_path / "disk2")}}), is_mla_model=kind == "mla")
    try:
        pool = mha_pool(head_dim=64) if kind == "mha" else mla_pool(rank=64, rope=32)
        lossy.register_mem_pool_host(pool)
        exact.register_mem_pool_host(pool)
        assert lossy.namespace != exact.namespace
        written = pool.alloc(4 * pool.page_size)
        fill_kv(pool, 11)
        expected = [p.view(pool.dtype).float() for p in pages_of(pool, written)]
        keys = page_keys(list(range(300, 316)))
        assert lossy.batch_set_v1(keys, written) == [True] * 4
        lossy.store.flush()
        files = sorted((tmp_path / "disk").rglob("*-*"))
        assert len(files) == 4
        page_bytes = expected[0].numel() * pool.dtype.itemsize
        for f in files:
            data = f.read_bytes()
            ckey = next(k for k in lossy._chunk_keys(keys, lossy.namespace) if str(k) == f.name)
            head = decode_header(ckey, data, codecs=READABLE_CODECS)
            assert head.codec == {"fp8": 3, "int8": 4}[codec] and head.raw_length == page_bytes
            assert head.payload_length < 0.56 * page_bytes
        pool.kv_buffer.zero_()
        target = pool.alloc(4 * pool.page_size)
        assert exact.batch_exists(keys) == 0  # another namespace: never served lossy pages
        assert lossy.batch_exists(keys) == 4
        assert lossy.batch_get_v1(keys, target) == [True] * 4
        for got, want in zip(pages_of(pool, target), expected, strict=True):
            err = float((got.view(pool.dtype).float() - want).norm() / want.norm())
            assert 0 < err < bound
    finally:
        lossy.close()
        exact.close()


def test_a_lossy_tier_quantizes_plain_interface_pages_too(tmp_path: Path) -> None:
    """``interface_v1`` 0: SGLang's flat data pages (batch_set / batch_get of CPU tensors) are
    quantized by an fp8 tier as well (about 0.55x the bytes) and read back within its error."""
    config = write_config(tmp_path / "lossy.yaml", {"name": "disk", "backend": "disk", "codec": "fp8", "options": {
        "root": str(tmp_path / "disk"), "max_bytes": 64 << 20}})
    backend = make_backend(config, {"interface_v1": 0})
    try:
        pool = mha_pool(head_dim=64)
        backend.register_mem_pool_host(pool)
        fill_kv(pool, 12)
        idx = pool.alloc(8)
        values = [pool.get_data_page(int(idx[i]), flat=True).clone() for i in (0, 4)]
        keys = page_keys(list(range(8)))
        assert backend.batch_set(keys, values)
        backend.store.flush()
        page_bytes = values[0].numel() * values[0].element_size()
        sizes = [f.stat().st_size for f in (tmp_path / "disk").rglob("*-*")]
        assert len(sizes) == 2 and all(size < 0.56 * page_bytes + 64 for size in sizes)
        got = backend.batch_get(keys, [torch.empty_like(v) for v in values])
        for g, v in zip(got, values, strict=True):
            assert g is not None and 0 < float((g.float() - v.float()).norm() / v.float().norm()) < 0.04
    finally:
        backend.close()


def test_a_lossy_tier_refuses_kv_it_cannot_quantize_when_the_pool_registers(tmp_path: Path) -> None:
    from lmtier.errors import ConfigError

    config = write_config(tmp_path / "lossy.yaml", {"name": "disk", "backend": "disk", "codec": "fp8", "options": {
        "root": str(tmp_path / "disk"), "max_bytes": 64 << 20}})
    backend = make_backend(config)
    try:
        with pytest.raises(ConfigError, match=r"tiers\[0\] \(disk\)\.codec: codec fp8 quantizes float KV.*'uint8'"):
            backend.register_mem_pool_host(mha_pool(dtype=torch.uint8))
    finally:
        backend.close()


def test_v1_get_reports_each_missing_page(backend: Any) -> None:
    pool = mha_pool()
    backend.register_mem_pool_host(pool)
    idx = pool.alloc(12)
    fill_random(pool, 3)
    keys = page_keys(list(range(12)))
    assert backend.batch_set_v1([keys[0], keys[2]], torch.cat([idx[0:4], idx[8:12]])) == [True, True]
    backend.store.flush()
    assert backend.batch_get_v1(keys, idx) == [True, False, True]


def test_batch_exists_counts_the_leading_stored_pages(backend: Any) -> None:
    pool = mha_pool()
    backend.register_mem_pool_host(pool)
    idx = pool.alloc(20)
    fill_random(pool, 5)
    keys = page_keys(list(range(20)))
    stored = [0, 1, 3, 4]
    rows = torch.cat([idx[i * 4:(i + 1) * 4] for i in stored])
    backend.batch_set_v1([keys[i] for i in stored], rows)
    backend.store.flush()
    assert backend.batch_exists(keys) == 2
    assert backend.batch_exists(keys[3:]) == 2
    assert backend.batch_exists(keys[2:]) == 0
    assert backend.exists(keys[4]) and not backend.exists(keys[2])
    assert backend.batch_exists([]) == 0


def test_v1_and_flat_pages_and_layouts_are_kept_apart(config_file: Path) -> None:
    store = shared_store(config_file)
    try:
        from lmtier.integrations.sglang import LMTierHiCacheStorage

        def backend(layout: str, **extra: Any) -> Any:
            b = LMTierHiCacheStorage(storage_config({**EXTRA, **extra}), {}, store=store)
            b.register_mem_pool_host(mha_pool(layout))
            return b

        writer = backend("page_first")
        idx = writer.mem_pool_host.alloc(8)
        keys = page_keys(list(range(8)))
        writer.batch_set_v1(keys, idx)
        store.flush()
        assert writer.batch_exists(keys) == 2
        assert backend("page_head").batch_exists(keys) == 0  # other byte order
        assert backend("page_first", interface_v1=0).batch_exists(keys) == 0  # flat interface
        assert backend("page_first", lmtier_namespace_salt="v2-weights").batch_exists(keys) == 0
    finally:
        store.close()


# -- ranks: TP shards apart, MLA shared with one writer -----------------------------------------
def test_tp_ranks_of_an_mha_model_never_see_each_others_pages(config_file: Path) -> None:
    from lmtier.integrations.sglang import LMTierHiCacheStorage

    store = shared_store(config_file)
    try:
        ranks = [LMTierHiCacheStorage(storage_config(tp_rank=r, tp_size=2), {}, store=store) for r in (0, 1)]
        for r in ranks:
            r.register_mem_pool_host(mha_pool())
        idx = ranks[0].mem_pool_host.alloc(8)
        keys = page_keys(list(range(8)))
        assert ranks[0].batch_set_v1(keys, idx) == [True, True]
        store.flush()
        assert ranks[0].batch_exists(keys) == 2
        assert ranks[1].batch_exists(keys) == 0
        assert ranks[0].namespace != ranks[1].namespace
    finally:
        store.close()


def test_mla_ranks_share_pages_and_only_the_writer_stores(config_file: Path) -> None:
    from lmtier.integrations.sglang import LMTierHiCacheStorage

    store = shared_store(config_file)
    try:
        ranks = [LMTierHiCacheStorage(storage_config(tp_rank=r, tp_size=2, is_mla_model=True), {}, store=store)
                 for r in (0, 1)]
        assert [r.is_writer for r in ranks] == [True, False]
        for r in ranks:
            r.register_mem_pool_host(mla_pool())
        reader_pool = ranks[1].mem_pool_host
        keys = page_keys(list(range(8)))
        idx = reader_pool.alloc(8)
        # the reader rank is asked to store (SGLang would not ask): it stores nothing
        assert ranks[1].batch_set_v1(keys, idx) == [True, True]
        store.flush()
        assert ranks[1].batch_exists(keys) == 0
        writer_pool = ranks[0].mem_pool_host
        widx = writer_pool.alloc(8)
        fill_random(writer_pool, 11)
        expected = pages_of(writer_pool, widx)
        assert ranks[0].batch_set_v1(keys, widx) == [True, True]
        store.flush()
        assert ranks[1].batch_exists(keys) == 2
        assert ranks[1].batch_get_v1(keys, idx) == [True, True]
        assert all(torch.equal(g, e) for g, e in zip(pages_of(reader_pool, idx), expected, strict=True))
    finally:
        store.close()


def test_each_rank_process_gets_its_own_disk_root(tmp_path: Path) -> None:
    disk = {"name": "local", "backend": "disk", "options": {"root": str(tmp_path / "kv"), "max_bytes": 1 << 26}}
    config = write_config(tmp_path / "disk.yaml", disk)
    ranks = [make_backend(config, tp_rank=r, tp_size=2) for r in (0, 1)]  # a disk root has one owner
    try:
        assert sorted(p.name for p in (tmp_path / "kv").iterdir()) == ["tp0", "tp1"]
    finally:
        for b in ranks:
            b.close()


# -- plain interface ---------------------------------------------------------------------------
def test_plain_batch_set_and_get_with_cpu_tensors(config_file: Path) -> None:
    backend = make_backend(config_file, extra={"interface_v1": 0})
    try:
        pool = mha_pool()
        backend.register_mem_pool_host(pool)
        idx = pool.alloc(8)
        fill_random(pool, 9)
        keys = page_keys(list(range(8)))
        pages = [pool.get_data_page(int(i)) for i in idx[::4]]  # SGLang's generic path hands these
        assert backend.batch_set(keys, pages) is True
        backend.store.flush()
        assert backend.batch_exists(keys) == 2
        targets = [pool.get_dummy_flat_data_page() for _ in keys]
        got = backend.batch_get(keys, targets)
        assert all(g is t for g, t in zip(got, targets, strict=True))
        assert all(torch.equal(g.view(torch.int16), p.view(torch.int16)) for g, p in zip(got, pages, strict=True))
        assert backend.get(keys[0]) is not None  # target from the registered pool
        assert backend.get("f" * 64, pool.get_dummy_flat_data_page()) is None
        assert backend.set(keys[0], pages[0]) is True and backend.exists(keys[0])
        wrong = torch.zeros(10, dtype=torch.uint8)
        assert backend.batch_get([keys[0]], [wrong]) == [None]  # a size mismatch is a miss
    finally:
        backend.close()


def test_plain_calls_reject_bad_values(backend: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="one value"):
        backend.batch_set(["a" * 64], None)
    with pytest.raises(InvalidArgumentError, match="strings"):
        backend.batch_exists([b"raw"])
    with pytest.raises(InvalidArgumentError, match="target_locations"):
        backend.batch_get(["a" * 64])


# -- metrics -----------------------------------------------------------------------------------
def test_get_stats_gives_sglang_storage_metrics_and_feeds_lmtier_metrics(config_file: Path) -> None:
    from lmtier.config import load_config
    from lmtier.integrations.sglang import LMTierHiCacheStorage, _open_store

    store = _open_store(load_config(config_file), storage_config(), metrics_registry=CollectorRegistry())
    try:
        backend = LMTierHiCacheStorage(storage_config(), {}, store=store)
        pool = mha_pool()
        backend.register_mem_pool_host(pool)
        idx = pool.alloc(12)
        keys = page_keys(list(range(12)))
        backend.batch_set_v1(keys[:2], idx[:8])
        store.flush()
        assert backend.batch_exists(keys) == 2
        assert backend.batch_get_v1(keys, idx) == [True, True, False]
        stats = backend.get_stats()
        from sglang.srt.observability.metrics_collector import StorageMetrics

        assert isinstance(stats, StorageMetrics)
        assert list(stats.backup_pgs) == [2] and list(stats.prefetch_pgs) == [2]
        assert stats.backup_bandwidth[0] > 0 and stats.prefetch_bandwidth[0] > 0
        assert list(backend.get_stats().prefetch_pgs) == []  # drained
        r = store.metrics.registry
        assert r.get_sample_value("lmtier_requested_tokens_total") == 12
        assert r.get_sample_value("lmtier_hit_tokens_total") == 8
        assert r.get_sample_value("lmtier_loaded_tokens_total") == 8
        assert r.get_sample_value("lmtier_stored_tokens_total") == 8
    finally:
        store.close()


@pytest.mark.server
def test_ranks_share_pages_through_lmtier_serve_and_return_every_lease(tmp_path: Path) -> None:
    from tests.server.serverproc import start_server, wait_until

    server = start_server(tmp_path)
    config = tmp_path / "client.yaml"
    config.write_text(f"server: {server.address}\n")
    ranks: list[Any] = []
    try:
        # two MLA ranks, each its own client of the node's server (as two SGLang processes are)
        ranks = [make_backend(config, tp_rank=r, tp_size=2, is_mla_model=True) for r in (0, 1)]
        assert all(type(r.store).__name__ == "ServerStore" for r in ranks)
        pools = [mla_pool(), mla_pool()]
        for rank, pool in zip(ranks, pools, strict=True):
            rank.register_mem_pool_host(pool)
        idx = pools[0].alloc(12)
        fill_random(pools[0], 13)
        expected = pages_of(pools[0], idx)
        keys = page_keys(list(range(300, 312)))
        assert ranks[0].batch_set_v1(keys, idx) == [True] * 3
        ranks[0].store.flush()
        target = pools[1].alloc(12)
        assert ranks[1].batch_exists(keys) == 3
        assert ranks[1].batch_get_v1(keys, target) == [True] * 3
        assert all(torch.equal(g, e) for g, e in zip(pages_of(pools[1], target), expected, strict=True))
        # releases travel to the server behind the calls: every lease and reservation comes back
        wait_until(lambda: (lambda st: st["leases"] == 0 and st["reservations"] == 0)(server.status()),
                   timeout=30, what="the server to see every lease and reservation returned")
        assert server.status()["clients"] == 2
    finally:
        for r in ranks:
            r.close()
        server.close()


@pytest.mark.server
def test_a_lossy_tier_of_lmtier_serve_quantizes_pages_of_two_ranks_alike(tmp_path: Path) -> None:
    """lmtier serve with an fp8 disk tier: each rank (a client) registers its page geometry with
    the server and keys under the namespace naming the server's codec; the server's disk tier
    holds the pages quantized, and a second MLA rank reads the writer's pages within fp8's error
    once the server's RAM tier forgot them."""
    from lmtier.framing import READABLE_CODECS, decode_header
    from tests.server.serverproc import start_server
    from tests.server.test_codecs_on_server import lossy_config

    server = start_server(tmp_path, config=lossy_config(tmp_path))
    config = tmp_path / "client.yaml"
    config.write_text(f"server: {server.address}\n")
    ranks: list[Any] = []
    try:
        ranks = [make_backend(config, tp_rank=r, tp_size=2, is_mla_model=True) for r in (0, 1)]
        pools = [mla_pool(rank=64, rope=32), mla_pool(rank=64, rope=32)]
        for rank, pool in zip(ranks, pools, strict=True):
            rank.register_mem_pool_host(pool)
        assert ranks[0].namespace == ranks[1].namespace
        plain = make_backend(write_config(tmp_path / "plain.yaml"), tp_rank=0, tp_size=2, is_mla_model=True)
        plain.register_mem_pool_host(mla_pool(rank=64, rope=32))
        assert plain.namespace != ranks[0].namespace  # a chain without the codec: another namespace
        plain.close()
        idx = pools[0].alloc(12)
        fill_kv(pools[0], 14)
        expected = [p.view(pools[0].dtype).float() for p in pages_of(pools[0], idx)]
        keys = page_keys(list(range(400, 412)))
        assert ranks[0].batch_set_v1(keys, idx) == [True] * 3
        ranks[0].store.flush()  # waits for the commit in flight, then the server's tier writes
        ckeys = ranks[0]._chunk_keys(keys, ranks[0].namespace)
        files = {f.name: f for f in (tmp_path / "disk").rglob("*-*")}
        assert [decode_header(k, files[str(k)].read_bytes(), codecs=READABLE_CODECS).codec for k in ckeys] == [3] * 3
        assert server.clear("hot")["cleared"]["hot"] == 3  # the raw copies in RAM: gone
        target = pools[1].alloc(12)
        assert ranks[1].batch_exists(keys) == 3
        assert ranks[1].batch_get_v1(keys, target) == [True] * 3
        for got, want in zip(pages_of(pools[1], target), expected, strict=True):
            assert 0 < float((got.view(pools[1].dtype).float() - want).norm() / want.norm()) < 0.04
    finally:
        for r in ranks:
            r.close()
        server.close()


def test_clear_drops_this_deployments_pages_from_ram_and_disk_and_keeps_other_deployments(tmp_path: Path) -> None:
    config = write_config(tmp_path / "lmtier.yaml",
                          {"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20}},
                          {"name": "local", "backend": "disk", "options": {"root": str(tmp_path / "disk")}})
    store = shared_store(config)
    try:
        from lmtier.integrations.sglang import LMTierHiCacheStorage

        ours, theirs = (LMTierHiCacheStorage(storage_config({**EXTRA, "lmtier_namespace_salt": salt}), {}, store=store)
                        for salt in ("ours", "theirs"))
        keys = page_keys(list(range(12)))
        for b in (ours, theirs):
            b.register_mem_pool_host(mha_pool())
            assert b.batch_set_v1(keys, b.mem_pool_host.alloc(12)) == [True] * 3
        store.flush()
        ours.clear()
        assert ours.batch_exists(keys) == 0, "SGLang's clear: this deployment's pages are gone"
        assert theirs.batch_exists(keys) == 3, "another deployment's pages stay"
        target = ours.mem_pool_host.alloc(12)
        assert ours.batch_get_v1(keys, target) == [False] * 3
        assert ours.batch_set_v1(keys, target) == [True] * 3  # and it stores again
        store.flush()
        assert ours.batch_exists(keys) == 3
    finally:
        store.close()


def test_clear_through_lmtier_serve_drops_only_this_deployments_pages(tmp_path: Path) -> None:
    from tests.server.serverproc import start_server

    server = start_server(tmp_path)  # a cpu slab over a disk tier
    config = tmp_path / "client.yaml"
    config.write_text(f"server: {server.address}\n")
    backends: list[Any] = []
    try:
        backends = [make_backend(config, {"lmtier_namespace_salt": salt}) for salt in ("ours", "theirs")]
        keys = page_keys(list(range(500, 512)))
        for b in backends:
            b.register_mem_pool_host(mha_pool())
            assert b.batch_set_v1(keys, b.mem_pool_host.alloc(12)) == [True] * 3
            b.store.flush()
        ours, theirs = backends
        ours.clear()
        assert ours.batch_exists(keys) == 0 and theirs.batch_exists(keys) == 3
        tiers = {t["name"]: t["objects"] for t in server.status()["tiers"]}
        assert tiers == {"hot": 3, "local": 3}, "the server kept the other deployment's pages in both tiers"
    finally:
        for b in backends:
            b.close()
        server.close()


# -- faults and sharing -------------------------------------------------------------------------
@pytest.mark.redis
def test_a_tier_that_is_down_is_a_miss(tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="the redis tier needs `pip install 'lmtier[redis]'`")
    from tests.support.redis_server import free_port

    dead = {"name": "shared", "backend": "redis", "timeout_s": 0.5,
            "options": {"url": f"redis://127.0.0.1:{free_port()}/0", "connect_at_open": False}}
    backend = make_backend(write_config(tmp_path / "dead.yaml", dead))
    try:
        pool = mha_pool()
        backend.register_mem_pool_host(pool)
        idx = pool.alloc(8)
        keys = page_keys(list(range(8)))
        assert backend.batch_exists(keys) == 0
        assert backend.batch_get_v1(keys, idx) == [False, False]
        backend.batch_set_v1(keys, idx)  # a skipped write, not an exception
        backend.store.flush()
        assert backend.batch_exists(keys) == 0
    finally:
        backend.close()


@pytest.mark.redis
def test_a_frozen_tier_is_a_miss_within_its_deadline(tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="the redis tier needs `pip install 'lmtier[redis]'`")
    import signal

    from tests.support.redis_server import redis_available, start_redis

    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = start_redis(tmp_path / "redis")
    try:
        hot = {"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20}}
        shared = {"name": "shared", "backend": "redis", "timeout_s": 0.5, "options": {"url": server.url}}
        config = write_config(tmp_path / "frozen.yaml", hot, shared)
        keys = page_keys(list(range(700, 708)))
        writer, reader = make_backend(config), make_backend(config)
        try:
            for b in (writer, reader):
                b.register_mem_pool_host(mha_pool())
            idx = writer.mem_pool_host.alloc(8)
            assert writer.batch_set_v1(keys, idx) == [True, True]
            writer.store.flush()
            assert reader.batch_exists(keys) == 2  # from Redis: the reader's RAM tier is empty
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:
                more = page_keys(list(range(800, 808)))
                assert reader.batch_exists(more) == 0
                assert reader.batch_get_v1(more, reader.mem_pool_host.alloc(8)) == [False, False]
                assert writer.batch_exists(keys) == 2  # its RAM tier still answers
            finally:
                os.kill(server.pid, signal.SIGCONT)
        finally:
            writer.close()
            reader.close()
    finally:
        server.stop()


@pytest.mark.redis
@pytest.mark.slow  # the writer process imports SGLang's host pools again (10-25 s here)
def test_two_processes_share_pages_through_redis(tmp_path: Path) -> None:
    pytest.importorskip("redis", reason="the redis tier needs `pip install 'lmtier[redis]'`")
    from tests.support.redis_server import redis_available, start_redis

    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = start_redis(tmp_path / "redis")
    try:
        hot = {"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20}}
        shared = {"name": "shared", "backend": "redis", "options": {"url": server.url}}
        config = write_config(tmp_path / "shared.yaml", hot, shared)
        keys = page_keys(list(range(500, 524)))
        writer = subprocess.run(
            [sys.executable, "-m", "tests.integration.sglang_env", "write", str(config), "21", *keys],
            capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            cwd=Path(__file__).resolve().parents[2])
        assert writer.returncode == 0, writer.stderr[-3000:]
        assert writer.stdout.split()[-1] == "stored=6"
        backend = make_backend(config)
        try:
            pool = mha_pool()
            backend.register_mem_pool_host(pool)
            fill_random(pool, 21)  # the writer's pool content: same seed, same geometry
            expected = pages_of(pool, torch.arange(24))
            pool.kv_buffer.zero_()
            target = pool.alloc(48)[24:]
            assert backend.batch_exists(keys) == 6
            assert backend.batch_get_v1(keys, target) == [True] * 6
            assert all(torch.equal(g, e) for g, e in zip(pages_of(pool, target), expected, strict=True))
        finally:
            backend.close()
    finally:
        server.stop()
