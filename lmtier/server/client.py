"""ServerStore: the :class:`~lmtier.store.KVStore` of an engine process whose tiers live in ``lmtier serve``.

::

    store = ServerStore("unix:///run/lmtier/lmtier.sock", namespace=ns)
    hit = store.lookup(keys).result().hit_chunks
    chunks = store.reserve(sizes)                 # slab slots; fill chunk.tensor, then
    store.commit(list(zip(keys, chunks)))         # hand them over (returns at once)
    leases = store.fetch(keys, sizes).result()    # slab slots holding the values; read, then
    for c in leases: c and c.release()

**Data plane.** At connect the server sends the slab's descriptor; the client maps it once. A
:class:`SlabChunk` is a slot of that mapping: ``.tensor`` / ``.view()`` are views of the client's
own mapping of the slab, so the engine copies KV pages straight between its cache and the slab
(on CUDA the mapping is page-locked with ``cudaHostRegister`` first, in the background: until it
is, the store answers misses). KV bytes never cross the socket.

**Deadlines, faults, reconnects.** Every call has a deadline (the ``*_timeout_s`` arguments, or
the call's ``timeout_s``). A server that is down, restarting or frozen is a miss — ``lookup`` 0
hits, ``fetch`` ``None``, ``reserve`` ``None`` (the store is skipped), ``commit`` 0 — never an
exception and never a wait past the deadline:

* connection lost (server exit, crash, ``kill -9``): every call in flight is a miss at once; a
  background task reconnects (backoff ``retry_min_s`` … ``retry_max_s``) and maps the new slab.
  Chunks of the old slab stay readable (their mapping lives until they are released) and their
  release is a no-op (the dead server released everything);
* a call misses its deadline (server frozen, ``SIGSTOP``): the store treats the server as
  unresponsive — later calls are misses at once instead of each waiting its deadline — and pings
  it in the background; the first answer makes it usable again. Late replies that carry slots
  are released at once.

**Threads.** The store runs an asyncio loop on a thread of its own: it reads every reply, runs
the deadline timers and reconnects. The hit path's calls (``lookup``, ``fetch``) write their
request from the caller's thread and are completed by the loop as their reply is read, and a
released slot goes out with the next release message from the releasing thread (one in flight per
connection): the caller never waits for the loop thread to wake up, which on a busy machine cost
more than the server's own work (see ``docs/server.md``, Measured).

**Namespaces.** :meth:`ServerStore.register_namespace` (:class:`~lmtier.store.SupportsNamespaces`,
called by the engine) tells the server what a namespace's bytes are and returns the namespace to
key under, which names the server's lossy codecs if it has any (``docs/codecs.md``); the store
registers its namespaces again after each reconnect. A server that is not reachable then, or that
predates the op, leaves the namespace as it is: its lossy tiers store those chunks raw.

**Read costs.** Each lookup reply carries the server's learned read cost of each tier; the store
keeps the latest (:meth:`ServerStore.read_costs`, :class:`~lmtier.cost.SupportsReadCosts`), so the
engine weighs a hit held by a slow server tier as it does with local tiers. A value that is not
a finite cost >= 0 is left out (that tier is "not learned yet": its hits load).

Metrics (the ``metrics`` registry): ``lmtier_server_client_connected``,
``lmtier_server_client_reconnects_total``, ``lmtier_server_client_misses_total{op,reason}``.
Log lines (logger ``lmtier.server.client``) mark each change of state, not each miss.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Collection, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from lmtier.cost import ReadCost
from lmtier.errors import InvalidArgumentError, LmtierError, NotSupportedError
from lmtier.keys import ChunkKey
from lmtier.server import protocol as p
from lmtier.server.slab import Slab
from lmtier.store import HostChunk, LookupResult, Residency

if TYPE_CHECKING:
    import torch
    from prometheus_client.core import Metric

    from lmtier.config import LmtierConfig
    from lmtier.keys import KVNamespace
    from lmtier.metrics import Metrics
    from lmtier.protocol import Buffer

__all__ = ["ServerStore", "SlabChunk", "parse_address"]

log = logging.getLogger("lmtier.server.client")
T = TypeVar("T")
#: Bytes queued for a server that does not read before the connection is given up as broken.
_MAX_OUTBOX = 8 << 20


def parse_address(address: str) -> str:
    """The socket path of ``unix:///abs/path.sock``; InvalidArgumentError for anything else."""
    if not isinstance(address, str) or not address.startswith("unix://") or not address[7:].startswith("/"):
        raise InvalidArgumentError(
            f"server address {address!r}: expected unix:///absolute/path/to/lmtier.sock (the --socket of lmtier serve)")
    return address[len("unix://"):]


class SlabChunk:
    """A slot of the server's slab, lent to this process: a lease (read-only) or a reservation.

    Satisfies :class:`~lmtier.store.HostChunk`. ``tensor`` and ``view()`` are valid until
    :meth:`release` (or, for a reservation, until it is committed).
    """

    __slots__ = ("_link", "_released", "_slab", "_store", "nbytes", "offset", "slot", "writable")

    def __init__(self, store: ServerStore, link: _Link, slot: int, offset: int, nbytes: int, *,
                 writable: bool) -> None:
        self._store = store
        self._link = link
        self._slab = link.slab
        self.slot = slot
        self.offset = offset
        self.nbytes = nbytes
        self.writable = writable
        self._released = False

    @property
    def tensor(self) -> torch.Tensor:
        """A flat uint8 tensor over the slot (this process's mapping of the slab)."""
        self._check()
        return self._slab.tensor_of(self.offset, self.nbytes)

    def view(self) -> memoryview:
        """A memoryview of the slot; read-only for a lease (other processes may be reading it)."""
        self._check()
        return self._slab.view(self.offset, self.nbytes, readonly=not self.writable)

    def release(self) -> None:
        """Give the slot back (exactly once)."""
        if self._released:
            raise LmtierError("SlabChunk released twice (or released after commit)")
        self._released = True
        self._store._chunk_done()
        self._store._send_release(self._link, [self.slot])

    def _handed_over(self) -> None:
        """A commit took the slot: no release message, the server owns it now."""
        self._released = True
        self._store._chunk_done()

    def _check(self) -> None:
        if self._released:
            raise LmtierError("use of a SlabChunk after its release")

    def __repr__(self) -> str:
        kind = "reservation" if self.writable else "lease"
        return f"SlabChunk({kind}, slot {self.slot}, {self.nbytes} bytes @ {self.offset})"


