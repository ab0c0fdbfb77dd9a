"""KV events of the vLLM connector: where lmtier holds a request's blocks, as vLLM's own events.

A KV-aware router (llm-d, Dynamo) keeps, per instance, which blocks it can serve and from which
*medium*; vLLM publishes ``BlockStored`` / ``BlockRemoved`` for its own GPU cache, and a connector
adds its own through ``take_events``. lmtier reports one *residency* per tier, as vLLM's
offloading connector does per offloading tier:

* a tier took a chunk (a put landed there: the save itself, a write-through or background
  write, a demotion from a hotter tier, a promotion) → ``BlockStored`` of the chunk's blocks with
  the tier's ``medium`` (``CPU`` for RAM, ``STORAGE`` for disks and object stores), ``locality``
  (``LOCAL`` on this node, ``REMOTE`` for shared tiers such as Redis or S3) and ``ownership``
  ``lmtier:<tier>``;
* a tier dropped it (evicted, deleted, found corrupt) → ``BlockRemoved`` with the same hashes,
  medium, locality and ownership. A chunk evicted from RAM and demoted to disk is therefore a
  removal from ``CPU`` and a store on ``STORAGE``; one evicted from its last tier leaves nothing.

A router counts residencies per block: a block is served from this instance while any
``(medium, ownership)`` holds it. Blocks are vLLM's own hashes (what its prefix cache and a
router compute for the same tokens, cache salt and LoRA adapter), ``block_size`` vLLM's; chunks
overlapping a shared, not chunk-aligned prefix (a prompt's tail, then the whole chunk) announce
the shared blocks once per chunk, as vLLM's offloading connector does: consumers reference-count.

The pieces: the scheduler registers each chunk's event fields when it plans a save
(:class:`ChunkEvents`, keyed by the chunk's id: vLLM's hash of its last block); the save carries
the ids to the workers, which map their store's keys to them and report the store's residency
changes (:class:`ResidencyReporter`, over :class:`lmtier.store.SupportsResidency`); the scheduler
turns the reports of every tensor-parallel rank into events (a tier holds a chunk once every rank
has its shard there; one rank losing it removes it).
"""

from __future__ import annotations

import logging
import threading
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmtier.errors import InvalidArgumentError, NotSupportedError

if TYPE_CHECKING:
    from lmtier.engine import KVCacheEngine
    from lmtier.keys import ChunkKey
    from lmtier.protocol import Capabilities

__all__ = ["ChunkEvents", "Report", "ResidencyReporter", "tier_place"]

log = logging.getLogger("lmtier.vllm")

#: Chunks whose event fields the scheduler keeps (least recently stored dropped first): what a
#: removal needs to name its blocks. 16k chunks of 256 tokens is far more than RAM and disk tiers
#: hold of a GPU model; a removal of a chunk dropped from here is not published (counted).
MAX_CHUNKS = 1 << 14
#: Keys a worker maps to chunk ids (least recently stored dropped first).
MAX_KEYS = 1 << 16

#: vLLM's medium of each built-in backend kind that keeps chunks in RAM (any other: ``STORAGE``)
_RAM_BACKENDS = {"cpu": "CPU", "redis": "CPU"}

#: A residency report of one worker: (rank, chunk id, tier, medium, locality, held).
Report = tuple[int, bytes, str, str, "str | None", bool]


def tier_place(backend: str, capabilities: Capabilities) -> tuple[str, str]:
    """``(medium, locality)`` of a tier in KV events (vLLM's ``MEDIUM_*`` and ``LOCAL``/``REMOTE``).

    The medium is ``CPU`` for the built-in tiers in RAM (cpu, redis) and ``STORAGE`` for any other.
    The locality is the backend's own promise, :attr:`~lmtier.protocol.Capabilities.shared`:
    ``REMOTE`` when other processes and hosts see its chunks (Redis, S3, a third party's shared
    store), so a router may send a prefix to any instance over it; ``LOCAL`` otherwise.
    """
    return _RAM_BACKENDS.get(backend, "STORAGE"), ("REMOTE" if capabilities.shared else "LOCAL")


