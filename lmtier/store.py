"""KVStore: the one seam between :class:`~lmtier.engine.KVCacheEngine` and storage.

::

    engine (vLLM connector / SGLang HiCache / HF transformers / your code)
       │  token ids, paged KV           KVCacheEngine: tokens -> keys, GPU <-> host copies
       ▼
    KVStore  ── LocalStore: a StorageManager in this process, on a loop thread
             └─ ServerStore: a client of `lmtier serve` (lmtier.server), tiers in the server

The engine touches nothing below this protocol: no manager, no tier, no backend. Everything an
engine needs from storage is here, in host-buffer terms (the GPU side is the engine's job):

* :meth:`~KVStore.lookup` — how many leading chunks are stored, and where each one lives (and,
  in the same call, where the partial chunks that could extend that prefix live: ``tails``);
* :meth:`~KVStore.reserve` / :meth:`~KVStore.commit` — host buffers to copy chunks into, then
  hand them over (the engine's store path: copy out, commit, return; tiers are written behind);
* :meth:`~KVStore.fetch` — readable host buffers holding stored chunks (the retrieve path: the
  GPU copy reads them in place; one host copy per hit at most, none for a RAM hit);
* :meth:`~KVStore.fetch_into` / :meth:`~KVStore.put` — the same through caller-owned buffers, for
  integrations whose host memory is not ours (SGLang's host pool);
* :meth:`~KVStore.clear` — drop every chunk of the engine's namespaces (an engine's "clear the
  cache": SGLang's ``clear()``), leaving other engines' chunks alone.

:class:`LocalStore` implements it over a :class:`~lmtier.manager.StorageManager` running on its
own event-loop thread in this process (``lmtier.server``'s ``ServerStore`` is the other one).

Changes since the first version of this protocol: ``reserve`` takes ``keys=`` (optional), so a
store can answer "already stored" without a round trip of its own: the engine's store path then
never copies a chunk the hot tier holds (vLLM saves a request's whole prefix each step).
``clear(namespaces)`` was added for engines whose API has a "clear the cache" call.
``tier_names`` joined the protocol (both stores had it; the engine read it with ``getattr``).
``lookup`` takes ``tails=`` and answers :attr:`LookupResult.tail_tiers`: the engine's probe for a
stored partial last chunk rides on the lookup instead of a ``contains`` and a second ``lookup`` of
its own (through ``lmtier serve``, two socket round trips fewer per request). The
optional :class:`SupportsResidency` (``take_residency``) tells, tier by tier, which chunks the store
took and which it dropped since the last call: what a KV-aware router needs (vLLM's KV events).

Not in the seam, on purpose: a scatter/gather ``fetch_into`` (one value into several caller
ranges) — :meth:`~KVStore.fetch` lends the value where it already is (a RAM hit is not copied;
a colder hit is read once into hot-tier memory, which is then its promotion), and the caller's
one copy per range out of it is the same one copy a scatter read would make; and per-key results
of :meth:`~KVStore.commit` — a commit returns at once so the caller's thread never waits on a
tier, and a chunk a tier fails to take is a later miss, which every reader handles already.

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

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from lmtier.errors import InvalidArgumentError, LmtierError
from lmtier.memory import release_all

if TYPE_CHECKING:
    import os

    import torch
    from prometheus_client import CollectorRegistry

    from lmtier.config import LmtierConfig
    from lmtier.cost import ReadCost
    from lmtier.keys import ChunkKey, KVNamespace
    from lmtier.manager import StorageManager
    from lmtier.metrics import Metrics
    from lmtier.protocol import Buffer
    from lmtier.registry import BackendRegistry

log = logging.getLogger("lmtier.store")
T = TypeVar("T")
#: How long LocalStore.clear waits by default (it flushes queued writes, then deletes files).
_CLEAR_TIMEOUT_S = 60.0

__all__ = ["RESIDENCY_BACKLOG", "HostChunk", "KVStore", "LocalStore", "LookupResult", "Residency", "ResidencyLog",
           "SupportsNamespaces", "SupportsResidency"]


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
        tail_tiers: for each of the lookup's ``tails``, the hottest tier holding it, or ``None``
            where it is not stored; empty unless every key was a hit (``hit_chunks == len(keys)``)
            and tails were asked for.
    """

    hit_chunks: int
    tiers: tuple[str, ...] = ()
    tail_tiers: tuple[str | None, ...] = ()