@dataclass(eq=False)
class _Link:
    """One connection to the server and the slab it announced."""

    sock: socket.socket
    slab: Slab
    server_pid: int
    loop: asyncio.AbstractEventLoop
    #: replies awaited, by request id: a loop future (:meth:`ServerStore._call`) or a caller's
    #: :class:`_Waiter` (:meth:`ServerStore._direct`); the loop thread completes both
    pending: dict[int, asyncio.Future[p.Reply] | _Waiter[Any] | _Released] = field(default_factory=dict)
    outbox: bytearray = field(default_factory=bytearray)
    usable: bool = False  # False until the slab is ready (CUDA registration) and while unresponsive
    closed: bool = False
    reader: asyncio.Task[None] | None = None
    releases: list[int] = field(default_factory=list)  # slots to release when the one in flight is answered
    releasing: bool = False  # a release message is in flight
    #: writes come from the loop and, for direct calls, from callers' threads: one at a time, and
    #: never on a closed socket (whose descriptor number the process may already have reused)
    wlock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, data: bytes) -> None:
        """Queue a whole frame (any thread); frames go out in order and are never cut by a cancellation."""
        with self.wlock:
            if self.closed:
                raise ConnectionError("connection closed")
            if self.outbox:
                self.outbox += data
            else:
                try:
                    sent = self.sock.send(data)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    return
                self.outbox += data[sent:]
                self.loop.call_soon_threadsafe(self._watch)  # the loop sends the rest when it can
            if len(self.outbox) > _MAX_OUTBOX:
                raise ConnectionError(f"the server has not read {len(self.outbox)} bytes of requests")

    def _watch(self) -> None:
        with self.wlock:
            if not self.closed and self.outbox:
                self.loop.add_writer(self.sock, self._flush)

    def _flush(self) -> None:
        with self.wlock:
            if self.closed:
                return
            try:
                sent = self.sock.send(self.outbox)
            except BlockingIOError:
                return
            except OSError:
                self.loop.remove_writer(self.sock)
                return
            del self.outbox[:sent]
            if not self.outbox:
                self.loop.remove_writer(self.sock)

    def close(self) -> None:
        """Close the socket and fail every reply awaited (on the loop thread)."""
        with self.wlock:
            if self.closed:
                return
            self.closed = True
            self.usable = False
            with contextlib.suppress(Exception):
                self.loop.remove_writer(self.sock)
            self.sock.close()
        pending = list(self.pending.values())
        self.pending.clear()
        for fut in pending:
            if not fut.done():
                fut.set_exception(ConnectionError("connection to the lmtier server lost"))


class _Waiter(Generic[T]):
    """A direct call's reply, awaited by the caller's thread on :attr:`out` (see :meth:`ServerStore._direct`).

    Completed on the loop thread, exactly once: by the reply (:meth:`set_result`), a lost connection
    (:meth:`set_exception`) or the deadline (:meth:`expire`); each turns what came into the call's
    answer with ``finish`` (None: a miss). An answer holding slots that the caller no longer wants
    (it cancelled :attr:`out`) is released at once.
    """

    __slots__ = ("_done", "errors", "finish", "link", "op", "out", "quiet", "rid", "store", "timer")

    def __init__(self, store: ServerStore, link: _Link, rid: int, op: str,
                 finish: Callable[[_Link | None, p.Reply | None], T], *, errors: bool = False,
                 quiet: bool = False) -> None:
        self.store, self.link, self.rid, self.op, self.finish = store, link, rid, op, finish
        self.errors, self.quiet = errors, quiet
        self.out: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.timer: asyncio.TimerHandle | None = None
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, reply: p.Reply) -> None:
        self._settle(self.store._answer(self.op, reply, quiet=self.quiet, errors=self.errors))

    def set_exception(self, exc: BaseException) -> None:
        self.store._count(self.op, "disconnected")
        self._settle(None)

    def expire(self) -> None:
        if self._done:
            return
        self.link.pending.pop(self.rid, None)
        self.store._count(self.op, "deadline")
        self.store._unresponsive(self.link, self.op)
        self._settle(None)

    def _settle(self, reply: p.Reply | None) -> None:
        if self._done:
            return
        self._done = True
        if self.timer is not None:
            self.timer.cancel()
        value = self.finish(self.link, reply)
        try:
            self.out.set_result(value)
        except concurrent.futures.InvalidStateError:  # the caller cancelled: nobody takes the slots
            if isinstance(value, list):
                for chunk in value:
                    if isinstance(chunk, SlabChunk):
                        chunk.release()


class _Released:
    """The reply awaited by a release message: logs a refusal, then sends what was released meanwhile."""

    __slots__ = ("_done", "link", "store")

    def __init__(self, store: ServerStore, link: _Link) -> None:
        self.store, self.link, self._done = store, link, False

    def done(self) -> bool:
        return self._done

    def set_result(self, reply: p.Reply) -> None:
        self._done = True
        if isinstance(reply, p.Error):  # our bug, not the server's: say so loudly
            log.error("lmtier: the server refused a release: %s [%s]", reply.message, reply.code)
        self.store._send_releases(self.link)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True  # the connection is gone, and with it every slot it held