@dataclass
class _Chunk:
    block_hashes: list[Any]
    parent_block_hash: Any
    token_ids: array[int]
    lora_name: str | None
    extra_keys: list[Any] | None


class ChunkEvents:
    """Scheduler side: chunk event fields, the workers' residency reports, the events to publish."""

    def __init__(self, block_size: int, chunk_tokens: int, world: int) -> None:
        self._block = block_size
        self._chunk = chunk_tokens
        self._world = world
        self._chunks: OrderedDict[bytes, _Chunk] = OrderedDict()
        self._ranks: dict[tuple[bytes, str], set[int]] = {}  # (chunk, tier) -> ranks holding it there
        self._announced: dict[tuple[bytes, str], tuple[str, str | None]] = {}  # -> (medium, locality)
        self._events: list[Any] = []
        self.unpublished = 0  # changes of chunks whose fields were dropped (MAX_CHUNKS)

    def plan(self, request: Any, stop: int) -> list[bytes] | None:
        """A save of ``request``'s tokens ``[0, stop)``: registers its chunks' fields (those loaded
        or stored before too: a tier may take or drop them later) and returns the id of each
        chunk (None when vLLM has not hashed those blocks)."""
        c, b = self._chunk, self._block
        hashes = request.block_hashes
        if stop // b > len(hashes) or stop <= 0:
            return None
        bounds = [(s, min(s + c, stop)) for s in range(0, stop, c)]
        ids = [bytes(hashes[e // b - 1]) for _, e in bounds]
        for (s, e), cid in zip(bounds, ids, strict=True):
            if cid not in self._chunks:
                self._chunks[cid] = self._fields(request, s, e)
            self._chunks.move_to_end(cid)
        while len(self._chunks) > MAX_CHUNKS:
            self._chunks.popitem(last=False)
        return ids

    def _fields(self, request: Any, start: int, stop: int) -> _Chunk:
        from vllm.v1.core.kv_cache_utils import (
            generate_block_hash_extra_keys,
            maybe_convert_block_hash,
            to_event_extra_keys,
        )

        b = self._block
        first, last = start // b, stop // b
        hashes = request.block_hashes
        parent = maybe_convert_block_hash(hashes[first - 1]) if first > 0 else None
        extra = [generate_block_hash_extra_keys(request, i * b, (i + 1) * b, 0)[0] for i in range(first, last)]
        lora = request.lora_request
        return _Chunk([maybe_convert_block_hash(h) for h in hashes[first:last]], parent,
                      array("q", request.all_token_ids[first * b: last * b]),
                      lora.lora_name if lora is not None else None, to_event_extra_keys(extra))

    def report(self, changes: Sequence[Report]) -> None:
        """Workers' residency changes, in order: events once every rank holds a chunk in a tier,
        and as soon as one rank dropped it."""
        for rank, cid, tier, medium, locality, held in changes:
            where = (cid, tier)
            ranks = self._ranks.setdefault(where, set())
            if held:
                ranks.add(rank)
                if len(ranks) >= self._world and where not in self._announced:
                    self._publish(cid, tier, medium, locality, stored=True)
            else:
                ranks.discard(rank)
                if where in self._announced:
                    self._publish(cid, tier, medium, locality, stored=False)
            if not ranks:
                del self._ranks[where]

    def _publish(self, cid: bytes, tier: str, medium: str, locality: str | None, *, stored: bool) -> None:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        chunk = self._chunks.get(cid)
        where = (cid, tier)
        if stored:
            if chunk is None:
                self.unpublished += 1
                return
            self._announced[where] = (medium, locality)
            self._events.append(BlockStored(
                block_hashes=list(chunk.block_hashes), parent_block_hash=chunk.parent_block_hash,
                token_ids=chunk.token_ids.tolist(), block_size=self._block, lora_id=None, medium=medium,
                lora_name=chunk.lora_name, extra_keys=chunk.extra_keys, group_idx=0, locality=locality,
                ownership=f"lmtier:{tier}"))
            return
        medium, locality = self._announced.pop(where)
        if chunk is None:
            self.unpublished += 1
            return
        self._events.append(BlockRemoved(block_hashes=list(chunk.block_hashes), medium=medium, group_idx=0,
                                         locality=locality, ownership=f"lmtier:{tier}"))

    def take(self) -> list[Any]:
        events, self._events = self._events, []
        return events


class ResidencyReporter:
    """Worker side: its saves' keys mapped to chunk ids, the store's residency changes as reports.

    Over a store without :class:`~lmtier.store.SupportsResidency` (or a server that predates it)
    it reports what it can see itself: a save that reached the tiers is held in the hottest one,
    and nothing is ever reported removed.
    """

    def __init__(self, engine: KVCacheEngine, rank: int) -> None:
        from lmtier.store import SupportsResidency

        self._engine = engine
        self._rank = rank
        self._places: dict[str, tuple[str, str]] = {}  # tier -> (medium, locality), once known
        self._ids: OrderedDict[ChunkKey, bytes] = OrderedDict()
        self._own: list[Report] = []  # what the fallback saw (saves land on the store's thread)
        self._lock = threading.Lock()
        self.lost = 0
        self._feed = isinstance(engine.kvstore, SupportsResidency)
        if self._feed:
            self._take()  # start recording before the first save

    def saved(self, keys: Sequence[ChunkKey], chunk_ids: Sequence[bytes]) -> None:
        """A save's keys (engine order) and the scheduler's ids of the same chunks."""
        if len(keys) != len(chunk_ids):
            return  # the scheduler and the engine cut the save differently: nothing to name
        for key, cid in zip(keys, chunk_ids, strict=True):
            self._ids[key] = cid
            self._ids.move_to_end(key)
        while len(self._ids) > MAX_KEYS:
            self._ids.popitem(last=False)

    def landed(self, chunk_ids: Sequence[bytes]) -> None:
        """A save reached the tiers (the fallback's only knowledge: held in the hottest tier)."""
        names = self._engine.tier_names
        if self._feed or not names:
            return
        medium, locality = self._place(names[0])
        with self._lock:
            self._own.extend((self._rank, cid, names[0], medium, locality, True) for cid in chunk_ids)

    def take(self) -> list[Report]:
        """The changes of this worker's chunks since the last call."""
        with self._lock:
            out, self._own = self._own, []
        if not self._feed:
            return out
        for change in self._take():
            cid = self._ids.get(change.key)
            if cid is None:
                continue  # not a chunk of this worker's saves
            medium, locality = self._place(change.tier)
            out.append((self._rank, cid, change.tier, medium, locality, change.held))
        return out

    def _place(self, tier: str) -> tuple[str, str]:
        """``(medium, locality)`` of one of the store's tiers (:func:`tier_place`)."""
        place = self._places.get(tier)
        if place is not None:
            return place
        try:
            found = self._engine.manager.tier(tier)
        except (NotSupportedError, InvalidArgumentError):
            # the tiers of lmtier serve, a node-local server that names them only: its RAM slab
            # first, storage below
            first = self._engine.tier_names[:1] == [tier]
            place = ("CPU", "LOCAL") if first else ("STORAGE", "LOCAL")
        else:
            place = tier_place(found.config.backend, found.backend.capabilities)
            if not found.up:
                return place  # a stand-in's capabilities until the backend opens: not kept
        self._places[tier] = place
        return place

    def _take(self) -> list[Any]:
        try:
            changes, lost = self._engine.kvstore.take_residency()  # type: ignore[attr-defined]
        except NotSupportedError:
            self._feed = False
            return []
        if lost:
            self.lost += lost
            log.warning("lmtier: %d residency change(s) of the store were lost; KV events may name blocks "
                        "no longer stored (a router's request then misses and is computed)", lost)
        return list(changes)
