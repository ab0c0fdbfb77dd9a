"""KVStore: the one seam between :class:`~lmtier.engine.KVCacheEngine` and storage.

::

    engine (vLLM connector / SGLang HiCache / HF transformers / your code)
       │  token ids, paged KV           KVCacheEngine: tokens -> keys, GPU <-> host copies
       ▼
    KVStore  ── LocalStore: a StorageManager in this process, on a loop thread
             └─ ServerStore: a client of `lmtier serve` (lmtier.server), tiers in the server

The engine touches nothing below this protocol: no manager, no tier, no backend. Everything an
engine needs from storage is here, in host-buffer terms (the GPU side is the engine's job):

* :meth:`~KVStore.lookup` — how many leading chunks are stored, and where each one lives;
* :meth:`~KVStore.reserve` / :meth:`~KVStore.commit` — host buffers to copy chunks into, then
  hand them over (the engine's store path: copy out, commit, return; tiers are written behind);
* :meth:`~KVStore.fetch` — readable host buffers holding stored chunks (the retrieve path: the
  GPU copy reads them in place; one host copy per hit at most, none for a RAM hit);
* :meth:`~KVStore.fetch_into` / :meth:`~KVStore.put` — the same through caller-owned buffers, for
  integrations whose host memory is not ours (SGLang's host pool).

**Threads and time.** Every method is synchronous and thread-safe; it may be called from any
engine thread. Calls that can wait on a tier take a ``timeout_s`` deadline (``None``: the store's
configured default for that kind of call, always finite) and answer when it expires — a tier that
has not answered by then is a miss for that call. Faults are misses: no method raises for a tier
or server fault; only bad arguments raise :class:`~lmtier.errors.InvalidArgumentError`, and a
closed store raises :class:`~lmtier.errors.LmtierError`.

**Buffers.** A :class:`HostChunk` is a refcounted range of host memory the store lends out
(:class:`~lmtier.memory.HostBuffer` satisfies it; a server slab slot is another). Whoever holds
one releases it exactly once, on every path. Buffers are pinned (page-locked) where CUDA is
available, so the engine's GPU copies can read and write them without staging.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from lmtier.keys import ChunkKey
    from lmtier.metrics import Metrics
    from lmtier.protocol import Buffer

__all__ = ["HostChunk", "KVStore", "LookupResult"]


@runtime_checkable
class HostChunk(Protocol):
    """A lent range of host memory holding (or about to hold) one chunk's bytes."""

    @property
    def nbytes(self) -> int:
        """Size of the range in bytes (exactly what was reserved or stored)."""
        ...

    @property
    def tensor(self) -> torch.Tensor:
        """A flat ``uint8`` CPU tensor over the range (pinned where CUDA exists); valid until release."""
        ...

    def view(self) -> memoryview:
        """A flat byte memoryview over the range; valid until release."""
        ...

    def release(self) -> None:
        """Give the range back. Exactly once per chunk handed out; later use is an error."""
        ...


@dataclass(frozen=True)
class LookupResult:
    """The answer of :meth:`KVStore.lookup`.

    Attributes:
        hit_chunks: how many leading keys are stored (prefix semantics: key ``i`` counts only if
            keys ``0..i-1`` do).
        tiers: for each of those leading chunks, the name of the hottest tier holding it (what a
            fetch would read from now); ``len(tiers) == hit_chunks``.
    """

    hit_chunks: int
    tiers: tuple[str, ...] = ()


@runtime_checkable
class KVStore(Protocol):
    """Chunk storage as an engine sees it: lookup, reserve/commit, fetch. See the module doc."""

    @property
    def metrics(self) -> Metrics:
        """Where engine-level counters (hit tokens, loaded tokens, ...) of this process go."""
        ...

    def lookup(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None
               ) -> concurrent.futures.Future[LookupResult]:
        """Start a prefix lookup of ``keys``; the future never raises (a fault is 0 hits).

        Answered from every tier, hottest first, each within its lookup deadline; the future is
        done at the latest when ``timeout_s`` expires (then: what was known by then).
        """
        ...

    def contains(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None) -> list[bool]:
        """Whether each key is stored in some tier (not a prefix answer); faults are ``False``."""
        ...

    def reserve(self, sizes: Sequence[int]) -> list[HostChunk | None]:
        """Writable host buffers of exactly ``sizes[i]`` bytes, for chunks about to be stored.

        ``None`` where there is no room now (the caller stores fewer chunks). Never waits on a
        tier: the buffers come from the hot tier's memory or the process's host pool. The caller
        fills them and passes them to :meth:`commit`, or releases them.
        """
        ...

    def commit(self, items: Sequence[tuple[ChunkKey, HostChunk]], *, request_id: str | None = None
               ) -> concurrent.futures.Future[int]:
        """Store filled chunks; returns at once. Takes over the caller's reference to each chunk.

        Presence checks and every tier write happen behind the call; keys already stored are
        skipped there. The future (never raising) gives the number of chunks newly written to the
        hottest tier that accepted them (0 after a fault).
        """
        ...

    def put(self, items: Sequence[tuple[ChunkKey, Buffer]], *, request_id: str | None = None
            ) -> concurrent.futures.Future[int]:
        """Like :meth:`commit` for caller-owned buffers: copied before the call returns."""
        ...

    def fetch(self, keys: Sequence[ChunkKey], sizes: Sequence[int], *, timeout_s: float | None = None
              ) -> concurrent.futures.Future[list[HostChunk | None]]:
        """Readable host chunks holding ``keys``' values, ``None`` for a miss.

        A value whose size is not ``sizes[i]`` is a miss (and is deleted). Hits from colder tiers
        land once, in the buffer returned (and are promoted to the hot tier per policy). The
        caller releases every chunk returned. The future never raises; when ``timeout_s``
        expires, what has not arrived is a miss, and no buffer a late tier may still write is
        ever handed out as a hit.
        """
        ...

    def fetch_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer], *,
                   timeout_s: float | None = None) -> list[bool]:
        """Fill caller buffers (writable, exactly the stored size) with ``keys``' values.

        ``True`` where filled. After a ``False`` (miss, fault, deadline) the content of
        ``outs[i]`` is unspecified but no tier writes it after this returns.
        """
        ...

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove ``keys`` everywhere (best effort; faults are logged)."""
        ...

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait (at most ``timeout_s``) until commits and background tier writes are done."""
        ...

    def close(self) -> None:
        """Flush (bounded), release everything, stop threads. Idempotent."""
        ...