@runtime_checkable
class KVStore(Protocol):
    """Chunk storage as an engine sees it: lookup, reserve/commit, fetch. See the module doc."""

    @property
    def metrics(self) -> Metrics:
        """Where engine-level counters (hit tokens, loaded tokens, ...) of this process go."""
        ...

    @property
    def tier_names(self) -> list[str]:
        """The store's tiers, hottest first: the names :attr:`LookupResult.tiers` uses (the engine
        promotes a hit it skips only from a tier that has a hotter one). Empty when it cannot say
        yet (a server not reached so far)."""
        ...

    def lookup(self, keys: Sequence[ChunkKey], *, tails: Sequence[ChunkKey] = (),
               timeout_s: float | None = None) -> concurrent.futures.Future[LookupResult]:
        """Start a prefix lookup of ``keys``; the future never raises (a fault is 0 hits).

        Answered from every tier, hottest first, each within its lookup deadline; the future is
        done at the latest when ``timeout_s`` expires (then: what was known by then).

        ``tails``: keys that would extend the prefix past ``keys`` (the engine's partial last
        chunks, longest first), asked of each tier together with ``keys``: when all of ``keys``
        are stored, :attr:`LookupResult.tail_tiers` says where each tail is (``None``: absent).
        ``keys`` may be empty (then the tails alone are answered). A tail a store cannot answer
        for (a server that predates tails) is ``None``: a miss, never a wrong hit.
        """
        ...

    def contains(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None) -> list[bool]:
        """Whether each key is stored in some tier (not a prefix answer); faults are ``False``."""
        ...

    def reserve(self, sizes: Sequence[int], *, keys: Sequence[ChunkKey] | None = None
                ) -> list[HostChunk | None]:
        """Writable host buffers of exactly ``sizes[i]`` bytes, for chunks about to be stored.

        ``None`` where there is no room now (the caller stores fewer chunks) and, when ``keys``
        are given (one per size), where the store already holds ``keys[i]`` in its hot tier:
        nothing to copy (a store that cannot tell cheaply may ignore ``keys``; :meth:`commit`
        skips present keys anyway). Never waits on a tier: the buffers come from the hot tier's
        memory or the process's host pool. The caller fills them and passes them to
        :meth:`commit`, or releases them.
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

    def clear(self, namespaces: Collection[str], *, timeout_s: float | None = None) -> dict[str, int | None]:
        """Remove every chunk of ``namespaces`` from every tier that can clear (RAM, disk; the
        server's, for a store of ``lmtier serve``); other namespaces' chunks stay.

        Returns, per tier, how many chunks it dropped, or ``None`` for a tier that cannot clear
        (a remote store others share: its chunks stay and are still hits). Queued writes are
        flushed first. Never raises for a fault: tiers that did not answer within ``timeout_s``
        (``None``: the store's flush deadline) are left out, and a warning says so. A namespace
        that is not 16 hex digits is an :class:`~lmtier.errors.InvalidArgumentError`.
        """
        ...

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait (at most ``timeout_s``) until commits and background tier writes are done."""
        ...

    def close(self) -> None:
        """Flush (bounded), release everything, stop threads. Idempotent."""
        ...


@runtime_checkable
class SupportsNamespaces(Protocol):
    """Optional: a store whose tiers need to know what a namespace's bytes are (value codecs).

    The engine registers its :class:`~lmtier.keys.KVNamespace` (and each one it derives) and
    keys its chunks under the namespace returned: the same fields plus, when some tier of the
    store quantizes (a lossy codec), the codecs' tags, so lossy KV is never served to an engine
    configured without them (``docs/codecs.md``). A store without this protocol stores values
    of any namespace as they are (no lossy encoding for them).
    """

    def register_namespace(self, kv: KVNamespace) -> KVNamespace:
        """Register ``kv``; returns the namespace to key chunks under. Raises
        :class:`~lmtier.errors.ConfigError` when a tier's codec cannot encode this KV."""
        ...


@dataclass(frozen=True)
class Residency:
    """One change of where a chunk lives: ``tier`` took ``key`` (``held``) or no longer holds it."""

    key: ChunkKey
    tier: str
    held: bool


#: Residency changes a store keeps for its reader between two takes; older ones are dropped (counted).
RESIDENCY_BACKLOG = 1 << 16
#: how much longer than its budget a close waits for the manager's bounded close to return (the
#: loop thread's turn around; the close itself keeps the budget)
_CLOSE_SLACK_S = 0.5


@runtime_checkable
class SupportsResidency(Protocol):
    """Optional: which tier holds which chunk, as it changes (KV-aware routing).

    A tier *takes* a chunk when a write of it lands there (a put, a write-through or background
    write, a promotion, a demotion) and *drops* it when the store evicts it, deletes it, or finds
    it corrupt or of the wrong size. The changes are recorded from the first call on (nothing is
    kept for a store nobody asks) and handed over in order; a reader that does not come back for
    a while loses the oldest beyond :data:`RESIDENCY_BACKLOG` (the count says how many).

    Not reported (documented gaps, a router then sends a request where the chunk has gone and the
    load misses, never serves wrong KV): evictions a tier makes on its own without telling the
    store (a tier without :class:`~lmtier.protocol.SupportsEvictionListener`, e.g. Redis's
    ``maxmemory`` policy or an S3 lifecycle rule), and a whole tier cleared by an operator.
    """

    def take_residency(self) -> tuple[list[Residency], int]:
        """The changes since the previous call, oldest first, and how many were lost (dropped
        beyond the backlog; at least 1 when an unknown number was, e.g. across a reconnect).

        Never waits on a tier and never raises for a fault (a store that lost its source answers
        no changes); raises :class:`~lmtier.errors.NotSupportedError` when the store learns it
        cannot report at all (a server that predates it): stop asking. Thread-safe; meant for one
        reader per store.
        """
        ...


class LocalStore:
    """:class:`KVStore` over a :class:`~lmtier.manager.StorageManager` in this process.

    The manager lives on an asyncio loop: :meth:`open` starts one on a daemon thread and owns it
    (and the manager); :meth:`attach` wraps a manager already running on a loop in another
    thread, which stays the caller's to close. Methods may be called from any thread except that
    loop's own (they would wait on themselves); futures complete on the loop thread, so their
    callbacks must not block.

    How the seam maps onto the manager: ``lookup`` is :meth:`StorageManager.locate_tails`; ``reserve``
    is :meth:`StorageManager.reserve` after a look at the hot tier (in memory, inline);
    ``commit`` is ``put(..., skip_present=True)`` behind the call; ``fetch`` is
    :meth:`StorageManager.fetch` (hot hits lent in place, colder hits read once into hot-tier
    memory and adopted); ``fetch_into`` is :meth:`StorageManager.get_into`. Buffers are pinned
    where CUDA is available (the manager's host pool is; hot-tier memory that is not is not used).
    """

    def __init__(self, manager: StorageManager, loop: asyncio.AbstractEventLoop, *,
                 thread: threading.Thread | None = None, owns: bool = False) -> None:
        self.manager = manager
        self.loop = loop
        self._thread = thread
        self._owns = owns
        self._closed = False
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._pending_lock = threading.Lock()
        self._residency: ResidencyLog | None = None  # made by the first take_residency

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def open(cls, config: str | os.PathLike[str] | Mapping[str, Any] | LmtierConfig | None = None, *,
             registry: BackendRegistry | None = None, metrics_registry: CollectorRegistry | None = None,
             name: str = "lmtier-store") -> LocalStore:
        """Open the tiers of ``config`` (see :meth:`StorageManager.from_config`) on a new loop thread."""
        from lmtier.manager import StorageManager

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name=name, daemon=True)
        thread.start()
        try:
            manager = asyncio.run_coroutine_threadsafe(StorageManager.from_config(
                config, registry=registry, metrics_registry=metrics_registry), loop).result()
        except BaseException:
            _stop_loop(loop, thread)
            raise
        return cls(manager, loop, thread=thread, owns=True)

    @classmethod
    def attach(cls, manager: StorageManager, loop: asyncio.AbstractEventLoop) -> LocalStore:
        """Wrap an open manager running on ``loop`` (in another thread); closing leaves both open."""
        if not loop.is_running():
            raise InvalidArgumentError("attach needs the running event loop the StorageManager lives on")
        return cls(manager, loop)

    # -- the KVStore protocol --------------------------------------------------------------------
    @property
    def metrics(self) -> Metrics:
        return self.manager.metrics

    def register_namespace(self, kv: KVNamespace) -> KVNamespace:
        """:class:`SupportsNamespaces`: the manager's :meth:`~lmtier.manager.StorageManager.declare_lossy`
        of ``kv``, registered with its codecs."""
        async def run() -> KVNamespace:
            declared = self.manager.declare_lossy(kv)
            self.manager.register_namespace(declared)
            return declared

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.manager.tiers]

    def read_costs(self) -> dict[str, ReadCost | None]:
        """Each tier's learned read cost (:class:`lmtier.cost.SupportsReadCosts`)."""
        return self.manager.read_costs()

    def lookup(self, keys: Sequence[ChunkKey], *, tails: Sequence[ChunkKey] = (),
               timeout_s: float | None = None) -> concurrent.futures.Future[LookupResult]:
        keys = _keys(keys)
        tails = _keys(tails)
        _check_timeout(timeout_s)

        async def run() -> LookupResult:
            tiers, tail_tiers = await self.manager.locate_tails(keys, tails, timeout_s=timeout_s)
            return LookupResult(len(tiers), tuple(tiers), tuple(tail_tiers))

        return self._submit(run(), "lookup", fallback=LookupResult(0))

    def contains(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None) -> list[bool]:
        keys = _keys(keys)
        _check_timeout(timeout_s)
        return self._submit(self.manager.contains(keys, timeout_s=timeout_s), "contains",
                            fallback=[False] * len(keys)).result()

    def reserve(self, sizes: Sequence[int], *, keys: Sequence[ChunkKey] | None = None) -> list[HostChunk | None]:
        sizes = _sizes(sizes)
        if keys is not None:
            keys = _keys(keys)
            if len(keys) != len(sizes):
                raise InvalidArgumentError(f"reserve of {len(sizes)} sizes with {len(keys)} keys")

        async def run() -> list[HostChunk | None]:
            todo = list(range(len(sizes)))
            if keys is not None:  # asks an in-memory hot tier only: no tier is waited on
                held = await self.manager.held_hot(keys)
                todo = [i for i in todo if not held[i]]
            out: list[HostChunk | None] = [None] * len(sizes)
            for i, buf in zip(todo, self.manager.reserve([sizes[i] for i in todo]), strict=True):
                out[i] = buf
            return out

        none: list[HostChunk | None] = [None] * len(sizes)
        return self._submit(run(), "reserve", fallback=none, release=release_all).result()

    def commit(self, items: Sequence[tuple[ChunkKey, HostChunk]], *, request_id: str | None = None
               ) -> concurrent.futures.Future[int]:
        from lmtier.memory import HostBuffer

        pairs = _pairs(items)
        for _, chunk in pairs:
            if not isinstance(chunk, HostBuffer):
                raise InvalidArgumentError(f"commit takes chunks from this store's reserve, got {type(chunk).__name__}; "
                                           "use put() for other buffers")
        bufs = [c for _, c in pairs]

        async def run() -> int:
            try:
                return await self.manager.put(pairs, skip_present=True)  # type: ignore[arg-type]
            finally:
                release_all(bufs)

        return self._submit(run(), "commit", fallback=0, request_id=request_id, on_cancel=lambda: release_all(bufs))

    def put(self, items: Sequence[tuple[ChunkKey, Buffer]], *, request_id: str | None = None
            ) -> concurrent.futures.Future[int]:
        from lmtier.buffers import as_bytes_view

        pairs = _pairs(items)
        views = [as_bytes_view(v) for _, v in pairs]
        if any(v.nbytes == 0 for v in views):
            raise InvalidArgumentError("put of an empty (0-byte) value: empty values are refused")
        bufs = self.reserve([v.nbytes for v in views])
        chunks: list[tuple[ChunkKey, HostChunk]] = []
        for (key, _), view, buf in zip(pairs, views, bufs, strict=True):
            if buf is None:
                continue
            buf.view()[:] = view  # copied before put returns: the caller's buffer is free
            chunks.append((key, buf))
        if len(chunks) < len(pairs):
            log.warning("lmtier: no host memory to store %d of %d chunks", len(pairs) - len(chunks), len(pairs))
        return self.commit(chunks, request_id=request_id)

    def fetch(self, keys: Sequence[ChunkKey], sizes: Sequence[int], *, timeout_s: float | None = None
              ) -> concurrent.futures.Future[list[HostChunk | None]]:
        keys = _keys(keys)
        sizes = _sizes(sizes)
        if len(keys) != len(sizes):
            raise InvalidArgumentError(f"fetch of {len(keys)} keys with {len(sizes)} sizes")
        _check_timeout(timeout_s)

        async def run() -> list[HostChunk | None]:
            return list(await self.manager.fetch(keys, sizes, timeout_s=timeout_s))

        none: list[HostChunk | None] = [None] * len(keys)
        return self._submit(run(), "fetch", fallback=none, release=release_all)

    def fetch_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer], *,
                   timeout_s: float | None = None) -> list[bool]:
        from lmtier.buffers import writable_bytes_view

        keys = _keys(keys)
        if len(keys) != len(outs):
            raise InvalidArgumentError(f"fetch_into of {len(keys)} keys with {len(outs)} buffers")
        for out in outs:
            writable_bytes_view(out, what="fetch_into")
        _check_timeout(timeout_s)
        return self._submit(self.manager.get_into(keys, outs, timeout_s=timeout_s), "fetch_into",
                            fallback=[False] * len(keys)).result()

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        keys = _keys(keys)
        self._submit(self.manager.delete(keys), "delete", fallback=None).result()

    def clear(self, namespaces: Collection[str], *, timeout_s: float | None = None) -> dict[str, int | None]:
        from lmtier.keys import namespace_set

        wanted = namespace_set(namespaces)
        _check_timeout(timeout_s)
        fut = self._submit(self.manager.clear(namespaces=wanted), "clear", fallback={})
        try:
            return fut.result(timeout_s if timeout_s is not None else _CLEAR_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            log.warning("lmtier: clear of namespace(s) %s did not finish within its deadline; it goes on "
                        "in the background", sorted(wanted))
            return {}

    def take_residency(self) -> tuple[list[Residency], int]:
        """:class:`SupportsResidency`: the manager's residency changes since the last call."""
        if self._residency is None:
            self._residency = ResidencyLog()
            self.manager.add_residency_listener(self._residency.note)
        return self._residency.take()

    def flush(self, timeout_s: float | None = None) -> None:
        if self._closed:
            return
        end = None if timeout_s is None else time.monotonic() + timeout_s
        with self._pending_lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending, timeout_s)
        self._submit(self.manager.flush(), "flush", fallback=None).result(_left(end))

    def close(self, timeout_s: float | None = 60.0) -> None:
        """Flush, close the manager (when this store opened it) and stop its loop thread, all within
        ``timeout_s`` (``None``: no bound). Idempotent.

        What the budget cuts short is dropped or abandoned, logged and counted
        (:meth:`StorageManager.aclose`): tier calls that are still running end on the loop
        thread, which then closes their tiers, gives their buffers back and stops
        (:meth:`wait_closed`); a daemon thread, it never holds up the process' exit.
        """
        if self._closed:
            return
        end = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            self.flush(timeout_s)
        except Exception as exc:  # closing must go on: the tiers hold files and connections
            log.warning("lmtier: flush at close failed (%s: %s)", type(exc).__name__, exc)
        self._closed = True
        if not self._owns:
            return
        rest = _left(end)
        closing = asyncio.run_coroutine_threadsafe(self.manager.aclose(timeout_s=rest), self.loop)
        try:
            closing.result(None if rest is None else rest + _CLOSE_SLACK_S)
        except concurrent.futures.TimeoutError:
            log.warning("lmtier: closing the store's tiers overran its %.1fs; they close in the background",
                        timeout_s)
        except Exception as exc:
            log.warning("lmtier: closing the store's tiers failed (%s: %s)", type(exc).__name__, exc)
        if self._thread is None:
            return
        if not closing.done() or self.manager.late_closes:
            # Why not stop the loop now: what the close abandoned ends on it (and gives back its buffers)

            async def stop_when_closed() -> None:
                await asyncio.wrap_future(closing)
                await _cancel_tasks(keep=self.manager.late_closes)  # store calls still waiting: misses now
                await self.manager.wait_closed()
                await _end_loop()

            asyncio.run_coroutine_threadsafe(stop_when_closed(), self.loop)
            return
        _stop_loop(self.loop, self._thread)

    def wait_closed(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``timeout_s``) until everything :meth:`close` abandoned at its budget has
        ended and the loop thread stopped; True when it has (at once after an unhurried close)."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalStore(tiers={self.tier_names})"

    # -- machinery -----------------------------------------------------------------------------
    def _submit(self, coro: Coroutine[Any, Any, T], op: str, *, fallback: T,
                release: Callable[[T], None] | None = None, request_id: str | None = None,
                on_cancel: Callable[[], None] | None = None) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; a future that never raises (a fault gives ``fallback``).

        Why our own future rather than run_coroutine_threadsafe's: a result that arrives after
        the caller cancelled must not be dropped on the floor when it holds buffers — ``release``
        gives them back — and the caller's cancel must reach the coroutine.
        """
        if self._closed:
            coro.close()
            raise LmtierError("this LocalStore is closed")
        if threading.get_ident() == getattr(self._thread, "ident", None):
            coro.close()
            raise LmtierError("LocalStore methods wait on its loop; call them from another thread")
        out: concurrent.futures.Future[T] = concurrent.futures.Future()
        task_box: list[asyncio.Task[T]] = []

        def deliver(task: asyncio.Task[T]) -> None:
            if task.cancelled():
                value = fallback
            else:
                exc = task.exception()
                if exc is None:
                    value = task.result()
                elif isinstance(exc, InvalidArgumentError):
                    if not out.done():
                        out.set_exception(exc)
                    return
                else:
                    log.warning("lmtier: %s failed (%s: %s); treated as a miss%s", op, type(exc).__name__, exc,
                                f" (request {request_id})" if request_id else "")
                    value = fallback
            try:
                out.set_result(value)
            except concurrent.futures.InvalidStateError:  # the caller cancelled meanwhile
                if release is not None and value is not fallback:
                    release(value)

        def start() -> None:
            if out.cancelled():
                coro.close()
                if on_cancel is not None:
                    on_cancel()
                return
            task = self.loop.create_task(coro)
            task_box.append(task)
            task.add_done_callback(deliver)

        def cancelled(f: concurrent.futures.Future[T]) -> None:
            if f.cancelled() and task_box:
                self.loop.call_soon_threadsafe(task_box[0].cancel)

        out.add_done_callback(cancelled)
        with self._pending_lock:
            self._pending.add(out)
        out.add_done_callback(self._forget)
        self.loop.call_soon_threadsafe(start)
        return out

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._pending_lock:
            self._pending.discard(fut)


class ResidencyLog:
    """A bounded, thread-safe log of residency changes between two takes (tiers report from any thread):
    :meth:`note` is a :meth:`~lmtier.manager.StorageManager.add_residency_listener` listener."""

    def __init__(self) -> None:
        from collections import deque

        self._events: deque[Residency] = deque(maxlen=RESIDENCY_BACKLOG)
        self._dropped = 0
        self._lock = threading.Lock()

    def note(self, tier: str, keys: Sequence[ChunkKey], held: bool) -> None:
        with self._lock:
            for key in keys:
                if len(self._events) == self._events.maxlen:
                    self._dropped += 1
                self._events.append(Residency(key, tier, held))

    def take(self) -> tuple[list[Residency], int]:
        with self._lock:
            events, dropped = list(self._events), self._dropped
            self._events.clear()
            self._dropped = 0
        return events, dropped


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """A store's loop thread: runs the loop until it is stopped, then closes it."""
    try:
        loop.run_forever()
    finally:
        loop.close()


