"""Lossy value codecs behind ``lmtier serve``: engines register their namespaces with the server.

A real server whose disk tier quantizes (fp8): an engine on it keys its chunks under a namespace
naming the server's lossy codec, the disk tier stores them quantized, and another engine reads
them back within the codec's error once the hot tier forgot them; after a restart of the server
the engine registers again, so its new chunks are quantized too; KV the codec cannot quantize
is a ConfigError when the engine opens. (The codecs themselves: tests/unit/test_codecs.py.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry

from lmtier.codecs.base import LOSSY_FIELD
from lmtier.engine import KVCacheEngine
from lmtier.errors import ConfigError
from lmtier.framing import READABLE_CODECS, decode_header
from lmtier.keys import chunk_keys
from lmtier.server.client import ServerStore
from tests.server.serverproc import ServerProc, start_server, wait_until
from tests.unit.test_engine import CHUNK, make_cache, namespace, tokens

pytestmark = pytest.mark.server


def lossy_config(root: Path) -> Path:
    path = root / "tiers.yaml"
    path.write_text(yaml.safe_dump({"chunk_tokens": 256, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "32MiB", "pinned": False}},
        {"name": "local", "backend": "disk", "write": "through", "codec": {"name": "fp8", "scales": "vector"},
         "options": {"root": str(root / "disk"), "max_bytes": "256MiB"}},
    ]}))
    return path


@pytest.fixture
def lossy_server(tmp_path: Path) -> Iterator[ServerProc]:
    srv = start_server(tmp_path, config=lossy_config(tmp_path))
    yield srv
    srv.close()


def stored_codecs(root: Path, keys: list) -> list[int]:
    """The codec id in the header of each key's file in the server's disk tier."""
    files = {p.name: p for p in (root / "disk").rglob("*") if p.is_file()}
    return [decode_header(k, files[str(k)].read_bytes(), codecs=READABLE_CODECS).codec for k in keys]


def engine(server: ServerProc, name: str, **kv: str) -> KVCacheEngine:
    cfg = {"chunk_tokens": CHUNK, "server": server.address}
    return KVCacheEngine(cfg, namespace(**kv), metrics_registry=CollectorRegistry(), name=name)


def relative_error(a: list[torch.Tensor], ablocks: list[int], b: list[torch.Tensor], bblocks: list[int]) -> float:
    x = torch.stack([layer[ablocks] for layer in a]).float()
    y = torch.stack([layer[bblocks] for layer in b]).float()
    return float((x - y).norm() / x.norm())


def test_engines_on_a_lossy_server_share_quantized_chunks_under_a_namespace_naming_the_codec(
        lossy_server: ServerProc, tmp_path: Path) -> None:
    src, dst = make_cache(), make_cache(fill=False)
    toks = tokens(32)  # 2 whole chunks
    with engine(lossy_server, "lossy-a") as a:
        assert isinstance(a.kvstore, ServerStore)
        assert a.namespace != namespace().namespace and (LOSSY_FIELD, "fp8/vector") in a.kv.extra
        salted = a.derive_namespace(("salt", "tenant-1"))  # derived namespaces are registered too
        assert salted not in (a.namespace, namespace().namespace)
        assert a.store(toks, src, list(range(10, 18))).wait() == 32
        a.flush()
        keys = chunk_keys(toks, a.namespace, CHUNK)
        assert stored_codecs(tmp_path, keys) == [3, 3], "the disk tier did not quantize the engine's chunks"
    lossy_server.clear("hot")  # the hot tier forgets them: the next engine reads the disk tier
    with engine(lossy_server, "lossy-b") as b:
        assert b.namespace == a.namespace
        assert b.retrieve(toks, dst, list(range(30, 38))) == 32
        assert 0 < relative_error(src, list(range(10, 18)), dst, list(range(30, 38))) < 0.04


def test_after_a_server_restart_the_engine_registers_again(lossy_server: ServerProc, tmp_path: Path) -> None:
    src = make_cache()
    with engine(lossy_server, "restarted") as eng:
        store = eng.kvstore
        assert isinstance(store, ServerStore)
        lossy_server.kill()
        restarted = start_server(tmp_path, config=lossy_config(tmp_path), socket_path=lossy_server.socket_path)
        try:
            wait_until(lambda: store.connected and store.reconnects >= 1, 60, "the engine's reconnect")
            toks = tokens(16, seed=5)
            assert eng.store(toks, src, list(range(4))).wait() == 16
            eng.flush()
            assert stored_codecs(tmp_path, chunk_keys(toks, eng.namespace, CHUNK)) == [3], \
                "the restarted server stored the engine's chunk raw: its namespace was not registered again"
        finally:
            restarted.close()


def test_kv_a_lossy_tier_cannot_quantize_is_a_config_error_naming_the_tier(lossy_server: ServerProc) -> None:
    with pytest.raises(ConfigError, match=r"tiers\[1\] \(local\)\.codec: codec fp8 quantizes float KV"):
        engine(lossy_server, "int-kv", dtype="int8")


def test_flush_waits_for_commits_in_flight_and_the_tier_writes_behind_them(lossy_server: ServerProc,
                                                                          tmp_path: Path) -> None:
    """``KVStore.flush``: a commit is sent behind its call, and the server writes its tiers (here
    an fp8 disk tier: encoding takes a while) while answering it; flush returns only after that,
    so everything committed before it is in the disk tier (a flush that overtook the commit found
    an empty disk tier: seen with SGLang's backend, which commits and flushes)."""
    store = lossy_server.store()
    # chunks of a mid-size model (32 layers, 8 heads of 128, 4 pages of 16 tokens: 8 MiB), so the
    # server's encoding takes long enough for a flush sent right after the commit to overtake it
    kv = store.register_namespace(namespace(64, num_layers=32, block_size=16, num_kv_heads=8, head_size=128,
                                            page_bytes=2 * 16 * 8 * 128 * 2))
    assert (LOSSY_FIELD, "fp8/vector") in kv.extra
    value = torch.randn(32 * 4 * 2 * 16 * 8, 128).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    keys = chunk_keys(tokens(64 * 3, seed=9), kv.namespace, 64)
    chunks = store.reserve([len(value)] * len(keys))
    assert all(c is not None for c in chunks)
    for c in chunks:
        c.view()[:] = value
    store.commit(list(zip(keys, chunks, strict=True)))  # not waited for: flush must
    store.flush()
    assert stored_codecs(tmp_path, keys) == [3] * len(keys)
