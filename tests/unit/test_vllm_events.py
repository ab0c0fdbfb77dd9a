"""The scheduler side of the vLLM connector's KV events (lmtier.integrations._vllm_events).

Real vLLM requests, hashed by vLLM's own block hasher; the workers' residency reports are the
input (the whole path, store to ZMQ publisher, runs on real engines in tests/integration).
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

BLOCK, CHUNK = 16, 32


def request(tokens: list[int], rid: str = "r") -> Any:
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    return Request(rid, tokens, SamplingParams(), None, block_hasher=get_request_block_hasher(BLOCK, sha256))


def kinds(events: list[Any]) -> list[tuple[str, str, int]]:
    return [(type(e).__name__, e.ownership, len(e.block_hashes)) for e in events]


def test_a_tier_holds_a_chunk_once_every_rank_stored_it_and_loses_it_when_one_rank_drops_it() -> None:
    from lmtier.integrations._vllm_events import ChunkEvents

    req = request(list(range(100, 180)))  # 80 tokens: 5 blocks, chunks [0, 32) [32, 64) [64, 80)
    events = ChunkEvents(BLOCK, CHUNK, world=2)
    ids = events.plan(req, 80)
    assert ids is not None and len(ids) == 3
    assert ids == [bytes(req.block_hashes[i]) for i in (1, 3, 4)]  # a chunk's id: its last block's hash
    events.report([(0, ids[0], "hot", "CPU", "LOCAL", True)])
    assert events.take() == []  # rank 1 has not stored its shard yet
    events.report([(1, ids[0], "hot", "CPU", "LOCAL", True), (1, ids[0], "hot", "CPU", "LOCAL", True)])
    (stored,) = events.take()
    assert kinds([stored]) == [("BlockStored", "lmtier:hot", 2)]
    assert stored.parent_block_hash is None and stored.token_ids == list(range(100, 132))
    assert (stored.medium, stored.locality, stored.block_size) == ("CPU", "LOCAL", BLOCK)
    events.report([(0, ids[2], "local", "STORAGE", "LOCAL", True), (1, ids[2], "local", "STORAGE", "LOCAL", True)])
    (tail,) = events.take()
    assert kinds([tail]) == [("BlockStored", "lmtier:local", 1)] and tail.parent_block_hash is not None
    events.report([(1, ids[0], "hot", "CPU", "LOCAL", False)])  # one rank's shard evicted: gone
    events.report([(0, ids[0], "hot", "CPU", "LOCAL", False)])  # the other's too: no second removal
    (removed,) = events.take()
    assert kinds([removed]) == [("BlockRemoved", "lmtier:hot", 2)]
    assert removed.block_hashes == stored.block_hashes and removed.medium == "CPU"
    events.report([(0, ids[0], "hot", "CPU", "LOCAL", True), (1, ids[0], "hot", "CPU", "LOCAL", True)])
    assert kinds(events.take()) == [("BlockStored", "lmtier:hot", 2)]  # stored again (a promotion)


def test_changes_of_unknown_chunks_are_counted_not_published() -> None:
    from lmtier.integrations._vllm_events import ChunkEvents

    events = ChunkEvents(BLOCK, CHUNK, world=1)
    assert events.plan(request(list(range(40))), 64) is None  # vLLM has not hashed those blocks
    events.report([(0, b"\x01" * 32, "hot", "CPU", "LOCAL", True), (0, b"\x01" * 32, "hot", "CPU", "LOCAL", False)])
    assert events.take() == [] and events.unpublished == 1


class SharedDict:
    """A third party's tier over storage other instances see: it declares ``shared=True``."""

    def __init__(self, config: Any) -> None:
        self._data: dict[Any, bytes] = {}

    @property
    def capabilities(self) -> Any:
        from lmtier import Capabilities

        return Capabilities(shared=True)

    async def contains(self, keys: Any) -> list[bool]:
        return [key in self._data for key in keys]

    async def get(self, keys: Any) -> list[bytes | None]:
        return [self._data.get(key) for key in keys]

    async def put(self, items: Any) -> None:
        for key, value in items:
            self._data[key] = bytes(memoryview(value).cast("B"))

    async def delete(self, keys: Any) -> None:
        for key in keys:
            self._data.pop(key, None)

    async def aclose(self) -> None:
        self._data.clear()

    async def __aenter__(self) -> SharedDict:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def test_a_tiers_locality_is_what_its_backend_declares_third_party_shared_tiers_included(tmp_path: Any) -> None:
    from prometheus_client import CollectorRegistry

    from lmtier import BackendSpec
    from lmtier.engine import KVCacheEngine
    from lmtier.integrations._vllm_events import ResidencyReporter
    from lmtier.keys import ChunkKey, KVNamespace
    from lmtier.registry import BackendRegistry

    registry = BackendRegistry.discover()
    registry.register(BackendSpec("shareddict", f"{__name__}:SharedDict", "lmtier_backends.cpu.config:CpuConfig"))
    cfg = {"chunk_tokens": CHUNK, "host_pool_bytes": 1 << 20, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}},
        {"name": "local", "backend": "disk", "options": {"root": str(tmp_path / "disk")}},
        {"name": "team", "backend": "shareddict", "write": "through"}]}
    kv = KVNamespace(model="unit", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=1,
                     block_size=BLOCK, num_kv_heads=1, head_size=8, page_bytes=256, chunk_tokens=CHUNK)
    with KVCacheEngine(cfg, kv, registry=registry, metrics_registry=CollectorRegistry()) as engine:
        reporter = ResidencyReporter(engine, rank=0)
        key = ChunkKey(kv.namespace, bytes(16))
        reporter.saved([key], [b"chunk"])
        engine.kvstore.put([(key, b"kv" * 256)]).result()
        engine.kvstore.flush()
        places = {tier: (medium, locality) for _, _, tier, medium, locality, held in reporter.take() if held}
    assert places == {"hot": ("CPU", "LOCAL"), "local": ("STORAGE", "LOCAL"), "team": ("STORAGE", "REMOTE")}


def test_requests_share_the_chunks_whose_last_block_hashes_are_equal() -> None:
    from lmtier.integrations.vllm import _shared_chunks

    mine = [f"h{i}" for i in range(9)]  # chained hashes: equal at block i means equal up to i
    assert _shared_chunks(mine, mine, 2) == 4  # the ninth block completes no chunk
    assert _shared_chunks(mine, mine[:5], 2) == 2
    assert _shared_chunks(mine, [*mine[:5], "x5", "x6"], 2) == 2  # diverges inside the third chunk
    assert _shared_chunks(mine, [*mine[:3], "x3"], 2) == 1
    assert _shared_chunks(mine, ["x0", "x1", "x2"], 2) == 0  # diverged in the first block: none after equal
    assert _shared_chunks(mine, mine, 1) == 9 and _shared_chunks([], mine, 4) == 0