def _left(end: float | None) -> float | None:
    """Seconds left until ``end`` (``time.monotonic()``), never negative; None: no bound."""
    return None if end is None else max(0.0, end - time.monotonic())


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if loop.is_closed():
        return
    asyncio.run_coroutine_threadsafe(_end_loop(), loop)
    thread.join()
    loop.close()


async def _end_loop() -> None:
    """Cancel what still runs on the store's loop, let it unwind, then stop the loop."""
    await _cancel_tasks()
    asyncio.get_running_loop().stop()


async def _cancel_tasks(keep: Collection[asyncio.Task[Any]] = ()) -> None:
    """Cancel every task on this loop but the caller's and ``keep``, and let them unwind (bounded).

    Why: a store call that never ends would leave its caller's future unresolved, and a thread
    waiting on it (an engine's lookup) waiting forever; cancelled, each resolves as a miss.
    """
    me = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not me and task not in keep]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=_CLOSE_SLACK_S)


def _keys(keys: Sequence[ChunkKey]) -> list[ChunkKey]:
    from lmtier.keys import ChunkKey

    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise InvalidArgumentError(f"keys must be a sequence of ChunkKey, got {type(keys).__name__}")
    for k in keys:
        if not isinstance(k, ChunkKey):
            raise InvalidArgumentError(f"keys must be lmtier.ChunkKey, got {type(k).__name__}: {k!r:.80}")
    return list(keys)


def _sizes(sizes: Sequence[int]) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise InvalidArgumentError(f"sizes must be a sequence of ints, got {type(sizes).__name__}")
    out = []
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"sizes must be positive ints, got {size!r}")
        out.append(size)
    return out


def _pairs(items: Sequence[tuple[ChunkKey, Any]]) -> list[tuple[ChunkKey, Any]]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidArgumentError(f"items must be a sequence of (ChunkKey, buffer) pairs, got {type(items).__name__}")
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidArgumentError(f"each item must be a (ChunkKey, buffer) pair, got {item!r:.80}")
    _keys([k for k, _ in items])
    return [(k, v) for k, v in items]


def _check_timeout(timeout_s: float | None) -> None:
    if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s > 0):
        raise InvalidArgumentError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