class _Miss(Exception):
    """A call that ends as a miss; ``reason`` labels the metric."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ServerStore:
    """A :class:`~lmtier.store.KVStore` whose tiers live in ``lmtier serve`` (see the module doc).

    Args:
        address: ``unix:///path/to/lmtier.sock``.
        metrics: where the engine's counters go (default: the process-wide metrics).
        namespace, name: told to the server at hello, for its logs and ``/v1/status``.
        lookup_timeout_s, fetch_timeout_s, reserve_timeout_s, commit_timeout_s, flush_timeout_s:
            the deadline of each kind of call (a call's ``timeout_s`` may shorten it, not lengthen it);
            from a configuration, its ``server_timeout_s`` (:meth:`from_config`).
        connect_timeout_s: deadline of one connect + hello; the constructor waits for the first
            connection at most this long, then keeps trying in the background.
        register_cuda: page-lock the slab for the GPU (default: iff torch sees CUDA).
    """

    def __init__(self, address: str, *, metrics: Metrics | None = None, namespace: str = "", name: str = "",
                 lookup_timeout_s: float = 0.5, fetch_timeout_s: float = 5.0, reserve_timeout_s: float = 0.5,
                 commit_timeout_s: float = 30.0, flush_timeout_s: float = 60.0, connect_timeout_s: float = 2.0,
                 retry_min_s: float = 0.05, retry_max_s: float = 2.0, register_cuda: bool | None = None) -> None:
        self.address = address
        self.path = parse_address(address)
        for label, value in (("lookup_timeout_s", lookup_timeout_s), ("fetch_timeout_s", fetch_timeout_s),
                             ("reserve_timeout_s", reserve_timeout_s), ("commit_timeout_s", commit_timeout_s),
                             ("flush_timeout_s", flush_timeout_s), ("connect_timeout_s", connect_timeout_s),
                             ("retry_min_s", retry_min_s), ("retry_max_s", retry_max_s)):
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InvalidArgumentError(f"{label}={value!r} must be a positive, finite number of seconds")
        self.timeouts = {"lookup": lookup_timeout_s, "contains": lookup_timeout_s, "fetch": fetch_timeout_s,
                         "reserve": reserve_timeout_s, "commit": commit_timeout_s, "flush": flush_timeout_s,
                         "delete": reserve_timeout_s, "release": reserve_timeout_s, "ping": connect_timeout_s,
                         "stats": connect_timeout_s, "namespace": connect_timeout_s, "residency": lookup_timeout_s}
        self.connect_timeout_s = connect_timeout_s
        self.retry = (retry_min_s, retry_max_s)
        self.namespace = namespace
        self.name = name
        if register_cuda is None:
            import torch

            register_cuda = bool(torch.cuda.is_available())
        self.register_cuda = register_cuda
        from lmtier.metrics import default_metrics

        self._metrics = metrics or default_metrics()
        self._ids = itertools.count(1)
        self._link: _Link | None = None
        self._keeper: asyncio.Task[None] | None = None  # reconnects / probes while not usable
        self._closed = False
        self._outstanding = 0
        self._lock = threading.Lock()
        self._commits: set[concurrent.futures.Future[int]] = set()
        self.reconnects = 0
        self._tier_names: list[str] = []
        self._read_costs: dict[str, ReadCost] = {}  # replaced whole by each lookup reply
        #: namespaces registered (as the engine gave them), replayed after each reconnect
        self._namespaces: dict[KVNamespace, str] = {}
        self.misses: dict[tuple[str, str], int] = {}
        self._residency_link: _Link | None = None  # the connection residency was last taken on
        self._residency_off = False  # the server predates the residency op
        self._residency_asking = False  # a residency request is in flight
        self._residency_changes: list[Residency] = []  # arrived, not yet taken
        self._residency_lost = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lmtier-server-client", daemon=True)
        self._thread.start()
        self._collector = _ClientCollector(self)
        self._metrics.registry.register(self._collector)
        # wait (bounded) for the first connection, so that a fresh engine hits at once
        with contextlib.suppress(Exception):
            self._run(self._first_connect(), connect_timeout_s + 1.0)

    @classmethod
    def from_config(cls, config: LmtierConfig, *, metrics: Metrics | None = None, namespace: str = "",
                    name: str = "") -> ServerStore:
        """The client of the server ``config.server`` names, with the deadlines of its
        ``server_timeout_s`` (see :class:`~lmtier.config.ServerDeadlines`)."""
        if config.server is None:
            raise InvalidArgumentError("this configuration names no server (server: unix:///path/lmtier.sock)")
        d = config.server_timeout_s
        return cls(config.server, metrics=metrics, namespace=namespace, name=name, lookup_timeout_s=d.lookup,
                   fetch_timeout_s=d.fetch, reserve_timeout_s=d.reserve, commit_timeout_s=d.commit,
                   flush_timeout_s=d.flush, connect_timeout_s=d.connect)

    # -- KVStore -------------------------------------------------------------------------------
    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @property
    def tier_names(self) -> list[str]:
        """The server's tiers, hottest first, as of the last hello (empty before the first)."""
        return list(self._tier_names)

    def read_costs(self) -> dict[str, ReadCost | None]:
        """Each server tier's read cost as of the latest lookup reply (None: not learned yet).

        :class:`~lmtier.cost.SupportsReadCosts`; thread-safe (the map is replaced, never changed).
        """
        costs = self._read_costs
        return {name: costs.get(name) for name in self._tier_names}

    @property
    def connected(self) -> bool:
        """Whether calls go to the server now (connected, slab ready, answering)."""
        link = self._link
        return link is not None and link.usable

    def lookup(self, keys: Sequence[ChunkKey], *, tails: Sequence[ChunkKey] = (),
               timeout_s: float | None = None) -> concurrent.futures.Future[LookupResult]:
        raw = _wire_keys(keys)
        raw_tails = _wire_keys(tails)
        if not raw and not raw_tails:
            return _finished(LookupResult(0))
        return self._direct("lookup", lambda rid: p.Lookup(id=rid, keys=raw, tails=raw_tails),
                            self._deadline("lookup", timeout_s),
                            lambda link, reply: self._lookup_answer(raw, raw_tails, reply))

    def contains(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None) -> list[bool]:
        raw = _wire_keys(keys)
        return self._run(self._contains(raw, self._deadline("contains", timeout_s)))

    def reserve(self, sizes: Sequence[int], *, keys: Sequence[ChunkKey] | None = None
                ) -> list[HostChunk | None]:
        sizes = _sizes(sizes)
        raw = None
        if keys is not None:
            raw = _wire_keys(keys)
            if len(raw) != len(sizes):
                raise InvalidArgumentError(f"reserve of {len(sizes)} sizes with {len(raw)} keys")
        return self._run(self._reserve(sizes, raw, self._deadline("reserve", None)))

    def commit(self, items: Sequence[tuple[ChunkKey, Any]], *, request_id: str | None = None
               ) -> concurrent.futures.Future[int]:
        keys = _wire_keys([k for k, _ in _pairs(items)])
        chunks: list[SlabChunk] = []
        for _, chunk in items:
            if not isinstance(chunk, SlabChunk) or chunk._store is not self or not chunk.writable:
                raise InvalidArgumentError(
                    f"commit takes chunks reserved from this ServerStore, got {chunk!r:.80}; use put() for "
                    "other buffers")
            if chunk._released:
                raise InvalidArgumentError(f"commit of {chunk!r}, which was released or committed already")
        if len({id(c) for _, c in items}) != len(items):
            raise InvalidArgumentError("commit names one chunk twice")
        for _, chunk in items:
            chunk._handed_over()
            chunks.append(chunk)
        fut = self._submit(self._commit(keys, chunks, request_id, self._deadline("commit", None)))
        with self._lock:
            self._commits.add(fut)
        fut.add_done_callback(self._commit_done)
        return fut

    def _commit_done(self, fut: concurrent.futures.Future[int]) -> None:
        with self._lock:
            self._commits.discard(fut)

    def put(self, items: Sequence[tuple[ChunkKey, Buffer]], *, request_id: str | None = None
            ) -> concurrent.futures.Future[int]:
        from lmtier.buffers import as_bytes_view

        pairs = _pairs(items)
        _wire_keys([k for k, _ in pairs])
        views = [as_bytes_view(v) for _, v in pairs]
        chunks = self.reserve([v.nbytes for v in views]) if views else []
        filled: list[tuple[ChunkKey, HostChunk]] = []
        for (key, _), view, chunk in zip(pairs, views, chunks, strict=True):
            if chunk is None:
                continue
            chunk.view()[:] = view
            filled.append((key, chunk))
        if not filled:
            return _finished(0)
        return self.commit(filled, request_id=request_id)

    def fetch(self, keys: Sequence[ChunkKey], sizes: Sequence[int], *, timeout_s: float | None = None
              ) -> concurrent.futures.Future[list[HostChunk | None]]:
        raw = _wire_keys(keys)
        sizes = _sizes(sizes)
        if len(sizes) != len(raw):
            raise InvalidArgumentError(f"fetch of {len(raw)} keys with {len(sizes)} sizes")
        if not raw:
            return _finished([])
        return self._direct("fetch", lambda rid: p.Fetch(id=rid, keys=raw, sizes=sizes),
                            self._deadline("fetch", timeout_s),
                            lambda link, reply: self._fetch_answer(link, sizes, reply))

    def fetch_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer], *,
                   timeout_s: float | None = None) -> list[bool]:
        from lmtier.buffers import as_bytes_view

        views = [as_bytes_view(o) for o in outs]
        if any(v.readonly for v in views):
            raise InvalidArgumentError("fetch_into needs writable output buffers")
        chunks = self.fetch(keys, [v.nbytes for v in views], timeout_s=timeout_s).result()
        filled = []
        for view, chunk in zip(views, chunks, strict=True):
            if chunk is None:
                filled.append(False)
                continue
            try:
                view[:] = chunk.view()
            finally:
                chunk.release()
            filled.append(True)
        return filled

    def delete(self, keys: Sequence[ChunkKey]) -> None:
        raw = _wire_keys(keys)
        if raw:
            self._run(self._call("delete", lambda rid: p.Delete(id=rid, keys=raw), self._deadline("delete", None),
                                 quiet=True))

    def flush(self, timeout_s: float | None = None) -> None:
        """:meth:`KVStore.flush <lmtier.store.KVStore.flush>`: this client's commits in flight are
        answered first (a commit is sent behind its call; the server writes its tiers while
        answering it), then the server's background writes are flushed; each wait bounded."""
        with self._lock:
            commits = list(self._commits)
        deadline = self._deadline("flush", timeout_s)  # loop time (the loop's clock is monotonic)
        concurrent.futures.wait(commits, timeout=max(0.0, deadline - self._loop.time()))
        self._run(self._call("flush", lambda rid: p.Flush(id=rid), deadline, quiet=True))

    def clear(self, namespaces: Collection[str], *, timeout_s: float | None = None) -> dict[str, int | None]:
        """:meth:`KVStore.clear <lmtier.store.KVStore.clear>` in the server's tiers (the ``clear`` op
        with ``namespaces``); ``{}`` when the server does not answer in time (flush deadline)."""
        from lmtier.keys import namespace_set

        wanted = sorted(namespace_set(namespaces))
        reply = self._run(self._call("clear", lambda rid: p.Clear(id=rid, namespaces=wanted),
                                     self._deadline("flush", timeout_s), errors=True))
        if isinstance(reply, p.ClearReply) and reply.tiers is not None:
            return dict(reply.tiers)
        if isinstance(reply, p.ClearReply):  # a server that predates namespaces: it cleared its hot tier
            log.warning("lmtier serve (pid %s) predates namespace clears: it cleared its hot tier, every "
                        "namespace's chunks (%d)", self._link.server_pid if self._link else "?", reply.cleared)
            return {self._tier_names[0] if self._tier_names else "hot": reply.cleared}
        if isinstance(reply, p.Error):
            log.warning("lmtier serve refused clear of %s: %s [%s]", wanted, reply.message, reply.code)
        else:
            log.warning("lmtier serve did not clear namespace(s) %s within its deadline", wanted)
        return {}

    def server_status(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The server's ``/v1/status`` document over the socket, or None when it does not answer."""
        reply = self._run(self._call("stats", lambda rid: p.Stats(id=rid), self._deadline("stats", timeout_s),
                                     quiet=True))
        return reply.status if isinstance(reply, p.StatsReply) else None

    def register_namespace(self, kv: KVNamespace) -> KVNamespace:
        """:class:`~lmtier.store.SupportsNamespaces`: ``kv`` declaring the server's lossy codecs
        (itself when the server has none, predates the op, or does not answer in time).

        Raises :class:`~lmtier.errors.ConfigError` when the server refuses the KV (a lossy tier
        cannot quantize its dtype), naming the tier.
        """
        declared = self._run(self._register(kv, self._link), self.timeouts["namespace"] + 1.0)
        self._namespaces[kv] = declared.namespace
        return declared

    async def _register(self, kv: KVNamespace, link: _Link | None) -> KVNamespace:
        from lmtier.codecs.base import declare_lossy
        from lmtier.errors import ConfigError

        def make(rid: int) -> p.Namespace:
            return p.Namespace(id=rid, model=kv.model, kv_layout=kv.kv_layout, dtype=kv.dtype,
                               num_layers=kv.num_layers, block_size=kv.block_size, num_kv_heads=kv.num_kv_heads,
                               head_size=kv.head_size, page_bytes=kv.page_bytes, chunk_tokens=kv.chunk_tokens,
                               engine=kv.engine, tp_rank=kv.tp_rank, tp_world_size=kv.tp_world_size,
                               extra=list(kv.extra))

        reply = await self._call("namespace", make, self._deadline("namespace", None), link=link,
                                 even_if_unusable=True, quiet=True, errors=True)
        if isinstance(reply, p.Error):
            if reply.code == p.E_BAD_ARGUMENT:
                raise ConfigError(f"lmtier serve at {self.address}: {reply.message}")
            log.info("lmtier: lmtier serve at %s does not register namespaces (%s); its lossy tiers, if any, store "
                     "namespace %s raw", self.address, reply.code, kv.namespace)
            return kv
        if not isinstance(reply, p.NamespaceReply):
            log.warning("lmtier: lmtier serve at %s did not register namespace %s in time; its lossy tiers, if any, "
                        "store it raw", self.address, kv.namespace)
            return kv
        declared = declare_lossy(kv, (reply.lossy_codecs,) if reply.lossy_codecs else ())
        if declared.namespace != reply.namespace:  # another lmtier's namespace hash: trust neither
            log.error("lmtier: lmtier serve at %s names namespace %s for %s, this process computes %s; keying under "
                      "%s (lossy tiers store it raw)", self.address, reply.namespace, kv.namespace,
                      declared.namespace, kv.namespace)
            return kv
        return declared

    async def _register_again(self, link: _Link) -> None:
        """After a reconnect: the namespaces this store registered, told to the (new) server."""
        for kv, used in list(self._namespaces.items()):
            try:
                declared = await self._register(kv, link)
            except LmtierError as exc:
                log.error("lmtier: lmtier serve at %s refuses namespace %s now: %s", self.address, kv.namespace, exc)
                continue
            if declared.namespace != used:
                log.warning("lmtier: lmtier serve at %s now declares namespace %s as %s, this engine keys it as %s "
                            "(the server's lossy codecs changed, or it was not reachable when the engine opened): its "
                            "lossy tiers store these chunks raw until the engine restarts", self.address, kv.namespace, declared.namespace, used)

    def take_residency(self) -> tuple[list[Residency], int]:
        """:class:`~lmtier.store.SupportsResidency`: the server's changes that have arrived since the
        previous call. Never waits on the server (vLLM's KV events call it every worker step).

        Each call hands over what the earlier ``residency`` requests brought back and sends the next
        one (at most one in flight; its reply is read by the loop thread), so changes arrive one call
        late, and the first call starts the recording and answers none. A server that does not
        answer in time brings none (a frozen one costs the caller nothing); one that predates the op
        makes the call after it answered raise :class:`~lmtier.errors.NotSupportedError` (from then
        on, without asking). A new connection (a reconnect, a restarted server) starts afresh: the
        changes in between are lost, which the count of dropped changes says (at least 1).
        """
        if self._residency_off:
            raise NotSupportedError(f"lmtier serve at {self.address} does not report residency changes")
        with self._lock:
            out, lost = self._residency_changes, self._residency_lost
            self._residency_changes, self._residency_lost = [], 0
            asking, self._residency_asking = self._residency_asking, True
        if not asking:
            try:
                self._direct("residency", lambda rid: p.Residency(id=rid), self._deadline("residency", None),
                             self._residency_answer, errors=True, quiet=True)
            except LmtierError:  # closed meanwhile
                with self._lock:
                    self._residency_asking = False
        return out, lost

    def _residency_answer(self, link: _Link | None, reply: p.Reply | None) -> None:
        """A ``residency`` reply (or a miss: None), kept for the next :meth:`take_residency`."""
        try:
            if isinstance(reply, p.Error):
                if reply.code == p.E_UNKNOWN_OP:
                    log.info("lmtier: lmtier serve at %s does not report residency changes (an older server)",
                             self.address)
                    self._residency_off = True
                return
            if not isinstance(reply, p.ResidencyReply):
                return
            changes = []
            for raw, tier, held in reply.changes:
                namespace, digest = p.decode_key(raw)
                changes.append(Residency(ChunkKey(namespace, digest), tier, held))
            with self._lock:
                lost = int(self._residency_link is not None and link is not self._residency_link)
                self._residency_link = link
                self._residency_changes.extend(changes)
                self._residency_lost += reply.dropped + lost
        finally:
            with self._lock:
                self._residency_asking = False

    def outstanding(self) -> int:
        """Chunks handed out by this store and not yet released or committed (leak checks)."""
        return self._outstanding

    def stats(self) -> dict[str, Any]:
        link = self._link
        return {"connected": self.connected, "server_pid": link.server_pid if link else None,
                "slab_id": link.slab.slab_id if link else None, "slab_bytes": link.slab.size if link else None,
                "reconnects": self.reconnects, "outstanding": self._outstanding,
                "misses": {f"{op}:{reason}": n for (op, reason), n in sorted(self.misses.items())}}

    def close(self) -> None:
        """Wait (bounded by the commit deadline) for commits in flight, close the connection (the
        server releases what it still held), stop the thread. Idempotent."""
        if self._closed:
            return
        with self._lock:
            commits = list(self._commits)
        concurrent.futures.wait(commits, timeout=self.timeouts["commit"])
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
        with contextlib.suppress(KeyError):
            self._metrics.registry.unregister(self._collector)

    def __enter__(self) -> ServerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServerStore({self.address}, connected={self.connected})"

    # -- calls (on the loop) -------------------------------------------------------------------
    def _lookup_answer(self, raw: list[bytes], raw_tails: list[bytes], reply: p.Reply | None) -> LookupResult:
        if not isinstance(reply, p.LookupReply):
            return LookupResult(0)
        hit = min(reply.hit_chunks, len(raw))
        tiers = tuple(reply.tiers) if len(reply.tiers) == reply.hit_chunks else ()
        self._read_costs = _read_costs(reply.read_costs)
        tail_tiers: tuple[str | None, ...] = ()
        if raw_tails and hit == len(raw):
            got = reply.tail_tiers  # None from a server that predates tails: each tail is a miss
            tail_tiers = tuple(got) if got is not None and len(got) == len(raw_tails) else (None,) * len(raw_tails)
        return LookupResult(hit, tiers, tail_tiers)

    async def _contains(self, raw: list[bytes], deadline: float) -> list[bool]:
        if not raw:
            return []
        reply = await self._call("contains", lambda rid: p.Contains(id=rid, keys=raw), deadline)
        if not isinstance(reply, p.ContainsReply) or len(reply.present) != len(raw):
            return [False] * len(raw)
        return list(reply.present)

    async def _reserve(self, sizes: list[int], raw: list[bytes] | None, deadline: float) -> list[HostChunk | None]:
        if not sizes:
            return []
        link = self._link
        reply = await self._call("reserve", lambda rid: p.Reserve(id=rid, sizes=sizes, keys=raw), deadline)
        if not isinstance(reply, p.ReserveReply) or link is None:
            return [None] * len(sizes)
        return self._chunks(link, reply.slots, sizes, writable=True)

    async def _commit(self, raw: list[bytes], chunks: list[SlabChunk], request_id: str | None,
                      deadline: float) -> int:
        link = self._link
        live = [(k, c) for k, c in zip(raw, chunks, strict=True) if c._link is link]
        if len(live) < len(chunks):  # reserved from a connection that is gone: the server freed them
            self._count("commit", "stale", len(chunks) - len(live))
        if not live or link is None:
            return 0
        reply = await self._call("commit", lambda rid: p.Commit(id=rid, items=[(k, c.slot) for k, c in live],
                                                                 request_id=request_id), deadline,
                                 link=link, even_if_unusable=True)
        return reply.written if isinstance(reply, p.CommitReply) else 0

    def _fetch_answer(self, link: _Link | None, sizes: list[int], reply: p.Reply | None) -> list[HostChunk | None]:
        if not isinstance(reply, p.FetchReply) or link is None:
            return [None] * len(sizes)
        return self._chunks(link, reply.slots, sizes, writable=False)

    def _chunks(self, link: _Link, slots: list[p.Slot | None], sizes: list[int], *, writable: bool
                ) -> list[HostChunk | None]:
        if len(slots) != len(sizes):
            self._send_release(link, [s.slot for s in slots if s is not None])
            return [None] * len(sizes)
        out: list[HostChunk | None] = []
        for s, size in zip(slots, sizes, strict=True):
            if s is None or not 0 <= s.offset <= link.slab.size - size:
                if s is not None:
                    self._send_release(link, [s.slot])
                out.append(None)
                continue
            out.append(SlabChunk(self, link, s.slot, s.offset, size, writable=writable))
        with self._lock:
            self._outstanding += sum(c is not None for c in out)
        return out

    async def _call(self, op: str, make: Any, deadline: float, *, link: _Link | None = None,
                    even_if_unusable: bool = False, quiet: bool = False, errors: bool = False) -> p.Reply | None:
        """Send one request and wait for its reply until ``deadline``; None is a miss (counted).
        ``errors``: an :class:`~lmtier.server.protocol.Error` reply is returned (counted) instead."""
        link = link or self._link
        if link is None or link.closed or not (link.usable or even_if_unusable):
            self._count(op, "unavailable")
            return None
        rid = next(self._ids)
        fut: asyncio.Future[p.Reply] = self._loop.create_future()
        link.pending[rid] = fut
        try:
            link.write(p.encode(make(rid)))
            reply = await asyncio.wait_for(fut, max(0.0, deadline - self._loop.time()))
        except TimeoutError:
            self._count(op, "deadline")
            self._unresponsive(link, op)
            return None
        except (ConnectionError, OSError) as exc:
            self._count(op, "disconnected")
            self._lost(link, exc)
            return None
        finally:
            link.pending.pop(rid, None)
        return self._answer(op, reply, quiet=quiet, errors=errors)

    def _answer(self, op: str, reply: p.Reply, *, quiet: bool = False, errors: bool = False) -> p.Reply | None:
        """The reply to a call, or None for an :class:`~lmtier.server.protocol.Error` (counted, logged;
        returned instead with ``errors``)."""
        if isinstance(reply, p.Error):
            self._count(op, reply.code)
            level = logging.DEBUG if quiet else logging.ERROR
            log.log(level, "lmtier: the server refused %s: %s [%s]", op, reply.message, reply.code)
            return reply if errors else None
        return reply

    def _direct(self, op: str, make: Any, deadline: float, finish: Callable[[_Link | None, p.Reply | None], T],
                *, errors: bool = False, quiet: bool = False) -> concurrent.futures.Future[T]:
        """Send one request from the caller's thread; the future is completed by the loop thread
        when the reply is read, the deadline passes or the connection is lost (``finish`` of the
        reply, or of None for a miss). Never raises for a fault.

        Why not :meth:`_call` on the loop: the request leaves at once instead of after a wake-up of
        the loop thread and a task, and the reply completes the caller's future as it is read —
        two thread hand-overs and three loop turns fewer on the hit path (lookup, fetch)."""
        if self._closed:
            raise LmtierError("this ServerStore is closed")
        link = self._link
        if link is None or link.closed or not link.usable:
            self._count(op, "unavailable")
            return _finished(finish(link, None))
        rid = next(self._ids)
        waiter: _Waiter[T] = _Waiter(self, link, rid, op, finish, errors=errors, quiet=quiet)
        link.pending[rid] = waiter
        try:
            link.write(p.encode(make(rid)))
            self._loop.call_soon_threadsafe(self._arm, waiter, deadline)
        except (ConnectionError, OSError, RuntimeError) as exc:  # RuntimeError: the loop is closed
            link.pending.pop(rid, None)
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._lost, link, exc)
            self._count(op, "disconnected")
            return _finished(finish(link, None))
        return waiter.out

    def _arm(self, waiter: _Waiter[Any], deadline: float) -> None:
        """On the loop: the direct call's deadline (unless its answer came first)."""
        if not waiter.done():
            waiter.timer = self._loop.call_at(deadline, waiter.expire)

    # -- releases ------------------------------------------------------------------------------
    def _send_release(self, link: _Link, slots: list[int]) -> None:
        """Release ``slots`` (any thread); a dead connection freed them already.

        At most one release message is in flight per connection: slots released meanwhile wait for
        its reply and then go out together. So a retrieve that gives its chunks back one at a time
        sends one or two messages, from its own thread, and never wakes the loop thread on its path
        (a wake-up cost the caller ~0.2 ms each on a busy 2-core box: the loop thread takes the GIL);
        the reply is read by the loop later, off the caller's path."""
        if link.closed:
            return
        with self._lock:
            link.releases.extend(slots)
            if link.releasing:
                return
            link.releasing = True
        self._send_releases(link)

    def _chunk_done(self, n: int = 1) -> None:
        with self._lock:
            self._outstanding -= n

    def _send_releases(self, link: _Link) -> None:
        """Send the slots queued for release (any thread); called by the one in flight's reply."""
        with self._lock:
            slots, link.releases = link.releases, []
            if not slots or link.closed:
                link.releasing = False
                return
        rid = next(self._ids)
        link.pending[rid] = _Released(self, link)
        try:
            link.write(p.encode(p.Release(id=rid, slots=slots)))
        except (ConnectionError, OSError) as exc:  # the connection is gone: so are the slots it held
            link.pending.pop(rid, None)
            with contextlib.suppress(RuntimeError):  # the loop is closing: the connection goes with it
                self._loop.call_soon_threadsafe(self._lost, link, exc)

    # -- connection ----------------------------------------------------------------------------
    async def _first_connect(self) -> None:
        try:
            await self._connect()
        except Exception as exc:
            log.warning("lmtier: lmtier serve at %s is not reachable (%s); lookups are misses until it is, "
                        "retrying in the background", self.address, _why(exc))
            self._keep()

    async def _connect(self) -> None:
        """Connect, hello, map the slab (and register it for CUDA); installs the link when usable."""
        loop = self._loop
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await loop.sock_connect(sock, self.path)
                rid = next(self._ids)
                await loop.sock_sendall(sock, p.encode(p.Hello(id=rid, version=p.PROTOCOL_VERSION, pid=os.getpid(),
                                                               namespace=self.namespace, name=self.name)))
                body, fds = await _recv_frame_with_fds(loop, sock)
        except BaseException:
            sock.close()
            raise
        try:
            reply = p.decode_reply(body)
            if isinstance(reply, p.Error):
                raise p.ServerError(reply.code, reply.message)
            if not isinstance(reply, p.HelloReply) or len(fds) != 1:
                raise p.ServerError(p.E_BAD_MESSAGE, "the server's hello reply carries no slab descriptor")
            old = self._link
            if old is not None and old.slab.slab_id == reply.slab_id:
                slab = old.slab  # same server, same mapping (and CUDA registration)
                os.close(fds.pop())
            else:
                slab = Slab.from_fd(fds.pop(), reply.slab_bytes, reply.slab_id)
        except BaseException:
            for fd in fds:
                os.close(fd)
            sock.close()
            raise
        link = _Link(sock, slab, reply.server_pid, loop)
        self._tier_names = list(reply.tiers)
        link.reader = loop.create_task(self._read(link))
        if self._link is not None:
            self._link.close()
        self._link = link
        if self.register_cuda and not slab.cuda_registered:
            try:
                await asyncio.to_thread(slab.register_cuda)  # the store answers misses meanwhile
            except LmtierError as exc:  # still correct, only slower: copies go through the torch path
                log.error("lmtier: %s; GPU copies to and from the slab will not use the native kernel", exc)
        if link.closed:
            raise ConnectionError("the connection closed while the slab was being registered")
        if self._namespaces:  # before any chunk of this connection can reach a lossy tier
            await self._register_again(link)
        link.usable = True
        log.info("lmtier: connected to lmtier serve pid %d at %s (slab %s, %d MiB%s)", reply.server_pid,
                 self.address, reply.slab_id, slab.size >> 20, ", CUDA-registered" if slab.cuda_registered else "")

    async def _read(self, link: _Link) -> None:
        buf = bytearray()
        hdr = p.FRAME_HEADER.size
        try:
            while True:
                data = await self._loop.sock_recv(link.sock, 1 << 16)
                if not data:
                    raise ConnectionError("the server closed the connection")
                buf += data
                while len(buf) >= hdr:
                    (n,) = p.FRAME_HEADER.unpack_from(buf)
                    if len(buf) < hdr + n:
                        break
                    body = bytes(buf[hdr: hdr + n])
                    del buf[: hdr + n]
                    self._deliver(link, p.decode_reply(body))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._lost(link, exc)

    def _deliver(self, link: _Link, reply: p.Reply) -> None:
        fut = link.pending.pop(reply.id, None)
        if fut is not None and not fut.done():
            fut.set_result(reply)
            return
        # a reply nobody waits for any more (its call missed its deadline): give back its slots
        if isinstance(reply, (p.FetchReply, p.ReserveReply)):
            slots = [s.slot for s in reply.slots if s is not None]
            if slots:
                self._send_release(link, slots)

    def _lost(self, link: _Link, exc: BaseException) -> None:
        if link.closed:
            return
        link.close()
        if self._link is link and not self._closed:
            log.warning("lmtier: lost the connection to lmtier serve at %s (%s); requests are misses until it "
                        "is back, reconnecting", self.address, _why(exc))
            self._keep()

    def _unresponsive(self, link: _Link, op: str) -> None:
        if self._link is not link or not link.usable or self._closed:
            return
        link.usable = False
        log.warning("lmtier: lmtier serve at %s did not answer %s within its deadline; requests are misses "
                    "until it answers a ping", self.address, op)
        self._keep()

    def _keep(self) -> None:
        """Start the background task that brings the store back (reconnect or probe), once."""
        if self._keeper is None or self._keeper.done():
            self._keeper = self._loop.create_task(self._bring_back())

    async def _bring_back(self) -> None:
        delay = self.retry[0]
        while not self._closed:
            link = self._link
            if link is not None and link.usable:
                return
            if link is not None and not link.closed:
                # connected but unresponsive: probe it; a frozen server answers when it thaws
                reply = await self._call("ping", lambda rid: p.Ping(id=rid), self._loop.time() + delay + 0.5,
                                         link=link, even_if_unusable=True, quiet=True)
                if isinstance(reply, p.PingReply) and not link.closed:
                    link.usable = True
                    log.warning("lmtier: lmtier serve at %s answers again", self.address)
                    return
            else:
                try:
                    await self._connect()
                    self.reconnects += 1
                    return
                except Exception as exc:
                    log.debug("lmtier: reconnect to %s failed: %s", self.address, _why(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry[1])

    async def _shutdown(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(BaseException):
                await self._keeper
        link, self._link = self._link, None
        if link is not None:
            link.close()
            if link.reader is not None:
                link.reader.cancel()
                with contextlib.suppress(BaseException):
                    await link.reader

    # -- machinery -----------------------------------------------------------------------------
    def _deadline(self, kind: str, timeout_s: float | None) -> float:
        """Loop time by which a ``kind`` call answers: a call's ``timeout_s`` may shorten the store's
        deadline for that kind, never lengthen it (a server on this node that needs longer is unwell)."""
        t = self.timeouts[kind]
        if timeout_s is not None:
            if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
                raise InvalidArgumentError(f"timeout_s={timeout_s!r} must be a positive, finite number of seconds")
            t = min(t, timeout_s)
        return self._loop.time() + t

    def _count(self, op: str, reason: str, n: int = 1) -> None:
        with self._lock:  # direct calls count from callers' threads too
            self.misses[(op, reason)] = self.misses.get((op, reason), 0) + n

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise LmtierError("this ServerStore is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._submit(coro).result(timeout)


class _ClientCollector:
    """Prometheus series of one ServerStore, read at scrape time."""

    def __init__(self, store: ServerStore) -> None:
        self._store = store

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._store
        yield GaugeMetricFamily("lmtier_server_client_connected", "1 while the lmtier server answers",
                                value=float(s.connected))
        yield CounterMetricFamily("lmtier_server_client_reconnects", "Reconnections to the lmtier server",
                                  value=s.reconnects)
        misses = CounterMetricFamily("lmtier_server_client_misses", "Calls that ended as misses, by reason",
                                     labels=["op", "reason"])
        for (op, reason), n in list(s.misses.items()):
            misses.add_metric([op, reason], n)
        yield misses


async def _recv_frame_with_fds(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, list[int]]:
    """One frame and the descriptors attached to it (SCM_RIGHTS), from a non-blocking socket."""
    buf = bytearray()
    fds: list[int] = []
    hdr = p.FRAME_HEADER.size
    while True:
        if len(buf) >= hdr:
            (n,) = p.FRAME_HEADER.unpack_from(buf)
            if not 0 < n <= p.MAX_FRAME_BYTES:
                raise p.ServerError(p.E_BAD_FRAME, f"the server sent a frame of {n} bytes")
            if len(buf) >= hdr + n:
                return bytes(buf[hdr: hdr + n]), fds
        ready = loop.create_future()
        loop.add_reader(sock, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(sock)
        try:
            data, anc, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4))
        except BlockingIOError:
            continue
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the server closed the connection during hello")
        buf += data


def _wire_keys(keys: Sequence[ChunkKey]) -> list[bytes]:
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise InvalidArgumentError(f"keys must be a sequence of ChunkKey, got {type(keys).__name__}")
    out = []
    for k in keys:
        if not isinstance(k, ChunkKey):
            raise InvalidArgumentError(f"keys must be lmtier.ChunkKey, got {type(k).__name__}: {k!r:.80}")
        out.append(p.encode_key(k.namespace, k.digest))
    return out


def _sizes(sizes: Sequence[int]) -> list[int]:
    out = []
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise InvalidArgumentError(f"chunk sizes must be positive ints, got {s!r}")
        out.append(int(s))
    return out


def _pairs(items: Sequence[tuple[ChunkKey, Any]]) -> list[tuple[ChunkKey, Any]]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidArgumentError(f"items must be a sequence of (ChunkKey, chunk) pairs, got {type(items).__name__}")
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidArgumentError(f"each item must be a (ChunkKey, chunk) pair, got {item!r:.80}")
        out.append((item[0], item[1]))
    return out


def _finished(value: T) -> concurrent.futures.Future[T]:
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    fut.set_result(value)
    return fut


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _read_costs(wire: dict[str, list[float]]) -> dict[str, ReadCost]:
    """A lookup reply's read costs; an entry that is not ``[latency_s, seconds_per_byte, samples]``
    of finite numbers >= 0 is dropped (that tier then counts as not learned: its hits load)."""
    out: dict[str, ReadCost] = {}
    for name, entry in wire.items():
        try:
            latency, per_byte, samples = (float(x) for x in entry)
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(x) and x >= 0 for x in (latency, per_byte, samples)):
            out[name] = ReadCost(latency, per_byte, int(samples))
    return out
