"""StorageManager: a chain of tiers behind one async, batched, fault-tolerant API.

Data flow (hottest tier first, as listed in the config):

* ``lookup(keys)`` — how many *leading* keys are present in any tier (prefix semantics).
* ``get(keys)`` — asks each tier in turn for the keys still missing; hits found in a colder tier
  are promoted into hotter tiers (``promote: true``) in the background.
* ``get_into(keys, outs)`` — the same into caller buffers; ``fetch(keys, sizes)`` — into host
  buffers the manager lends (:class:`~lmtier.memory.HostBuffer`, released by the caller). Both
  read a tier that implements :class:`~lmtier.protocol.SupportsGetInto` straight into the
  destination (one host copy per hit). ``fetch`` is the zero/one-copy path: a hit in a tier that
  lends its memory (the cpu tier) is that memory, retained; a colder tier's hit is written once,
  into a buffer carved from the hot tier's memory (:class:`~lmtier.protocol.SupportsAllocate`),
  which the hot tier then adopts as its promotion — no second copy.
* ``reserve(sizes)`` — writable buffers for chunks about to be put (the hot tier's memory, so its
  ``put`` adopts them, else the process's host pool).
* ``put(items)`` — lands in the hottest tier, then in every ``write: through`` tier (awaited) and
  every ``write: async`` tier (bounded background queue: when it is full the write is dropped,
  counted and logged — a slow tier never blocks the caller). ``skip_present=True`` first asks
  each tier which keys it holds already and writes only the others.

**The host pool.** Buffers the manager lends that are not carved from the hot tier (the hot tier
cannot allocate, is full, or is not pinned where CUDA is) come from one
:class:`~lmtier.memory.HostMemoryPool` per manager (:attr:`host_pool`, ``host_pool_bytes``),
created on first use and pinned where CUDA is available.

**In-memory tiers are called inline.** A tier that implements
:class:`~lmtier.protocol.SupportsAllocate` lives in this process's memory and never waits on I/O:
its calls run inline on the loop, without a deadline, so a put there is visible to the very next
call (no other coroutine runs in between).
* Eviction — backends that evict (:class:`~lmtier.protocol.SupportsEvictionListener`) hand the
  evicted chunk to the manager, which demotes it into the next tier if that tier lacks the key.
* Residency — :meth:`add_residency_listener` hears, tier by tier, every write that landed and
  every chunk evicted or deleted (what :class:`~lmtier.store.SupportsResidency` reports).

Faults are misses: a :class:`~lmtier.errors.BackendError` (or any unexpected exception from a
third-party backend) becomes a miss or a skipped write, with a metric and a log line — per key: a
call of several keys that fails on an error the tier answered with is asked again key by key, so
one refused key costs that key only (:meth:`_calls`). Tiers that
raise :class:`~lmtier.errors.BackendUnavailableError` repeatedly trip their circuit breaker and
are skipped until a probe succeeds. Only bad input (:class:`~lmtier.errors.InvalidArgumentError`)
reaches the caller.

**Deadlines.** Every tier call has a deadline per kind of call (``timeout_s`` of the tier:
:class:`~lmtier.config.Deadlines`), and read calls also take the caller's budget
(``timeout_s=``). The manager enforces it itself, for every backend, whatever its client library
does: at the deadline the caller gets its answer (a miss, a skipped write) and the call is
*detached* — left to end in the background, counted (``lmtier_tier_deadline_misses_total``,
``lmtier_tier_detached_calls``) and logged when it ends. A call that touches no caller memory
(contains, get, delete) is also cancelled; one that does (put reads its values, get_into writes
its buffers) is not, and every :class:`~lmtier.memory.HostBuffer` it was given stays referenced
until it really ends, so no half-written buffer is ever reused or shown as a hit. A missed
deadline of the tier's own opens its circuit at once (a frozen server costs one caller one
deadline, not three); a tier with :data:`MAX_DETACHED` calls still stuck is skipped.
``get_into`` and ``put`` batches go out in slices of at most :data:`SLICE_BYTES`, up to
:data:`MAX_IN_FLIGHT` at once, and the deadline bounds the wait for progress (some slice
completing) rather than a whole large transfer.

**A tier that is down at start.** Opening a tier waits at most its ``open`` deadline. A tier
whose service is unreachable, refuses, is frozen or times out then (``BackendUnavailableError``,
``BackendTimeoutError``, or no answer by the deadline) is kept in the chain *down*: its calls are
misses and skipped writes at once (reason ``down``), ``lmtier_tier_up{tier}`` is 0, one warning
says so, and a background task re-opens it with backoff (:data:`REOPEN_FIRST_S` doubling to
:data:`REOPEN_MAX_S`); once open it serves like any tier and an info line says so. A wrong
configuration (``ConfigError``: bad credentials, a missing bucket, an invalid URL;
``CapacityError``) still raises from :meth:`StorageManager.from_config`: it must be loud.

All methods must be called from the event loop the manager was opened on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast

from lmtier.breaker import CircuitBreaker
from lmtier.buffers import as_bytes_view, writable_bytes_view
from lmtier.codecs.base import LOSSY_FIELD
from lmtier.config import LmtierConfig, TierConfig, load_config
from lmtier.cost import ReadCost, TierReadEstimator
from lmtier.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    CorruptDataError,
    InvalidArgumentError,
    LmtierError,
)
from lmtier.keys import ChunkKey, namespace_set
from lmtier.memory import HostBuffer, HostMemoryPool, lent_buffer, release_all
from lmtier.metrics import Metrics, default_metrics
from lmtier.protocol import (
    Buffer,
    Capabilities,
    StorageBackend,
    SupportsAllocate,
    SupportsClear,
    SupportsCodecs,
    SupportsEvictionListener,
    SupportsGetInto,
    SupportsStats,
    optional_capabilities,
)
from lmtier.registry import BackendRegistry

if TYPE_CHECKING:
    import os

    from prometheus_client import CollectorRegistry

    from lmtier.codecs.base import KVGeometry, ValueCodec
    from lmtier.keys import KVNamespace
    from lmtier.kit.runner import WorkerPool

__all__ = ["CODEC_SLICE_BYTES", "LOSSY_FIELD", "MAX_DETACHED", "MAX_IN_FLIGHT", "REOPEN_FIRST_S", "REOPEN_MAX_S",
           "SLICE_BYTES", "StorageManager", "Tier"]

log = logging.getLogger("lmtier")
T = TypeVar("T")
Item = tuple[ChunkKey, Buffer]
#: ``listener(tier_name, keys, held)``: see :meth:`StorageManager.add_residency_listener`.
ResidencyListener = Callable[[str, Sequence[ChunkKey], bool], None]
#: What ``put`` accepts: a HostBuffer is not a buffer-protocol object before Python 3.12, but the
#: engine stages chunks in them (and the cpu tier adopts those carved from its own slab).
PutItem = tuple[ChunkKey, Buffer | HostBuffer]

#: get_into and put batches are sent to a tier in slices of at most this many bytes (at least one
#: item each), one after the other, each with the tier's whole deadline for its kind.
SLICE_BYTES = 64 << 20
#: A tier with this many calls still running past their deadlines gets no new ones until some end:
#: each may hold a worker thread, a connection and buffers.
MAX_DETACHED = 32
#: Slices of one get_into or put batch in flight at once (each a backend call of its own).
MAX_IN_FLIGHT = 4
#: A codec tier's batches are encoded and written (read and decoded) in slices of about this many
#: raw bytes, up to MAX_IN_FLIGHT at once: one slice's encoding overlaps another's transfer, so a
#: tier whose speed is its bytes gains the codec's ratio instead of adding its time.
CODEC_SLICE_BYTES = 8 << 20
#: A tier that was down at start is re-opened after this many seconds, then twice as long after
#: each failed try, up to REOPEN_MAX_S between tries.
REOPEN_FIRST_S = 1.0
REOPEN_MAX_S = 30.0
#: The operations whose batches teach a tier's read cost (lmtier.cost).
_READS = frozenset({"get", "get_into"})
#: Which deadline (:class:`~lmtier.config.Deadlines` field) bounds each backend operation.
_DEADLINE_OF = {"contains": "lookup", "get": "get", "get_into": "get", "put": "put", "delete": "delete"}
#: The operations of a caller's read (lookup, contains, get, get_into, fetch) that share its silence.
_CRITICAL = frozenset({"contains", "get", "get_into"})


@dataclass
class _Silence:
    """How long one caller's read (lookup, contains, get, get_into, fetch) has gone without any
    tier answering: ``since`` the last answer (or the start), ``stalled`` once a tier let a
    deadline pass without answering. A colder tier asked after a stall gets only what is left of
    its own deadline counted from ``since`` (and no blame when that runs out), so tiers frozen
    together (a partition: Redis and S3 both gone quiet) cost the caller one deadline, not one
    each. A tier asked after an answer gets its whole deadline, as ever."""

    since: float
    stalled: bool = False


#: The silence of the read this task is serving (set by the public read methods; see _calls).
_SILENCE: ContextVar[_Silence | None] = ContextVar("lmtier_silence", default=None)


class _Fault:
    """Sentinel result of a tier call that failed (already counted and logged)."""

    def __repr__(self) -> str:
        return "FAULT"


FAULT = _Fault()
#: Internal result of a call of several keys that raised an error worth asking again key by key.
_SPLIT = _Fault()


@dataclass
class _PerKeyWrite:
    """The merged answer of a put asked again key by key: per item, whether it landed, and what
    each call returned (a codec tier's put returns the bytes it stored)."""

    landed: list[bool]
    returned: list[Any]


@dataclass
class _Part(Generic[T]):
    """One backend call of an operation: its argument, the items it writes, the memory it uses."""

    arg: T
    writes: int = 0
    holds: Sequence[object] = ()


@dataclass
class _Job:
    kind: Literal["write", "promote", "demote"]
    items: list[Item]
    check: bool = False  # ask the tier which keys it holds first, write only the others


class _Down:
    """What stands in a tier's place while its backend could not be opened (see the module doc).

    Never called: the manager skips a tier that is not up before asking it. A plain
    :class:`~lmtier.protocol.StorageBackend` with no optional capability, so nothing is assumed
    of the backend until it is really open."""

    def __init__(self, why: str) -> None:
        self.why = why

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def _down(self) -> BackendUnavailableError:
        return BackendUnavailableError(f"the tier is down ({self.why}); it is being re-opened")

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        raise self._down()

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        raise self._down()

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        raise self._down()

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        raise self._down()

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> _Down:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


@dataclass
class Tier:
    """One tier of the chain: its config, backend, breaker and background writer."""

    index: int
    config: TierConfig
    backend: StorageBackend
    breaker: CircuitBreaker
    queue: asyncio.Queue[_Job] = field(repr=False)
    writer: asyncio.Task[None] | None = field(default=None, repr=False)
    #: calls left running past their deadline (see the module doc), until they end
    detached: set[asyncio.Task[Any]] = field(default_factory=set, repr=False)
    #: background jobs the writer took off ``queue`` and has not finished (0 or 1)
    writing: int = 0
    #: the tier's value codec (``codec:`` in its config), None for raw
    codec: ValueCodec | None = None
    #: the tier's read cost, learned from its get/get_into calls (lmtier.cost)
    reads: TierReadEstimator = field(default_factory=TierReadEstimator, repr=False)
    #: False while the backend could not be opened (``backend`` is then a stand-in, never called)
    up: bool = True
    #: re-opens a tier that is down, in the background (see the module doc)
    reopener: asyncio.Task[None] | None = field(default=None, repr=False)
    #: the open attempt in progress (the re-opener's), so close can reclaim what it opens
    opening: asyncio.Task[StorageBackend] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def lends_memory(self) -> bool:
        """An in-process tier that hands out its own memory (allocate, lease views): called inline."""
        return isinstance(self.backend, SupportsAllocate)


class StorageManager:
    """The chain of tiers. Build with :meth:`from_config` (opens the backends)."""

    def __init__(
        self,
        tiers: Sequence[tuple[TierConfig, StorageBackend]],
        *,
        config: LmtierConfig | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        pin_host_memory: bool | None = None,
        registry: BackendRegistry | None = None,
    ) -> None:
        """``pin_host_memory``: whether buffers the manager lends must be pinned (page-locked) —
        its host pool, and hot-tier memory it hands out; ``None``: where CUDA is available. A
        process that must never touch the GPU (``lmtier serve``) passes ``False``."""
        if not tiers:
            raise InvalidArgumentError("a StorageManager needs at least one tier")
        self._registry = registry
        codecs = self._tier_codecs(tiers)
        self.config = config
        self.metrics = metrics or default_metrics()
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closed = False
        self._finishing: set[asyncio.Task[None]] = set()  # closes a bounded aclose left running
        self._host_pool: HostMemoryPool | None = None
        self._pinned: bool | None = pin_host_memory
        self._decoders: dict[int, ValueCodec] | None = None
        #: tiers whose reads met another process's encoded values (logged once at warning, then debug)
        self._foreign_codecs_logged: set[str] = set()
        self._codec_pool: WorkerPool | None = None
        #: namespaces engines registered: what lossy codecs know of their KV, and what they declare
        self._kv: dict[str, tuple[KVGeometry, frozenset[str]]] = {}
        self._residency: list[ResidencyListener] = []
        self.tiers: list[Tier] = []
        for i, (tcfg, backend) in enumerate(tiers):
            b = tcfg.breaker
            tier = Tier(i, tcfg, backend, CircuitBreaker(b.failures, b.cooldown_s, b.max_cooldown_s, clock),
                        asyncio.Queue(maxsize=tcfg.queue_depth), codec=codecs[i],
                        reads=TierReadEstimator(seed_bytes_per_s=tcfg.read_bytes_per_s,
                                                seed_latency_s=tcfg.read_latency_s))
            tier.writer = self._loop.create_task(self._drain(tier), name=f"lmtier-writer-{tcfg.name}")
            self.tiers.append(tier)
            self._attach(tier)
            self.metrics.declare_tier(tcfg.name)
            self._export_reads(tier)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    async def from_config(
        cls,
        config: str | os.PathLike[str] | Mapping[str, Any] | LmtierConfig | None = None,
        *,
        registry: BackendRegistry | None = None,
        metrics_registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> StorageManager:
        """Validate ``config`` (both phases) and open every tier, hottest first.

        Each tier's open waits at most its ``open`` deadline. A tier whose service is down or
        silent (``BackendUnavailableError``, ``BackendTimeoutError``, no answer in time) starts
        *down* and is re-opened in the background (see the module doc); any other error (a wrong
        configuration: ``ConfigError``, ``CapacityError``) propagates, after the tiers already
        opened are closed.
        """
        cfg = load_config(config)
        registry = registry or BackendRegistry.discover()
        options = cfg.validate_backends(registry)
        opened: list[tuple[TierConfig, StorageBackend]] = []
        #: tier index -> (how to open it, the attempt still running or None, why it is down)
        down: dict[int, tuple[Callable[[], Coroutine[Any, Any, StorageBackend]],
                              asyncio.Task[StorageBackend] | None, str]] = {}

        attempts: list[asyncio.Task[StorageBackend]] = []  # opens still running, reclaimed on failure

        async def discard() -> None:
            for _, backend in opened:
                await backend.aclose()
            await _reclaim(attempts)

        try:
            for i, (tcfg, opts) in enumerate(zip(cfg.tiers, options, strict=True)):
                def open_tier(name: str = tcfg.backend, opts: Any = opts, path: str = f"tiers[{i}].options",
                              ) -> Coroutine[Any, Any, StorageBackend]:
                    return registry.create(name, opts, path=path)

                attempt = asyncio.get_running_loop().create_task(open_tier(), name=f"lmtier-open-{tcfg.name}")
                attempts.append(attempt)
                # a client stuck in a handshake may not heed cancellation: wait, never cancel
                await asyncio.wait({attempt}, timeout=tcfg.timeout_s.open)
                if attempt.done():  # its outcome is handled here
                    attempts.remove(attempt)
                else:
                    why = f"no answer within its open deadline ({tcfg.timeout_s.open:g}s)"
                    down[i] = (open_tier, attempt, why)
                    opened.append((tcfg, _Down(why)))
                    continue
                try:
                    backend = attempt.result()
                except CapacityError as exc:  # e.g. a RAM tier larger than the memory free now
                    raise CapacityError(f"tier {tcfg.name!r} (tiers[{i}]): {exc}") from None
                except BackendUnavailableError as exc:  # the service, not the config: start it down
                    why = f"{type(exc).__name__}: {exc}"
                    down[i] = (open_tier, None, why)
                    opened.append((tcfg, _Down(why)))
                    continue
                opened.append((tcfg, backend))
        except BaseException:
            await discard()
            raise
        metrics = Metrics(metrics_registry) if metrics_registry is not None else None
        try:
            manager = cls(opened, config=cfg, metrics=metrics, clock=clock, registry=registry)
        except BaseException:
            await discard()
            raise
        for i, (reopen, pending, why) in down.items():
            manager._start_down(manager.tiers[i], reopen, pending, why)
        log.info("lmtier storage ready: %s", " -> ".join(f"{t.name}({t.config.backend})" for t in manager.tiers))
        for t in manager.tiers:  # a wrapper that drops a capability shows here
            if not t.up:
                continue
            log.info("lmtier tier %s (%s): optional capabilities: %s; codec: %s", t.name, t.config.backend,
                     ", ".join(optional_capabilities(t.backend)) or "none", t.config.codec.name)
        return manager

    def add_residency_listener(self, listener: ResidencyListener) -> None:
        """Call ``listener(tier_name, keys, held)`` for every change of what a tier holds from now on.

        ``held=True``: a write of ``keys`` landed in the tier (put, write-through, background
        write, promotion, demotion); ``held=False``: the tier evicted them (its eviction listener)
        or they were deleted there (a delete, a corrupt or wrong-size value). Called on the loop's
        thread, or on a backend's thread for evictions; it must be quick, thread-safe and must
        not raise or call back into the manager. Evictions a tier makes without telling
        (no :class:`~lmtier.protocol.SupportsEvictionListener`) and a tier's own ``clear`` are not
        heard.
        """
        self._residency.append(listener)

    def _note(self, tier: Tier, keys: Sequence[ChunkKey], held: bool) -> None:
        for listener in self._residency:
            try:
                listener(tier.name, keys, held)
            except Exception:  # a listener's bug must not fail a write or an eviction
                log.exception("lmtier: residency listener %r failed", listener)

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise InvalidArgumentError(f"no tier named {name!r}; tiers: {[t.name for t in self.tiers]}")

    # -- value codecs --------------------------------------------------------------------------
    def lossy_tags(self) -> tuple[str, ...]:
        """The tags (:meth:`~lmtier.codecs.ValueCodec.tag`) of the lossy codecs of this chain's
        tiers, sorted; empty when every tier is exact.

        Why the whole chain: a hit read from a lossy tier is promoted, decoded, into the hotter
        tiers, so any chunk of the chain may hold lossy KV. An engine whose chain has lossy tiers
        therefore keys all its chunks under a namespace that names them (:data:`LOSSY_FIELD` in
        :attr:`~lmtier.keys.KVNamespace.extra`: :meth:`declare_lossy`), and an engine without
        them never shares a key with it. See ``docs/codecs.md``.
        """
        return tuple(sorted({t.codec.tag() for t in self.tiers if t.codec is not None and t.codec.lossy}))

    def declare_lossy(self, kv: KVNamespace) -> KVNamespace:
        """``kv`` with this chain's lossy codecs named in its extra fields (itself when none, or
        when it names them already)."""
        from lmtier.codecs.base import declare_lossy

        return declare_lossy(kv, self.lossy_tags())

    def register_namespace(self, kv: KVNamespace) -> str:
        """Tell the tiers' codecs what the bytes of namespace ``kv.namespace`` are; returns it.

        A lossy tier encodes only values whose namespace was registered *and* declares its codec
        (:meth:`declare_lossy`); others it stores raw (``lmtier_codec_raw_values_total{reason=
        "namespace"}``), so lossy KV is never stored under a namespace that does not say so.
        Lossless codecs need no registration. Raises :class:`~lmtier.errors.ConfigError` when a
        lossy tier cannot encode this KV (e.g. a non-float dtype), naming the tier.
        """
        from lmtier.codecs.base import KVGeometry

        geometry = KVGeometry.of(kv)
        for t in self.tiers:
            if t.codec is not None and t.codec.lossy:
                reason = t.codec.check_kv(geometry)
                if reason is not None:
                    raise ConfigError(f"tiers[{t.index}] ({t.name}).codec: {reason}")
        declared = frozenset(v for k, v in kv.extra if k == LOSSY_FIELD for v in v.split(","))
        self._kv[kv.namespace] = (geometry, declared)
        return kv.namespace

    # -- public API ----------------------------------------------------------------------------
    async def lookup(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None) -> int:
        """Number of leading ``keys`` present in at least one tier.

        Each tier answers within its ``lookup`` deadline; ``timeout_s`` bounds the whole call
        (tiers not asked or not answered by then count as not holding the keys).
        """
        return len(await self.locate(keys, timeout_s=timeout_s))

    async def locate(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None) -> list[str]:
        """:meth:`lookup`, naming for each leading key present the hottest tier that holds it."""
        return (await self.locate_tails(keys, (), timeout_s=timeout_s))[0]

    async def locate_tails(self, keys: Sequence[ChunkKey], tails: Sequence[ChunkKey], *,
                           timeout_s: float | None = None) -> tuple[list[str], list[str | None]]:
        """:meth:`locate` of ``keys``, and where each of ``tails`` is when all of ``keys`` are present.

        ``tails`` are keys that would extend the prefix (a partial last chunk, stored under a key of
        its own); each tier is asked about them in the same call as about ``keys``, so probing them
        costs no call of its own. The second list names, for each tail, the hottest tier holding
        it (None: absent); it is empty unless every key of ``keys`` is present (a tail extends
        nothing past a gap). Deadlines as for :meth:`lookup`, for the whole call.
        """
        _check_keys(keys)
        _check_keys(tails)
        until = self._until(timeout_s)
        with self._one_read():
            return await self._locate(keys, tails, until)

    async def _locate(self, keys: Sequence[ChunkKey], tails: Sequence[ChunkKey], until: float | None
                      ) -> tuple[list[str], list[str | None]]:
        n = len(keys)
        asked = [*keys, *tails]
        where: list[str | None] = [None] * len(asked)
        first_missing = 0
        for tier in self.tiers:
            todo = [i for i in range(first_missing, len(asked)) if where[i] is None]
            if not todo:
                break
            found = await self._call(tier, "contains", tier.backend.contains, [asked[i] for i in todo], until=until)
            if found is FAULT:
                continue
            for i, hit in zip(todo, found, strict=True):
                if hit:
                    where[i] = tier.name
            while first_missing < n and where[first_missing] is not None:
                first_missing += 1
        self.metrics.lookup_chunks.inc(n)
        self.metrics.lookup_hit_chunks.inc(first_missing)
        log.debug("lookup: hit %d of %d chunks", first_missing, n)
        return cast("list[str]", where[:first_missing]), (where[n:] if first_missing == n else [])

    async def contains(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None) -> list[bool]:
        """Whether each key is present in any tier (``timeout_s``: as for :meth:`lookup`)."""
        _check_keys(keys)
        until = self._until(timeout_s)
        with self._one_read():
            return await self._contains(keys, until)

    async def _contains(self, keys: Sequence[ChunkKey], until: float | None) -> list[bool]:
        present = [False] * len(keys)
        for tier in self.tiers:
            todo = [i for i, p in enumerate(present) if not p]
            if not todo:
                break
            found = await self._call(tier, "contains", tier.backend.contains, [keys[i] for i in todo], until=until)
            if found is not FAULT:
                for i, hit in zip(todo, found, strict=True):
                    present[i] = bool(hit)
        return present

    async def held_hot(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether the hot tier holds each key, asked only where that waits on nothing: a tier
        that lends its memory (in this process, called inline). Otherwise (or when it fails) all
        ``False``: "not known to be held", which a store path then copies and ``put(...,
        skip_present=True)`` skips behind the call."""
        _check_keys(keys)
        hot = self.tiers[0]
        if not keys or not hot.lends_memory:
            return [False] * len(keys)
        held = await self._call(hot, "contains", hot.backend.contains, list(keys))
        return [False] * len(keys) if held is FAULT else [bool(h) for h in held]

    async def get(self, keys: Sequence[ChunkKey], *, timeout_s: float | None = None) -> list[Buffer | None]:
        """Values of ``keys`` from the hottest tier holding each, ``None`` for misses.

        Each tier answers within its ``get`` deadline; ``timeout_s`` bounds the whole call.
        """
        _check_keys(keys)
        until = self._until(timeout_s)
        with self._one_read():
            return await self._get(keys, until)

    async def _get(self, keys: Sequence[ChunkKey], until: float | None) -> list[Buffer | None]:
        results: list[Buffer | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        for tier in self.tiers:
            if not pending:
                break
            values = await self._call(tier, "get", tier.backend.get, [keys[i] for i in pending], until=until)
            if values is FAULT:
                self.metrics.misses.labels(tier.name).inc(len(pending))
                continue
            if tier.codec is not None or isinstance(tier.backend, SupportsCodecs):
                values = await self._decoded(tier, [keys[i] for i in pending], values)
            still: list[int] = []
            found: list[Item] = []
            nbytes = 0
            for i, value in zip(pending, values, strict=True):
                if value is None:
                    still.append(i)
                else:
                    results[i] = value
                    found.append((keys[i], value))
                    nbytes += memoryview(value).nbytes
            self.metrics.hits.labels(tier.name).inc(len(found))
            self.metrics.misses.labels(tier.name).inc(len(still))
            self.metrics.bytes_read.labels(tier.name).inc(nbytes)
            if found and tier.index > 0:
                self._promote(tier.index, found)
            pending = still
        hits = len(keys) - len(pending)
        log.debug("get: hit %d of %d chunks", hits, len(keys))
        return results

    async def put(self, items: Sequence[PutItem], *, skip_present: bool = False) -> int:
        """Store ``items`` in the hottest tier and flow them to colder tiers per write mode.

        Each item is a ``(ChunkKey, value)`` pair; a value is any C-contiguous host buffer, a
        :class:`~lmtier.memory.HostBuffer` or a CPU torch tensor. The whole batch is checked before
        anything is written: a malformed item raises :class:`~lmtier.errors.InvalidArgumentError`.
        With ``skip_present``, each tier is first asked which keys it holds (within its lookup
        deadline) and gets only the others. Returns how many items the hottest tier newly took
        (0 when its write failed).
        """
        _check_items(items)
        if not items:
            return 0
        items = list(items)
        # each value once as a kit Payload: the first tier that needs its checksum computes it, the
        # others (through, background) reuse it
        carried = None if all(t.lends_memory for t in self.tiers) else _carried(items)
        hottest, colder = self.tiers[0], self.tiers[1:]
        landed = await self._write(hottest, items, skip_present=skip_present, carried=carried)
        through = [t for t in colder if t.config.write == "through"]
        background = [t for t in colder if t.config.write == "async"]
        if background:
            stable = [(k, _stable(v)) for k, v in items]
            if carried is not None:
                stable = _carried(stable, like=carried)
            for tier in background:
                self._enqueue(tier, _Job("write", stable, check=skip_present))
        if through:
            await asyncio.gather(*(self._write(t, items, skip_present=skip_present, carried=carried)
                                   for t in through))
        return max(landed, 0)

    def reserve(self, sizes: Sequence[int]) -> list[HostBuffer | None]:
        """Writable host buffers of exactly ``sizes[i]`` bytes for chunks about to be put.

        Carved from the hot tier's memory where it can (:class:`~lmtier.protocol.SupportsAllocate`:
        its ``put`` then adopts them without a copy; allocating may evict its least recently used
        entries; ``None`` when it is full of memory still in use: a copy would not fit either),
        else (no such hot tier, or unpinned where CUDA is) from :attr:`host_pool`. Never waits on
        a tier. The caller fills them, puts them, and releases its reference either way.
        """
        sizes = _check_sizes(sizes)
        out: list[HostBuffer | None] = []
        try:
            for size in sizes:
                out.append(self._buffer(size, "store"))
        except BaseException:
            release_all(out)
            raise
        return out

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[object], *,
                       timeout_s: float | None = None) -> list[bool]:
        """Fill ``outs[i]`` with ``keys[i]``'s value from the hottest tier holding it.

        ``outs[i]`` is a writable host buffer (bytearray, numpy array, CPU tensor,
        :class:`~lmtier.memory.HostBuffer`) of exactly the stored size; a value of another size
        is a miss. Tiers are asked hottest first, each within its ``get`` deadline (``timeout_s``
        bounds the whole call); a tier implementing ``get_into`` writes in place, others are
        copied from. Hits are promoted into hotter tiers (``promote: true``): by adoption where
        ``outs[i]`` is a buffer of the hot tier's own memory, else by a copy.

        A tier that misses its deadline is a miss for its keys; it may still be writing into the
        buffers it was given. HostBuffers are given to it directly and kept out of circulation
        (retained) until it ends; other buffers are never handed to a tier that may outlive the
        call — it writes into a host-pool buffer, copied into ``outs[i]`` only on success (one
        more copy). So after a ``False`` nothing writes ``outs[i]`` any more.
        """
        _check_keys(keys)
        if len(keys) != len(outs):
            raise InvalidArgumentError(f"get_into got {len(keys)} keys but {len(outs)} buffers")
        views = [writable_bytes_view(o) for o in outs]
        until = self._until(timeout_s)
        with self._one_read():
            return await self._get_into(keys, outs, views, until)

    async def _get_into(self, keys: Sequence[ChunkKey], outs: Sequence[object], views: list[memoryview],
                        until: float | None) -> list[bool]:
        filled = [False] * len(keys)
        pending = list(range(len(keys)))
        for tier in self.tiers:
            if not pending:
                break
            got = await self._tier_into(tier, keys, pending, outs, views, until)
            pending = [i for i in pending if i not in got]
            for i in got:
                filled[i] = True
            if got and tier.index > 0:
                await self._promote_filled(tier.index, [(keys[i], outs[i]) for i in sorted(got)])
        log.debug("get_into: hit %d of %d chunks", sum(filled), len(keys))
        return filled

    async def fetch(self, keys: Sequence[ChunkKey], sizes: Sequence[int], *,
                    timeout_s: float | None = None) -> list[HostBuffer | None]:
        """Host buffers holding ``keys[i]``'s value (exactly ``sizes[i]`` bytes), ``None`` for a miss.

        The caller owns one reference to each buffer returned and releases it. A hit in a tier that
        lends its memory (the cpu tier) is that memory (zero copy); a colder tier's hit is written
        once, into a buffer :meth:`reserve` would give (preferably the hot tier's memory, which then
        adopts it as the promotion). A stored value of another size is a miss and is deleted.
        Deadlines as for :meth:`get_into`: a buffer a late tier may still write is never returned.
        """
        _check_keys(keys)
        sizes = _check_sizes(sizes)
        if len(sizes) != len(keys):
            raise InvalidArgumentError(f"fetch of {len(keys)} keys with {len(sizes)} sizes")
        until = self._until(timeout_s)
        with self._one_read():
            return await self._fetch(keys, sizes, until)

    async def _fetch(self, keys: Sequence[ChunkKey], sizes: list[int], until: float | None) -> list[HostBuffer | None]:
        out: list[HostBuffer | None] = [None] * len(keys)
        pending = list(range(len(keys)))
        wrong: list[ChunkKey] = []
        try:
            for tier in self.tiers:
                if not pending:
                    break
                if tier.lends_memory or not isinstance(tier.backend, SupportsGetInto) or tier.codec is not None:
                    got = await self._fetch_get(tier, keys, sizes, pending, out, wrong, until)
                else:
                    got = await self._fetch_into(tier, keys, sizes, pending, out, until)
                pending = [i for i in pending if i not in got and keys[i] not in wrong]
                if got and tier.index > 0:
                    await self._promote_filled(tier.index, [(keys[i], out[i]) for i in sorted(got)])
        except BaseException:
            release_all(out)
            raise
        if wrong:
            log.warning("lmtier: %d stored value(s) had another size than asked; treated as misses and deleted",
                        len(wrong))
            await self.delete(list(dict.fromkeys(wrong)))
        log.debug("fetch: hit %d of %d chunks", sum(b is not None for b in out), len(keys))
        return out

    @property
    def host_pool(self) -> HostMemoryPool:
        """The manager's host pool (``host_pool_bytes``; pinned where CUDA is), made on first use."""
        if self._host_pool is None:
            size = int(self.config.host_pool_bytes) if self.config is not None else 256 << 20
            self._host_pool = HostMemoryPool(size, pin=self._want_pinned(), name="lmtier-host")
        return self._host_pool

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove ``keys`` from every tier (faults are logged and counted)."""
        _check_keys(keys)
        if keys:
            await asyncio.gather(*(self._call(t, "delete", t.backend.delete, list(keys)) for t in self.tiers))

    async def clear(self, tiers: Sequence[str] | None = None, *,
                    namespaces: Collection[str] | None = None) -> dict[str, int | None]:
        """Drop what tiers hold: every value, or every value of ``namespaces``.

        ``tiers`` names the tiers to clear (``None``: every tier). Queued background writes are
        flushed first, so none lands after its tier was cleared. Returns, for each tier asked
        (hottest first), how many values it dropped, or ``None`` for a tier whose backend cannot
        clear (no :class:`~lmtier.protocol.SupportsClear`: the remote stores, whose data others
        may share; delete it with their own tools), left as it was. A name that is no tier, a
        tier named explicitly that cannot clear, or a namespace that is not 16 hex digits is an
        :class:`~lmtier.errors.InvalidArgumentError` before anything is cleared. A tier's fault
        raises; the tiers before it stay cleared.
        """
        chosen = list(self.tiers) if tiers is None else [self.tier(name) for name in tiers]
        if tiers is not None:
            unable = [t.name for t in chosen if not isinstance(t.backend, SupportsClear)]
            if unable:
                raise InvalidArgumentError(
                    f"tier(s) {unable} cannot be cleared by lmtier (their backends share data with other "
                    "processes or hosts); delete their data with the store's own tools, or name other tiers")
        if namespaces is not None:
            namespaces = namespace_set(namespaces)
        await self.flush()
        out: dict[str, int | None] = {}
        for t in chosen:
            out[t.name] = await t.backend.clear(namespaces) if isinstance(t.backend, SupportsClear) else None
        which = "every value" if namespaces is None else f"the values of namespace(s) {sorted(namespaces)}"
        log.warning("lmtier: cleared %s from %s", which,
                    ", ".join(f"{name} ({n})" if n is not None else f"{name} (kept: cannot clear)"
                              for name, n in out.items()))
        return out

    async def flush(self) -> None:
        """Wait until every queued background write, promotion and demotion is done."""
        for tier in self.tiers:
            await tier.queue.join()

    async def settle(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``timeout_s``) until no detached call is running; True if none is left."""
        stuck = [task for t in self.tiers for task in t.detached]
        if stuck:
            await asyncio.wait(stuck, timeout=timeout_s)
        return not any(t.detached for t in self.tiers)

    async def aclose(self, *, settle_s: float = 10.0, timeout_s: float | None = None) -> None:
        """Drain background work, stop writers and close every backend. Idempotent.

        Calls detached at a deadline get ``settle_s`` to end (their backends' own timeouts end
        them); those still running then are cancelled before the backends close.

        ``timeout_s`` bounds the whole close (``None``: no bound). Background writes not done by
        then are dropped (logged, per tier), and tier calls that are still running — a frozen
        server's, that cancelling could not stop — are abandoned: logged and counted
        (``lmtier_tier_abandoned_calls_total``), their tier closed when they end, in the
        background on this loop, which must keep running for it (:meth:`wait_closed`;
        :class:`~lmtier.store.LocalStore` does so). The buffers they hold go back then.
        """
        if self._closed:
            return
        end = None if timeout_s is None else self._loop.time() + timeout_s

        def left(cap: float | None = None) -> float | None:
            rest = None if end is None else max(0.0, end - self._loop.time())
            return cap if rest is None else rest if cap is None else min(cap, rest)

        try:
            await asyncio.wait_for(self.flush(), left())
        except TimeoutError:
            dropped = {t.name: t.queue.qsize() + t.writing for t in self.tiers if t.queue.qsize() + t.writing}
            log.warning("lmtier: close: %d background write(s) not done by the close's deadline were dropped (%s)",
                        sum(dropped.values()), ", ".join(f"{k}: {v}" for k, v in dropped.items()))
        self._closed = True
        await self._stop_reopening(left(10.0) or 0.0)
        writers = [t.writer for t in self.tiers if t.writer is not None]
        for writer in writers:
            writer.cancel()  # a write in flight is detached (see _calls): settled below like the others
        if writers:
            await asyncio.wait(writers, timeout=left())
        for tier in self.tiers:  # what no writer will take: its values (lease views too) let go now
            while not tier.queue.empty():
                tier.queue.get_nowait()
                tier.queue.task_done()
        if not await self.settle(left(settle_s)):
            stuck = [task for t in self.tiers for task in t.detached]
            log.warning("lmtier: %d tier call(s) still stuck past their deadline at close; cancelling them",
                        len(stuck))
            for task in stuck:
                task.cancel()
            await asyncio.wait(stuck, timeout=left(1.0))
        closing: list[tuple[Tier | None, asyncio.Task[None]]] = [
            (t, self._loop.create_task(self._close_tier(t), name=f"lmtier-close-{t.name}")) for t in self.tiers]
        if self._codec_pool is not None:
            closing.append((None, self._loop.create_task(self._codec_pool.aclose(), name="lmtier-close-codecs")))
        # at least a moment: backends that close without waiting on I/O are never reported abandoned
        await asyncio.wait([task for _, task in closing], timeout=max(left() or 0.0, _CLOSE_GRACE_S)
                           if end is not None else None)
        if self._host_pool is not None:
            self._host_pool.close()  # frees its slab now, or when the last buffer out comes back
        late = [(tier, task) for tier, task in closing if not task.done()]
        if late:
            self._abandon(late)

    def _abandon(self, late: Sequence[tuple[Tier | None, asyncio.Task[None]]]) -> None:
        """A close's budget ran out while ``late`` tiers (None: the codec pool) were still closing:
        log and count what is abandoned, and keep the tasks until they end (:meth:`wait_closed`)."""
        tiers = [tier for tier, _ in late if tier is not None]
        calls = 0
        for tier in tiers:
            running = max(1, sum(not task.done() for task in tier.detached))  # at least the close itself
            calls += running
            self.metrics.abandoned_calls.labels(tier.name).inc(running)
        log.warning("lmtier: close: %d tier call(s) still running at the close's deadline were abandoned (%s); "
                    "their tiers close, and the buffers they hold go back, when they end",
                    calls, ", ".join(t.name for t in tiers) or "value codecs")
        for _, task in late:
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    async def _close_tier(self, tier: Tier) -> None:
        if isinstance(tier.backend, SupportsStats):
            self.metrics.remove_stats_source(tier.name, tier.backend.stats)
        try:
            await tier.backend.aclose()
        except Exception as exc:  # closing one tier must not leave the others open
            log.warning("lmtier tier %s: error while closing: %s", tier.name, exc)

    @property
    def late_closes(self) -> frozenset[asyncio.Task[None]]:
        """The closes of tiers a bounded :meth:`aclose` abandoned, still running (:meth:`wait_closed`)."""
        return frozenset(self._finishing)

    async def wait_closed(self) -> None:
        """Wait until what :meth:`aclose` abandoned at its budget has ended (at once if nothing)."""
        while self._finishing:
            await asyncio.wait(list(self._finishing))

    async def __aenter__(self) -> StorageManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def read_costs(self) -> dict[str, ReadCost | None]:
        """Each tier's learned read cost (None until it has read enough, unless seeded).

        Learned from the tier's reads: one sample per read batch (a ``get``, or a ``get_into``
        with all its 64 MiB slices in parallel: the wall time a caller waits), foreground loads
        and background promotions alike; a slice that misses its own deadline counts as read at
        that time (the batch was at least that slow). The engine weighs loading a hit against
        recomputing it with these (:mod:`lmtier.cost`). Thread-safe: may be called from any thread.
        """
        return {t.name: t.reads.cost() for t in self.tiers}

    def stats(self) -> dict[str, Any]:
        """Per-tier state for `lmtier doctor` and tests."""
        out: dict[str, Any] = {}
        for t in self.tiers:
            entry: dict[str, Any] = {"backend": t.config.backend, "up": t.up, "circuit": t.breaker.state,
                                     "queued": t.queue.qsize(), "writing": t.writing, "detached": len(t.detached)}
            if isinstance(t.backend, SupportsStats):
                entry.update(t.backend.stats())
            out[t.name] = entry
        return out

    # -- tiers down at start ---------------------------------------------------------------------
    def _start_down(self, tier: Tier, open_tier: Callable[[], Coroutine[Any, Any, StorageBackend]],
                    attempt: asyncio.Task[StorageBackend] | None, why: str) -> None:
        """Mark ``tier`` down (its backend a stand-in) and start re-opening it in the background;
        ``attempt``: an open still running past the open deadline, awaited first."""
        tier.up = False
        self.metrics.tier_up.labels(tier.name).set(0)
        log.warning("lmtier tier %s (%s): could not be opened (%s); it starts down (reads are misses, writes are "
                    "skipped) and will be retried in the background every %g-%gs", tier.name, tier.config.backend,
                    why, REOPEN_FIRST_S, REOPEN_MAX_S)
        tier.reopener = self._loop.create_task(self._reopen(tier, open_tier, attempt),
                                               name=f"lmtier-reopen-{tier.name}")

    async def _reopen(self, tier: Tier, open_tier: Callable[[], Coroutine[Any, Any, StorageBackend]],
                      attempt: asyncio.Task[StorageBackend] | None) -> None:
        """Open ``tier`` until it opens (then adopt it) or fails on something retrying cannot fix."""
        delay, tries, since = REOPEN_FIRST_S, 0, self._loop.time()
        while True:
            if attempt is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, REOPEN_MAX_S)
                attempt = self._loop.create_task(open_tier(), name=f"lmtier-open-{tier.name}")
            tier.opening = attempt  # close reclaims what it opens, even mid-way
            tries += 1
            try:
                backend = await attempt
            except BackendUnavailableError as exc:  # the service still is down or silent: try again later
                log.debug("lmtier tier %s: re-open %d failed (%s: %s); next try in %gs", tier.name, tries,
                          type(exc).__name__, exc, delay)
                attempt = tier.opening = None
                continue
            except Exception as exc:  # e.g. the server now rejects the credentials: retrying will not fix it
                tier.opening = None
                log.error("lmtier tier %s (%s): re-opening failed (%s: %s); not retried, the tier stays down: fix "
                          "its configuration and restart", tier.name, tier.config.backend, type(exc).__name__, exc)
                return
            problem = self._codec_problem(tier.config, backend)
            if problem is not None:
                tier.opening = None
                await backend.aclose()
                log.error("lmtier tier %s (%s): opened, but %s; the tier stays down", tier.name,
                          tier.config.backend, problem)
                return
            tier.backend = backend
            tier.opening = None
            self._attach(tier)
            tier.up = True
            self.metrics.tier_up.labels(tier.name).set(1)
            log.info("lmtier tier %s (%s): open after %d tr%s, %.1fs down; serving now (optional capabilities: %s)",
                     tier.name, tier.config.backend, tries, "y" if tries == 1 else "ies", self._loop.time() - since,
                     ", ".join(optional_capabilities(backend)) or "none")
            return

    def _attach(self, tier: Tier) -> None:
        """Hook the manager into ``tier``'s open backend: its stats as metrics, its evictions."""
        if isinstance(tier.backend, SupportsStats):
            self.metrics.add_stats_source(tier.name, tier.backend.stats)
        if isinstance(tier.backend, SupportsEvictionListener):
            tier.backend.add_eviction_listener(self._eviction_listener(tier))

    async def _stop_reopening(self, grace_s: float = 10.0) -> None:
        """Stop every re-opener; close what an open in progress opens (waiting ``grace_s`` at most)."""
        tasks = [t.reopener for t in self.tiers if t.reopener is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        await _reclaim([t.opening for t in self.tiers if t.opening is not None], grace_s)

    # -- machinery -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _one_read(self) -> Iterator[None]:
        """The scope of one caller's read (lookup, contains, get, get_into, fetch): its
        :class:`_Silence`, shared by the tiers it asks (see :meth:`_calls`)."""
        token = _SILENCE.set(_Silence(self._loop.time()))
        try:
            yield
        finally:
            _SILENCE.reset(token)

    def _until(self, timeout_s: float | None) -> float | None:
        """The loop time by which a call with budget ``timeout_s`` must answer (None: no budget)."""
        if timeout_s is None:
            return None
        if not timeout_s > 0:
            raise InvalidArgumentError(f"timeout_s must be > 0, got {timeout_s!r}")
        return self._loop.time() + timeout_s

    async def _call(self, tier: Tier, op: str, fn: Callable[[T], Awaitable[Any]], arg: T, *,
                    writes: int = 0, holds: Sequence[object] = (), until: float | None = None) -> Any:
        """Run one backend call with breaker, deadline and metrics; a fault returns FAULT.

        ``writes``: items a put carries, counted as skipped writes on a fault. ``holds``: the
        caller memory the call reads or writes (put values, get_into buffers); if the call is
        detached at its deadline these stay referenced (HostBuffers retained) until it ends, and
        the call is not cancelled. ``until``: the caller's own budget (loop time).
        """
        (result,) = await self._calls(tier, op, fn, [_Part(arg, writes, holds)], until=until)
        return result

    async def _calls(self, tier: Tier, op: str, fn: Callable[[T], Awaitable[Any]], parts: Sequence[_Part[T]], *,
                     until: float | None = None, per_key: bool = True) -> list[Any]:
        """:meth:`_call` for several parts of one operation (slices of a batch), up to
        :data:`MAX_IN_FLIGHT` at once; one result (or FAULT) per part.

        The deadline bounds the wait for *progress*: the parts in flight are detached (FAULT) when
        none of them has completed for the tier's deadline — so a working tier streams a large
        batch at full parallelism, and a frozen one costs its caller one deadline.

        Faults are misses per key, not per batch: a part of several keys that *raised* an error
        the tier answered with (anything but :class:`~lmtier.errors.BackendUnavailableError`,
        a timeout included, or bad input) is asked again key by key (``per_key``), so one key
        the tier refuses (a value it cannot take, a name it cannot read) costs that key only.
        A tier that is down or late is not asked again: that would cost its caller more deadlines.

        Within a caller's read (:class:`_Silence`), a tier asked after a hotter one let its
        deadline pass waits only for what is left of its own deadline since the last answer; when
        nothing is left it is not asked (a miss, reason ``deadline``), and running out is no
        verdict on it. So a critical-path read waits at most about one deadline of silence
        however many tiers froze together.
        """
        results: list[Any] = [FAULT] * len(parts)
        limit = getattr(tier.config.timeout_s, _DEADLINE_OF[op])
        silence = _SILENCE.get() if op in _CRITICAL else None
        t0 = self._clock()
        missed: set[int] = set()  # parts detached at the tier's own deadline
        again: list[int] = []  # parts of several keys whose call raised: asked again key by key
        if tier.lends_memory:  # in-process, never waits on I/O: inline, so its writes are seen at once
            for i, part in enumerate(parts):
                if tier.breaker.allow():
                    results[i] = await self._inline(tier, op, fn, part.arg, part.writes, self._clock(),
                                                    splits=per_key and _keys_in(op, part) > 1)
                else:
                    results[i] = self._skip(tier, part.writes, "circuit_open")
                if results[i] is _SPLIT:
                    again.append(i)
            if silence is not None:  # it answered (inline: it always does)
                silence.since, silence.stalled = self._loop.time(), False
            if again:
                await self._per_key(tier, op, fn, parts, results, again, until)
            if op in _READS:
                self._observe_reads(tier, op, parts, results, missed, self._clock() - t0)
            self._note_changes(tier, op, parts, results, again)
            return results
        running: dict[asyncio.Task[Any], int] = {}
        started: dict[int, float] = {}
        nxt = 0
        # after a hotter tier's silence, this one inherits it (and no blame) until it answers
        inherited = silence is not None and silence.stalled
        progress = silence.since if inherited else self._loop.time()  # type: ignore[union-attr]
        try:
            while nxt < len(parts) or running:
                now = self._loop.time()
                while nxt < len(parts) and len(running) < MAX_IN_FLIGHT:
                    i, part = nxt, parts[nxt]
                    nxt += 1
                    # the silence a hotter tier began may have used up this tier's deadline too (checked
                    # first: the breaker's allow() may hand out a probe that must then be sent)
                    reason = "deadline" if inherited and progress + limit <= now else self._gate(tier, until, now)
                    if reason is not None:
                        results[i] = self._skip(tier, part.writes, reason)
                        continue
                    task = self._loop.create_task(_awaited(fn, part.arg), name=f"lmtier-{tier.name}-{op}")
                    running[task] = i
                    started[i] = self._clock()
                if not running:
                    break
                wait = limit - (now - progress)
                own = until is None or now + wait <= until
                if not own:
                    wait = until - now  # type: ignore[operator]
                done: set[asyncio.Task[Any]] = set()
                if wait > 0:
                    done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # no progress for a whole deadline (or the caller's budget is spent)
                    why = ("the caller's budget" if not own else
                           "the rest of a deadline a hotter tier spent" if inherited else "its deadline")
                    own = own and not inherited
                    verdict = own
                    for task, i in running.items():
                        self._missed(tier, op, task, parts[i].holds, parts[i].writes, own=own,
                                     waited=limit if own else max(wait, 0.0), verdict=verdict, why=why)
                        verdict = False  # one verdict on the tier per stall
                        if own:
                            missed.add(i)
                    running.clear()
                    if silence is not None:
                        silence.stalled = True
                    continue
                progress = self._loop.time()
                inherited = False
                if silence is not None:  # an answer: the caller's silence starts again
                    silence.since, silence.stalled = progress, False
                for task in done:
                    i = running.pop(task)
                    results[i] = self._finished(tier, op, task, parts[i].writes, started[i],
                                                splits=per_key and _keys_in(op, parts[i]) > 1)
                    if results[i] is _SPLIT:
                        again.append(i)
        except asyncio.CancelledError:
            tier.breaker.abandon_probe()  # our own cancellation says nothing about the tier
            for task, i in running.items():
                self._detach(tier, op, task, parts[i].holds)
            raise
        if again:
            await self._per_key(tier, op, fn, parts, results, again, until)
        if op in _READS:  # the whole batch, parts in parallel: its wall time is what a load waits
            self._observe_reads(tier, op, parts, results, missed, self._clock() - t0)
        self._note_changes(tier, op, parts, results, again)
        return results

    async def _per_key(self, tier: Tier, op: str, fn: Callable[[T], Awaitable[Any]], parts: Sequence[_Part[T]],
                       results: list[Any], again: list[int], until: float | None) -> None:
        """Ask ``parts[i]`` (``i`` in ``again``: calls of several keys that raised) again, one call
        per key, and put each part's merged answer in ``results[i]``: the keys answered, a miss
        (or a skipped write) for the keys that failed again, FAULT when every key did."""
        singles = [_split_part(op, parts[i]) for i in again]
        outcomes = await self._calls(tier, op, fn, [p for one in singles for p in one], until=until, per_key=False)
        at = 0
        for i, one in zip(again, singles, strict=True):
            mine = outcomes[at:at + len(one)]
            at += len(one)
            results[i] = _merged(op, mine)
            failed = sum(r is FAULT for r in mine)
            self.metrics.per_key_retries.labels(tier.name, op).inc(len(one))
            log.warning("lmtier tier %s: a %s of %d keys failed; asked key by key, %d answered, %d failed "
                        "(misses/skipped writes)", tier.name, op, len(one), len(one) - failed, failed)

    def _note_changes(self, tier: Tier, op: str, parts: Sequence[_Part[Any]], results: list[Any],
                      asked_per_key: Sequence[int]) -> None:
        """Residency: the keys of the puts and deletes that succeeded (a fault changed nothing we
        know). Parts asked again key by key (``asked_per_key``) were noted key by key then."""
        if not self._residency or op not in ("put", "delete"):
            return
        for i, (part, result) in enumerate(zip(parts, results, strict=True)):
            if result is FAULT or i in asked_per_key:
                continue
            keys = [k for k, _ in part.arg] if op == "put" else list(part.arg)
            if keys:
                self._note(tier, keys, op == "put")

    def _gate(self, tier: Tier, until: float | None, now: float) -> str | None:
        """Why a call to ``tier`` must not start now (a skipped-write reason), or None."""
        if until is not None and until <= now:  # the caller's budget is spent: not asked, not blamed
            return "deadline"
        if not tier.up:  # not open yet: being re-opened in the background
            return "down"
        if len(tier.detached) >= MAX_DETACHED:
            return "stuck"
        if not tier.breaker.allow():
            return "circuit_open"
        return None

    def _finished(self, tier: Tier, op: str, task: asyncio.Task[Any], writes: int, start: float, *,
                  splits: bool = False) -> Any:
        """The outcome of a call that ended in time: its result, or FAULT (counted, logged), or
        _SPLIT (``splits``: the call raised an error worth asking again key by key)."""
        try:
            result = task.result()
        except InvalidArgumentError:
            tier.breaker.record_success()
            raise
        except Exception as exc:
            if splits and _answered(exc):
                self._fault(tier, op, exc, then="asking again key by key")
                return _SPLIT
            reason = self._fault(tier, op, exc)
            if writes:
                self.metrics.skipped_writes.labels(tier.name, reason).inc(writes)
            return FAULT
        self.metrics.latency.labels(tier.name, op).observe(self._clock() - start)
        if tier.breaker.record_success():
            self.metrics.circuit_open.labels(tier.name).set(0)
            log.warning("lmtier tier %s: recovered, circuit closed", tier.name)
        return result

    async def _inline(self, tier: Tier, op: str, fn: Callable[[T], Awaitable[Any]], arg: T, writes: int,
                      start: float, *, splits: bool = False) -> Any:
        try:
            result = await fn(arg)
        except InvalidArgumentError:
            raise
        except Exception as exc:
            if splits and _answered(exc):
                self._fault(tier, op, exc, then="asking again key by key")
                return _SPLIT
            reason = self._fault(tier, op, exc)
            return self._skip(tier, writes, reason)
        self.metrics.latency.labels(tier.name, op).observe(self._clock() - start)
        if tier.breaker.record_success():
            self.metrics.circuit_open.labels(tier.name).set(0)
        return result

    def _observe_reads(self, tier: Tier, op: str, parts: Sequence[_Part[Any]], results: Sequence[Any],
                       missed: set[int], seconds: float) -> None:
        """Feed one read batch (all its parts: one operation of a caller) to the tier's read cost.

        The bytes read, or asked of a part that missed its own deadline (the batch was at least
        that slow); parts never sent (circuit open, caller's budget spent) say nothing.
        """
        nbytes, asked = 0, False
        for i, (part, result) in enumerate(zip(parts, results, strict=True)):
            if i in missed:
                asked = True
                nbytes += _into_bytes(part.arg, None) if op == "get_into" else 0
            elif result is not FAULT:
                asked = True
                if op == "get":
                    nbytes += sum(_nbytes(v) for v in result if v is not None)
                else:
                    nbytes += _into_bytes(part.arg, result)
        if asked:
            tier.reads.observe(nbytes, seconds)
            self._export_reads(tier)

    def _export_reads(self, tier: Tier) -> None:
        cost = tier.reads.cost()
        if cost is not None:
            self.metrics.read_bytes_per_s.labels(tier.name).set(cost.bytes_per_s)
            self.metrics.read_call_seconds.labels(tier.name).set(cost.latency_s)

    def _skip(self, tier: Tier, writes: int, reason: str) -> _Fault:
        if writes:
            self.metrics.skipped_writes.labels(tier.name, reason).inc(writes)
        return FAULT

    def _missed(self, tier: Tier, op: str, task: asyncio.Task[Any], holds: Sequence[object], writes: int,
                *, own: bool, waited: float, verdict: bool = True, why: str = "") -> None:
        """A call passed its deadline: count it, feed the breaker (``verdict``), leave it to end alone."""
        self.metrics.deadline_misses.labels(tier.name, op).inc()
        self.metrics.errors.labels(tier.name, op, "backendtimeout").inc()
        if writes:
            self.metrics.skipped_writes.labels(tier.name, "deadline").inc(writes)
        log.warning("lmtier tier %s: %s did not answer within %.3gs (%s); treated as a miss/skipped write",
                    tier.name, op, waited, why or ("its deadline" if own else "the caller's budget"))
        if not own:  # only the caller's shorter budget ran out: no verdict on the tier
            tier.breaker.abandon_probe()
        elif not verdict:
            pass
        elif tier.breaker.record_failure(at_once=True):
            self.metrics.circuit_open.labels(tier.name).set(1)
            log.warning("lmtier tier %s: circuit opened after a missed deadline; skipping it for %.1fs",
                        tier.name, tier.breaker.cooldown)
        self._detach(tier, op, task, holds)

    def _detach(self, tier: Tier, op: str, task: asyncio.Task[Any], holds: Sequence[object]) -> None:
        """Let ``task`` end in the background; keep ``holds`` out of circulation until it does."""
        if task.done():
            _consume(task)
            return
        retained = [h.retain() for h in holds if isinstance(h, HostBuffer)]
        kept: list[object] = list(holds)  # lease views and the like: alive while referenced
        tier.detached.add(task)
        self.metrics.detached_calls.labels(tier.name).set(len(tier.detached))
        started = self._loop.time()

        def ended(t: asyncio.Task[Any]) -> None:
            tier.detached.discard(t)
            self.metrics.detached_calls.labels(tier.name).set(len(tier.detached))
            release_all(retained)
            kept.clear()
            outcome = _consume(t)
            log.info("lmtier tier %s: a %s call detached at its deadline ended after %.2fs (%s)",
                     tier.name, op, self._loop.time() - started, outcome)

        task.add_done_callback(ended)
        if not holds:  # nothing of the caller's is in use: stop it if the backend can
            task.cancel()

    def _fault(self, tier: Tier, op: str, exc: Exception, *,
               then: str = "treated as a miss/skipped write") -> str:
        """Count and log a failed call, feed the breaker; returns the skipped-write reason."""
        kind = _error_kind(exc)
        self.metrics.errors.labels(tier.name, op, kind).inc()
        if isinstance(exc, CapacityError):
            reason, failed = "full", False
        elif isinstance(exc, BackendUnavailableError):
            reason, failed = "unavailable", True
        elif isinstance(exc, LmtierError):
            reason, failed = "error", False
        else:  # a buggy third-party backend must not crash the engine; treat it as unhealthy
            reason, failed = "error", True
            log.error("lmtier tier %s: unexpected %s from %s", tier.name, type(exc).__name__, op, exc_info=exc)
        if not isinstance(exc, CorruptDataError):
            log.warning("lmtier tier %s: %s failed (%s: %s); %s", tier.name, op, type(exc).__name__, exc, then)
        if not failed:
            tier.breaker.record_success()  # the tier answered: it is reachable
        elif tier.breaker.record_failure():
            self.metrics.circuit_open.labels(tier.name).set(1)
            log.warning("lmtier tier %s: circuit opened after %d failures; skipping it for %.1fs",
                        tier.name, tier.breaker.failures, tier.breaker.cooldown)
        return reason

    async def _write(self, tier: Tier, items: Sequence[PutItem], *, skip_present: bool = False,
                     carried: Sequence[Item] | None = None) -> int:
        """Put ``items`` into ``tier`` in slices; how many it took, or -1 if a slice failed.
        ``carried``: the same values as kit Payloads (shared checksum), for tiers that take buffers."""
        if not tier.up:  # nothing to encode, check or send: skipped at once
            self._skip(tier, len(items), "down")
            return -1
        if skip_present:
            present = await self._call(tier, "contains", tier.backend.contains, [k for k, _ in items])
            if present is not FAULT:  # a failed check just writes everything
                absent = [not p for p in present]
                items = [it for it, a in zip(items, absent, strict=True) if a]
                if carried is not None:
                    carried = [it for it, a in zip(carried, absent, strict=True) if a]
            if not items:
                return 0
        if tier.codec is not None:
            return await self._write_coded(tier, items)
        if not isinstance(tier.backend, SupportsCodecs) and any(_codec_of(v) for _, v in items):
            items = await self._raw_for(tier, items)  # a value still encoded (a demotion) goes raw
            carried = None
        # The protocol promises backends buffer-protocol values: HostBuffers and torch tensors go as
        # zero-copy byte arrays (kit Payloads, which carry the checksum from tier to tier), except to
        # a tier that hands out HostBuffers itself (the cpu tier's `allocate`), which adopts those of
        # its own slab and copies tensors with torch.
        if tier.lends_memory:
            batch = cast("list[Item]", list(items))
        else:
            batch = list(carried) if carried is not None else _carried(items)
        sizes = [as_bytes_view(v).nbytes for _, v in batch]
        cuts = _slices(sizes)
        parts = [_Part(batch[lo:hi], hi - lo, [v for _, v in batch[lo:hi]] +
                       [v for _, v in items[lo:hi] if isinstance(v, HostBuffer)]) for lo, hi in cuts]
        outcomes = await self._calls(tier, "put", tier.backend.put, parts)
        written, failed = 0, False
        for (lo, hi), outcome in zip(cuts, outcomes, strict=True):
            if outcome is FAULT:
                failed = True
                continue
            landed = outcome.landed if isinstance(outcome, _PerKeyWrite) else [True] * (hi - lo)
            failed = failed or not all(landed)
            written += sum(landed)
            self.metrics.bytes_written.labels(tier.name).inc(sum(n for n, ok in zip(sizes[lo:hi], landed, strict=True) if ok))
            self.metrics.objects_written.labels(tier.name).inc(sum(landed))
        return -1 if failed and not written else written

    async def _write_coded(self, tier: Tier, items: Sequence[PutItem]) -> int:
        """:meth:`_write` to a codec tier: slices of :data:`CODEC_SLICE_BYTES` raw bytes, each
        encoded on the codec pool and then written, up to :data:`MAX_IN_FLIGHT` at once (the
        deadline covers both: the encoding is this tier's work)."""
        async def encode_and_put(part: list[PutItem]) -> int:
            batch = _carried(await self._encoded(tier, part))  # other bytes, checksums of their own
            await tier.backend.put(batch)
            return sum(as_bytes_view(v).nbytes for _, v in batch)

        cuts = _slices([as_bytes_view(v).nbytes for _, v in items], CODEC_SLICE_BYTES)
        parts = [_Part(list(items[lo:hi]), hi - lo, [v for _, v in items[lo:hi]]) for lo, hi in cuts]
        outcomes = await self._calls(tier, "put", encode_and_put, parts)
        written, failed = 0, False
        for (lo, hi), stored in zip(cuts, outcomes, strict=True):
            if stored is FAULT:
                failed = True
                continue
            if isinstance(stored, _PerKeyWrite):  # asked again key by key: some items failed
                failed = failed or not all(stored.landed)
                n, stored = sum(stored.landed), sum(r for r in stored.returned if r is not FAULT)
            else:
                n = hi - lo
            written += n
            self.metrics.bytes_written.labels(tier.name).inc(stored)
            self.metrics.objects_written.labels(tier.name).inc(n)
        return -1 if failed and not written else written

    async def _read_coded(self, tier: Tier, keys: Sequence[ChunkKey], pending: list[int], sizes: Sequence[int],
                          until: float | None, settle: Callable[[list[int], list[Any]], Awaitable[None]]) -> None:
        """``get`` from a codec tier in slices of :data:`CODEC_SLICE_BYTES` (by ``sizes``, the
        raw sizes), up to :data:`MAX_IN_FLIGHT` at once; each slice's answer goes to
        ``settle(indices, values)`` (which decodes it) as it arrives, while later slices are
        still read. A slice that fails is counted as misses."""
        cuts = _slices([sizes[i] for i in pending], CODEC_SLICE_BYTES)
        gate = asyncio.Semaphore(MAX_IN_FLIGHT)

        async def read(idx: list[int]) -> None:
            async with gate:  # the decode runs outside: the next slice's read starts meanwhile
                values = await self._call(tier, "get", tier.backend.get, [keys[i] for i in idx], until=until)
            if values is not FAULT:  # (a failed slice's keys are the caller's misses)
                await settle(idx, values)

        if len(cuts) == 1:
            await read(pending)
            return
        async with asyncio.TaskGroup() as group:  # a failure or cancellation waits for every slice
            for lo, hi in cuts:
                group.create_task(read(pending[lo:hi]))

    # -- value codecs: machinery ----------------------------------------------------------------
    def _tier_codecs(self, tiers: Sequence[tuple[TierConfig, StorageBackend]]) -> list[ValueCodec | None]:
        """Each tier's codec, built and checked (ConfigError naming the tier and what to change)."""
        out: list[ValueCodec | None] = []
        for i, (tcfg, backend) in enumerate(tiers):
            if not tcfg.codec.enabled:
                out.append(None)
                continue
            # a tier that is down is checked when it opens (_reopen)
            problem = None if isinstance(backend, _Down) else self._codec_problem(tcfg, backend)
            if problem is not None:
                raise ConfigError(f"tiers[{i}] ({tcfg.name}).codec: {problem}")
            out.append(self._registry_codec(tcfg, i))
        return out

    @staticmethod
    def _codec_problem(tcfg: TierConfig, backend: StorageBackend) -> str | None:
        """Why ``backend`` cannot keep ``tcfg``'s codec (and what to change), or None."""
        if not tcfg.codec.enabled:
            return None
        if isinstance(backend, SupportsAllocate):
            return (f"{tcfg.codec.name} on an in-memory tier that lends its memory to the engine's copies is not "
                    "supported (its chunks are read in place); put the codec on a colder tier (disk, redis, s3) "
                    "and keep this one raw")
        if not isinstance(backend, SupportsCodecs):
            return (f"backend {tcfg.backend!r} does not keep codec ids with its values "
                    "(lmtier.protocol.SupportsCodecs); remove the codec from this tier, or use a backend that "
                    "supports codecs (disk, redis, s3)")
        return None

    def _registry_codec(self, tcfg: TierConfig, i: int) -> ValueCodec:
        if self._registry is None:
            self._registry = BackendRegistry.discover()
        return self._registry.create_codec(tcfg.codec.name, tcfg.codec.options, path=f"tiers[{i}].codec")

    @property
    def decoders(self) -> dict[int, ValueCodec]:
        """Every codec this process can decode, by id (made on first use)."""
        if self._decoders is None:
            if self._registry is None:
                self._registry = BackendRegistry.discover()
            self._decoders = self._registry.decoders()
            for t in self.tiers:  # a tier's own instance decodes as well as a default one
                if t.codec is not None:
                    self._decoders.setdefault(t.codec.codec_id, t.codec)
        return self._decoders

    @property
    def codec_pool(self) -> WorkerPool:
        """Worker threads for encoding and decoding (codecs release the GIL), made on first use."""
        if self._codec_pool is None:
            import os as _os

            from lmtier.kit.runner import WorkerPool

            lossy = any(t.codec is not None and t.codec.lossy for t in self.tiers)
            self._codec_pool = WorkerPool(max(2, _os.cpu_count() or 2), "codec",
                                          initializer=_one_torch_thread if lossy else None)
        return self._codec_pool

    async def _encoded(self, tier: Tier, items: Sequence[PutItem]) -> list[PutItem]:
        """``items`` for a codec tier: each value encoded on the codec pool, or kept raw (counted)
        where encoding is not allowed (lossy, namespace not declaring it) or does not pay."""
        from lmtier.kit.values import Payload

        codec = tier.codec
        assert codec is not None
        out: list[PutItem] = list(items)
        todo: list[int] = []
        geometry: list[KVGeometry | None] = []
        for j, (key, value) in enumerate(items):
            if _codec_of(value):
                continue  # encoded already (a demotion from a codec tier): stored as it is
            kv = self._kv.get(key.namespace)
            if codec.lossy and (kv is None or codec.tag() not in kv[1]):
                self.metrics.codec_raw_values.labels(tier.name, "namespace").inc()
                continue
            todo.append(j)
            geometry.append(kv[0] if kv is not None else None)
        if not todo:
            return out
        timer = self.metrics.codec_seconds.labels(tier.name, "encode")

        def encode(value: object, kv: KVGeometry | None, token: Any) -> Payload | None:
            started = time.perf_counter()
            with token.touching_caller_memory():
                src = as_bytes_view(value)
                import numpy as np

                dst = np.empty(codec.max_encoded_bytes(src.nbytes, kv), np.uint8)
                n = codec.encode(src, memoryview(cast("Any", dst)), kv)
            timer.observe(time.perf_counter() - started)
            if not codec.lossy and n >= src.nbytes:
                return None  # incompressible: raw costs less to store and nothing to read
            return Payload.of(dst[:n], codec=codec.codec_id, raw_length=src.nbytes)

        from functools import partial

        outcomes = await self.codec_pool.run([partial(encode, items[j][1], kv) for j, kv in zip(todo, geometry,
                                                                                                 strict=True)])
        raw_bytes = stored = 0
        for j, outcome in zip(todo, outcomes, strict=True):
            if not outcome.ok:
                self.metrics.codec_raw_values.labels(tier.name, "error").inc()
                # the message, not the exception: a record kept by a handler must not keep the
                # traceback's frames, and with them the value's buffer, alive
                log.warning("lmtier tier %s: %s could not encode %s (%s); stored raw", tier.name, codec.name,
                            items[j][0], str(outcome.error))
                continue
            if outcome.value is None:
                self.metrics.codec_raw_values.labels(tier.name, "incompressible").inc()
                continue
            payload = outcome.value
            out[j] = (items[j][0], cast("Any", payload))
            raw_bytes += payload.raw_length
            stored += payload.nbytes
        self.metrics.codec_raw_bytes.labels(tier.name, codec.name).inc(raw_bytes)
        self.metrics.codec_stored_bytes.labels(tier.name, codec.name).inc(stored)
        return out

    async def _raw_for(self, tier: Tier, items: Sequence[PutItem]) -> list[PutItem]:
        """``items`` with every encoded value decoded, for a tier that stores no codec ids."""
        coded = [j for j, (_, v) in enumerate(items) if _codec_of(v)]
        if not coded:
            return list(items)
        import numpy as np

        out: list[PutItem] = list(items)
        bufs = {j: np.empty(cast("Any", items[j][1]).raw_length, np.uint8) for j in coded}
        ok = await self._decode_jobs(tier, [(items[j][0], items[j][1], memoryview(cast("Any", bufs[j]))) for j in coded],
                                     delete=False)
        for j, filled in zip(coded, ok, strict=True):
            out[j] = (items[j][0], cast("Any", bufs[j]) if filled else b"")
        return [it for it in out if as_bytes_view(it[1]).nbytes]

    async def _decoded(self, tier: Tier, keys: Sequence[ChunkKey], values: list[Any]) -> list[Any]:
        """A tier's ``get`` answer with encoded values decoded (into new buffers); a value that
        cannot be decoded is a miss."""
        coded = [j for j, v in enumerate(values) if v is not None and _codec_of(v)]
        if not coded:
            return values
        import numpy as np

        bufs = {j: np.empty(values[j].raw_length, np.uint8) for j in coded}
        ok = await self._decode_jobs(tier, [(keys[j], values[j], memoryview(cast("Any", bufs[j]))) for j in coded])
        out = list(values)
        for j, filled in zip(coded, ok, strict=True):
            out[j] = memoryview(cast("Any", bufs[j])).toreadonly() if filled else None
        return out

    async def _decode_jobs(self, tier: Tier, jobs: Sequence[tuple[ChunkKey, Any, memoryview]], *,
                           delete: bool = True) -> list[bool]:
        """Decode each ``(key, encoded value, destination)`` on the codec pool; True where done.

        A codec id this process does not know: a miss left in place, counted. A value its codec
        refuses (it passed its checksum, so a writer's bug): a miss, deleted from ``tier``.
        """
        decoders = self.decoders
        known: list[int] = []
        for j, (key, value, _) in enumerate(jobs):
            if value.codec in decoders:
                known.append(j)
            else:
                self.metrics.codec_unknown.labels(tier.name).inc()
                log.info("lmtier tier %s: %s is encoded with codec id %#x, which this process cannot decode "
                         "(a newer writer, or a codec plugin not installed here); a miss, left in place",
                         tier.name, key, value.codec)
        timer = self.metrics.codec_seconds.labels(tier.name, "decode")

        def decode(value: Any, dst: memoryview, token: Any) -> None:
            started = time.perf_counter()
            with token.touching_caller_memory():
                decoders[value.codec].decode(as_bytes_view(value), dst)
            timer.observe(time.perf_counter() - started)

        from functools import partial

        outcomes = await self.codec_pool.run([partial(decode, jobs[j][1], jobs[j][2]) for j in known])
        done = [False] * len(jobs)
        bad: list[ChunkKey] = []
        for j, outcome in zip(known, outcomes, strict=True):
            if outcome.ok:
                done[j] = True
            else:
                bad.append(jobs[j][0])
                self.metrics.errors.labels(tier.name, "decode", "corruptdata").inc()
                log.warning("lmtier tier %s: %s does not decode (%s); a miss, deleted", tier.name, jobs[j][0],
                            str(outcome.error))  # the message only: the traceback holds the value's buffer
        if bad and delete:
            await self._call(tier, "delete", tier.backend.delete, bad)
        return done

    # -- reads into buffers --------------------------------------------------------------------
    def _want_pinned(self) -> bool:
        if self._pinned is None:
            import torch

            self._pinned = bool(torch.cuda.is_available())
        return self._pinned

    def _buffer(self, size: int, purpose: Literal["store", "fetch", "stage"]) -> HostBuffer | None:
        """A writable buffer of ``size`` bytes for a chunk to ``store`` or ``fetch``, or to ``stage``.

        ``store``: the hot tier's memory (its put adopts it); when the hot tier is full, None — a
        copy would not fit there either: its put would evict the very chunks being stored.
        ``fetch``: the hot tier's memory where it promotes (it adopts the hit), else the pool.
        ``stage``: the pool. Hot memory that is not pinned where CUDA is counts as unusable.
        """
        hot = self.tiers[0]
        if purpose != "stage" and isinstance(hot.backend, SupportsAllocate) and (
                purpose == "store" or hot.config.promote):
            try:
                buf: HostBuffer | None = hot.backend.allocate(size)
            except LmtierError:
                buf = None
            if buf is not None and (buf.pinned or not self._want_pinned()):
                return buf
            if buf is not None:
                buf.release()  # an unpinned slab where CUDA copies want pinned memory: the pool's
            elif purpose == "store":
                return None
        return self.host_pool.try_allocate(size)

    async def _fetch_get(self, tier: Tier, keys: Sequence[ChunkKey], sizes: list[int], pending: list[int],
                         out: list[HostBuffer | None], wrong: list[ChunkKey], until: float | None) -> set[int]:
        """fetch from a tier by ``get``: its lent memory where usable, else one copy (or the
        decode) each; a codec tier is read in slices (:meth:`_read_coded`)."""
        got: set[int] = set()
        nbytes = 0

        async def settle(idx: list[int], values: list[Any]) -> None:
            nonlocal nbytes
            coded: list[tuple[int, Any]] = []
            for j, i in enumerate(idx):
                value, values[j] = values[j], None  # our reference from here: kept or dropped
                if value is None:
                    continue
                if _codec_of(value):  # decoded straight into the buffer handed out: still one pass
                    coded.append((i, value))
                    continue
                view = as_bytes_view(value)
                if view.nbytes != sizes[i]:
                    wrong.append(keys[i])
                    continue
                buf = lent_buffer(value)  # the tier's own memory: retained, no copy
                del value
                if buf is not None and (buf.pinned or not self._want_pinned()):
                    out[i] = buf
                else:
                    if buf is not None:
                        buf.release()
                    buf = self._buffer(sizes[i], "fetch" if tier.index > 0 else "stage")
                    if buf is None:
                        log.warning("lmtier: no host memory to fetch a %d-byte chunk into; a miss", sizes[i])
                        continue
                    buf.view()[:] = view
                    out[i] = buf
                del view
                got.add(i)
                nbytes += sizes[i]
            if coded:
                nbytes += await self._fetch_decoded(tier, keys, sizes, coded, out, wrong, got)

        if tier.codec is not None:
            await self._read_coded(tier, keys, pending, sizes, until, settle)
        else:
            values = await self._call(tier, "get", tier.backend.get, [keys[i] for i in pending], until=until)
            if values is FAULT:
                self.metrics.misses.labels(tier.name).inc(len(pending))
                return set()
            await settle(pending, values)
            del values
        self._count_reads(tier, len(got), len(pending) - len(got), nbytes)
        return got

    async def _fetch_decoded(self, tier: Tier, keys: Sequence[ChunkKey], sizes: list[int],
                             coded: list[tuple[int, Any]], out: list[HostBuffer | None], wrong: list[ChunkKey],
                             got: set[int]) -> int:
        """fetch's encoded hits: each decoded into a buffer for the caller; bytes delivered."""
        jobs: list[tuple[int, Any, HostBuffer]] = []
        for i, value in coded:
            if value.raw_length != sizes[i]:
                if value.codec in self.decoders:
                    wrong.append(keys[i])
                continue
            buf = self._buffer(sizes[i], "fetch" if tier.index > 0 else "stage")
            if buf is None:
                log.warning("lmtier: no host memory to fetch a %d-byte chunk into; a miss", sizes[i])
                continue
            jobs.append((i, value, buf))
        coded.clear()
        try:
            ok = await self._decode_jobs(tier, [(keys[i], v, b.view()) for i, v, b in jobs])
        except BaseException:
            release_all([b for _, _, b in jobs])
            raise
        nbytes = 0
        for (i, _, buf), filled in zip(jobs, ok, strict=True):
            if filled:
                out[i] = buf
                got.add(i)
                nbytes += sizes[i]
            else:
                buf.release()
        return nbytes

    async def _fetch_into(self, tier: Tier, keys: Sequence[ChunkKey], sizes: list[int], pending: list[int],
                          out: list[HostBuffer | None], until: float | None) -> set[int]:
        """fetch from a tier with get_into: straight into buffers for the caller (one copy)."""
        targets: list[int] = []
        bufs: list[HostBuffer] = []
        for i in pending:
            buf = self._buffer(sizes[i], "fetch")
            if buf is None:
                log.warning("lmtier: no host memory to fetch a %d-byte chunk into; a miss", sizes[i])
                continue
            targets.append(i)
            bufs.append(buf)
        try:
            filled = await self._sliced_into(tier, [keys[i] for i in targets], bufs, until)
        except BaseException:
            release_all(bufs)
            raise
        got: set[int] = set()
        for i, buf, ok in zip(targets, bufs, filled, strict=True):
            if ok:
                out[i] = buf
                got.add(i)
            else:
                buf.release()  # a late writer (detached call) still holds its own reference
        self._count_reads(tier, len(got), len(pending) - len(got), sum(sizes[i] for i in got))
        return got

    async def _tier_into(self, tier: Tier, keys: Sequence[ChunkKey], pending: list[int], outs: Sequence[object],
                         views: list[memoryview], until: float | None) -> set[int]:
        """get_into from one tier into caller buffers; the indices filled."""
        got: set[int] = set()

        async def settle(idx: list[int], values: list[Any]) -> None:
            coded: list[tuple[int, Any]] = []
            for j, i in enumerate(idx):
                value, values[j] = values[j], None
                if value is not None and _codec_of(value):
                    if value.raw_length == views[i].nbytes:
                        coded.append((i, value))
                elif value is not None and as_bytes_view(value).nbytes == views[i].nbytes:
                    views[i][:] = as_bytes_view(value)
                    got.add(i)
                del value
            if coded:  # decoded straight into the caller's buffer (a worker writes it: waited for)
                decoded = await self._decode_jobs(tier, [(keys[i], v, views[i]) for i, v in coded])
                got.update(i for (i, _), filled in zip(coded, decoded, strict=True) if filled)
                coded.clear()

        if tier.codec is not None:
            await self._read_coded(tier, keys, pending, [v.nbytes for v in views], until, settle)
        elif tier.lends_memory or not isinstance(tier.backend, SupportsGetInto):
            values = await self._call(tier, "get", tier.backend.get, [keys[i] for i in pending], until=until)
            if values is FAULT:
                self.metrics.misses.labels(tier.name).inc(len(pending))
                return got
            await settle(pending, values)
            del values
        else:
            direct = [i for i in pending if isinstance(outs[i], HostBuffer)]
            staged = [i for i in pending if not isinstance(outs[i], HostBuffer)]
            bufs = [cast("HostBuffer", outs[i]) for i in direct]
            stage: list[HostBuffer] = []
            for i in staged:  # a foreign buffer must not be handed to a call that may outlive us
                buf = self.host_pool.try_allocate(views[i].nbytes)
                if buf is None:
                    break
                stage.append(buf)
            staged = staged[: len(stage)]
            try:
                filled = await self._sliced_into(tier, [keys[i] for i in direct + staged], bufs + stage, until)
                for i, ok in zip(direct, filled, strict=False):
                    if ok:
                        got.add(i)
                for i, buf, ok in zip(staged, stage, filled[len(direct):], strict=True):
                    if ok:
                        views[i][:] = buf.view()
                        got.add(i)
            finally:
                release_all(stage)
        self._count_reads(tier, len(got), len(pending) - len(got), sum(views[i].nbytes for i in got))
        return got

    async def _sliced_into(self, tier: Tier, keys: list[ChunkKey], bufs: list[HostBuffer],
                           until: float | None) -> list[bool]:
        """``tier.get_into`` of ``keys`` into ``bufs``, in slices with a deadline each."""
        backend = cast("SupportsGetInto", tier.backend)
        cuts = _slices([b.nbytes for b in bufs])
        parts = [_Part((keys[lo:hi], [b.view() for b in bufs[lo:hi]]), 0, bufs[lo:hi]) for lo, hi in cuts]
        outcomes = await self._calls(tier, "get_into", _get_into_call(backend), parts, until=until)
        filled = [False] * len(keys)
        answered: list[int] = []  # keys the tier answered (a miss or a hit), not faulted
        for (lo, hi), got in zip(cuts, outcomes, strict=True):
            if got is not FAULT:
                filled[lo:hi] = [bool(x) for x in got]
                answered.extend(range(lo, hi))
        missed = [i for i in answered if not filled[i]]
        if missed and isinstance(tier.backend, SupportsCodecs):
            for i in await self._decode_missed(tier, [keys[i] for i in missed], [bufs[i] for i in missed], until):
                filled[missed[i]] = True
        return filled

    async def _decode_missed(self, tier: Tier, keys: list[ChunkKey], bufs: list[HostBuffer],
                             until: float | None) -> list[int]:
        """A tier configured without a codec that keeps codec ids answers ``get_into`` with raw
        values only; a value another process stored there encoded (its tier had ``codec:``) is a
        miss to it, although ``contains`` (and so ``lookup``) counts it. Ask the keys ``get_into``
        missed again with ``get``, which returns such values with their codec facts, and decode
        them into ``bufs`` — what the header promises: a reader decodes whatever carries a codec
        id it knows, whatever its own tier config says. Costs a genuine miss one more call within
        the same deadline; the indices filled. (A tier *with* a codec is read with ``get`` in
        slices and never comes here.)"""
        values = await self._call(tier, "get", tier.backend.get, keys, until=until)
        if values is FAULT:
            return []
        coded: list[int] = []
        filled: list[int] = []
        for j, value in enumerate(values):
            values[j] = None  # our reference from here
            if value is None:
                continue
            if _codec_of(value):
                if value.raw_length == bufs[j].nbytes:
                    coded.append(j)
                    values[j] = value
            elif as_bytes_view(value).nbytes == bufs[j].nbytes:  # stored raw meanwhile
                bufs[j].view()[:] = as_bytes_view(value)
                filled.append(j)
            del value
        if coded:
            done = await self._decode_jobs(tier, [(keys[j], values[j], bufs[j].view()) for j in coded])
            filled += [j for j, ok in zip(coded, done, strict=True) if ok]
            level = logging.DEBUG if tier.name in self._foreign_codecs_logged else logging.WARNING
            self._foreign_codecs_logged.add(tier.name)
            log.log(level, "lmtier tier %s (codec: none): %d of %d value(s) read were stored encoded (codec ids %s) "
                    "by a process whose tier has a codec; decoded. Configure the same codec on this tier in "
                    "every process sharing it (then reads decode slice by slice, without a second call)",
                    tier.name, len(coded), len(keys), sorted({values[j].codec for j in coded}))
            self.metrics.codec_foreign_values.labels(tier.name).inc(len(coded))
        del values
        return sorted(filled)

    def _count_reads(self, tier: Tier, hits: int, misses: int, nbytes: int) -> None:
        self.metrics.hits.labels(tier.name).inc(hits)
        self.metrics.misses.labels(tier.name).inc(misses)
        self.metrics.bytes_read.labels(tier.name).inc(nbytes)

    async def _promote_filled(self, found_in: int, items: list[tuple[ChunkKey, Any]]) -> None:
        """Promote hits that landed in ``items``' buffers into hotter tiers (``promote: true``).

        The hot tier takes them now: by adoption when the buffer is its own memory (fetch carves
        it so), else by a copy, before the caller's buffer can change. Other hotter tiers get a
        stable value in the background (the hot tier's lease when it took one, else a copy).
        """
        hot = self.tiers[0]
        stable: list[Item] = []
        if found_in > 0 and hot.config.promote and await self._write(hot, items) > 0:
            self.metrics.promotions.labels(hot.name).inc(len(items))
        for tier in self.tiers[1:found_in]:
            if tier.config.promote:
                if not stable:
                    stable = [(k, _stable(v)) for k, v in items]
                self._enqueue(tier, _Job("promote", stable))

    def _enqueue(self, tier: Tier, job: _Job) -> None:
        try:
            tier.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.skipped_writes.labels(tier.name, "queue_full").inc(len(job.items))
            log.debug("lmtier tier %s: background queue full, dropped %d %s item(s)",
                      tier.name, len(job.items), job.kind)
        self.metrics.queue_depth.labels(tier.name).set(tier.queue.qsize())

    def _promote(self, found_in: int, items: list[Item]) -> None:
        for tier in self.tiers[:found_in]:
            if tier.config.promote:
                self._enqueue(tier, _Job("promote", items))

    def _eviction_listener(self, tier: Tier) -> Callable[[ChunkKey, Buffer], None]:
        def on_evict(key: ChunkKey, value: Buffer) -> None:
            self.metrics.evictions.labels(tier.name).inc()
            if self._residency:
                self._note(tier, [key], False)
            if self._closed or tier.index + 1 >= len(self.tiers):
                return
            nxt = self.tiers[tier.index + 1]
            if nxt.queue.full():
                self.metrics.skipped_writes.labels(nxt.name, "queue_full").inc()
                return
            # Copy out of the evicting tier: holding its memory until the demotion lands would make
            # it evict even more entries to make room for the put that triggered this eviction.
            job = _Job("demote", [(key, _copy_carried(value))])
            if threading.get_ident() == self._loop_thread:
                self._enqueue(nxt, job)
            else:  # backends may evict from their I/O threads
                self._loop.call_soon_threadsafe(self._enqueue, nxt, job)

        return on_evict

    async def _drain(self, tier: Tier) -> None:
        """Background writer of one tier: async writes, promotions and demotions, in order."""
        while True:
            job = await tier.queue.get()
            tier.writing += 1
            try:
                items = job.items
                if job.kind == "demote" or job.check:
                    # a failed check drops the job: its items count as skipped writes (with the reason)
                    present = await self._call(tier, "contains", tier.backend.contains, [k for k, _ in items],
                                               writes=len(items))
                    if present is FAULT:
                        continue
                    items = [it for it, p in zip(items, present, strict=True) if not p]
                if items and await self._write(tier, items) > 0:
                    counter = {"demote": self.metrics.demotions, "promote": self.metrics.promotions}.get(job.kind)
                    if counter is not None:
                        counter.labels(tier.name).inc(len(items))
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad job kill the writer
                log.exception("lmtier tier %s: background %s failed", tier.name, job.kind)
            finally:
                # drop our references now: a demoted lease view pins its slab range until freed
                job = items = None  # type: ignore[assignment]
                tier.writing -= 1
                tier.queue.task_done()
                self.metrics.queue_depth.labels(tier.name).set(tier.queue.qsize())


#: how long a bounded close waits for backends to close even when its budget is spent
_CLOSE_GRACE_S = 0.05


async def _reclaim(attempts: Sequence[asyncio.Task[StorageBackend]], grace_s: float = 10.0) -> None:
    """Cancel open attempts and close the backends any of them opened anyway (waiting ``grace_s``)."""
    for attempt in attempts:
        attempt.cancel()
    pending: set[asyncio.Task[StorageBackend]] = set()
    if attempts:
        _, pending = await asyncio.wait(attempts, timeout=grace_s)
    closing: set[asyncio.Task[None]] = set()  # referenced until they end

    def close_when_opened(attempt: asyncio.Task[StorageBackend]) -> None:
        if not attempt.cancelled() and attempt.exception() is None:
            task = asyncio.get_running_loop().create_task(attempt.result().aclose(), name="lmtier-close-late-open")
            closing.add(task)
            task.add_done_callback(closing.discard)

    for attempt in attempts:
        if attempt in pending:  # a client stuck in a thread: close what it opens when it ends
            log.warning("lmtier: a tier was still opening at close; it is closed when that ends")
            attempt.add_done_callback(close_when_opened)
        elif not attempt.cancelled() and attempt.exception() is None:
            await attempt.result().aclose()


async def _awaited(fn: Callable[[T], Awaitable[Any]], arg: T) -> Any:
    return await fn(arg)  # a coroutine for create_task, whatever awaitable a backend returns


def _get_into_call(backend: SupportsGetInto) -> Callable[[tuple[list[ChunkKey], list[memoryview]]], Awaitable[list[bool]]]:
    async def call(arg: tuple[list[ChunkKey], list[memoryview]]) -> list[bool]:
        return await backend.get_into(*arg)

    return call


def _one_torch_thread() -> None:
    """A codec worker's torch ops run on its own thread only (torch's setting is per thread).

    The pool already runs one value per core; torch splitting each op of every worker over all
    cores again made them wait on each other (2 cores: fp8 decode on 2 workers 0.75 GB/s, vs
    2.0 on one thread alone)."""
    import torch

    # torch's own function: vLLM's CPU worker replaces torch.set_num_threads with a no-op that
    # warns, to keep its bound compute threads; this thread is not one of them
    torch._C.set_num_threads(1)


def _codec_of(value: object) -> int:
    """The codec id a tier's value carries (0: raw): a :class:`~lmtier.kit.Payload`'s."""
    return getattr(value, "codec", 0) if type(value).__name__ == "Payload" else 0


def _nbytes(value: object) -> int:
    try:
        return as_bytes_view(value).nbytes
    except InvalidArgumentError:  # a third-party value the manager will refuse later: no bytes here
        return 0


def _into_bytes(arg: tuple[Sequence[ChunkKey], Sequence[memoryview]], filled: Sequence[bool] | None) -> int:
    """Bytes a get_into call read: of the buffers it filled (all of them when ``filled`` is None)."""
    views = arg[1]
    if filled is None:
        return sum(v.nbytes for v in views)
    return sum(v.nbytes for v, ok in zip(views, filled, strict=False) if ok)


def _check_sizes(sizes: Sequence[object]) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise InvalidArgumentError(f"sizes must be a sequence of ints, got {type(sizes).__name__}")
    out = []
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidArgumentError(f"sizes must be positive ints, got {size!r}")
        out.append(size)
    return out


def _consume(task: asyncio.Task[Any]) -> str:
    """Retrieve a finished task's outcome (so asyncio never logs it as unretrieved); describe it."""
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return "ok" if exc is None else f"{type(exc).__name__}: {exc}"


def _slices(sizes: Sequence[int], limit: int = SLICE_BYTES) -> list[tuple[int, int]]:
    """``[lo, hi)`` runs of consecutive items of at most ``limit`` bytes (at least one item each)."""
    out: list[tuple[int, int]] = []
    lo, total = 0, 0
    for i, size in enumerate(sizes):
        if i > lo and total + size > limit:
            out.append((lo, i))
            lo, total = i, 0
        total += size
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


def _carried(items: Sequence[PutItem], like: Sequence[Item] | None = None) -> list[Item]:
    """``items``' values as kit Payloads: each value's checksum is computed at most once for all
    the tiers it reaches (``like``: the same values already carried, whose checksums to share)."""
    from lmtier.kit.values import Payload  # numpy: imported with the first put, not with lmtier

    shared = [cast("Payload", p) for _, p in like] if like is not None else [None] * len(items)
    return [(k, cast("Buffer", Payload.of(v, like=s))) for (k, v), s in zip(items, shared, strict=True)]


def _copy_carried(value: Buffer) -> Buffer:
    """A private copy of an evicted value (the evicting tier reuses its memory next), keeping the
    checksum it carries (the disk tier verified it)."""
    from lmtier.kit.values import Payload

    return cast("Buffer", Payload.copy_of(value))


def _stable(value: Buffer | HostBuffer) -> Buffer:
    """A value that stays valid after put returns (background writes outlive the call)."""
    if isinstance(value, HostBuffer):
        return value.lease_view()
    if isinstance(value, bytes):
        return value
    if isinstance(value, memoryview) and value.readonly and isinstance(value.obj, bytes):
        return value
    from lmtier.memory import host_tensor_of

    if isinstance(value, memoryview) and value.readonly and host_tensor_of(value) is not None:
        return value  # a lease view holds its own reference on the pool range
    return bytes(as_bytes_view(value))


def _error_kind(exc: BaseException) -> str:
    for cls in (BackendTimeoutError, BackendUnavailableError, CapacityError, CorruptDataError, BackendError):
        if isinstance(exc, cls):
            return cls.__name__.removesuffix("Error").lower()
    return "unexpected" if not isinstance(exc, LmtierError) else type(exc).__name__.lower()


def _check_items(items: object) -> None:
    """``items`` must be a sequence of ``(ChunkKey, buffer)`` pairs; InvalidArgumentError otherwise."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidArgumentError(f"items must be a sequence of (ChunkKey, buffer) pairs, got {type(items).__name__}")
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidArgumentError(f"each item must be a (ChunkKey, buffer) pair, got {item!r:.80}")
        key, value = item
        if not isinstance(key, ChunkKey):
            raise InvalidArgumentError(f"keys must be lmtier.ChunkKey, got {type(key).__name__}: {key!r:.80}")
        if as_bytes_view(value).nbytes == 0:  # InvalidArgumentError for non-buffers, before anything is written
            raise InvalidArgumentError(f"{key}: empty values are refused (0 bytes); a chunk's KV is never empty, "
                                       "so this is a bug upstream: skip the put")


def _check_keys(keys: Sequence[object]) -> None:
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise InvalidArgumentError(f"keys must be a sequence of ChunkKey, got {type(keys).__name__}")
    for k in keys:
        if not isinstance(k, ChunkKey):
            raise InvalidArgumentError(f"keys must be lmtier.ChunkKey, got {type(k).__name__}: {k!r}")


def _answered(exc: BaseException) -> bool:
    """Whether a failed call's error came from a tier that answered (so it may answer key by key):
    not unavailable or timed out (asking again would cost more deadlines), not bad input."""
    return isinstance(exc, Exception) and not isinstance(exc, (BackendUnavailableError, InvalidArgumentError))


def _keys_in(op: str, part: _Part[Any]) -> int:
    """How many keys one call's argument carries (get_into's is ``(keys, views)``)."""
    return len(part.arg[0]) if op == "get_into" else len(part.arg)


def _split_part(op: str, part: _Part[Any]) -> list[_Part[Any]]:
    """``part`` as one part per key. Each keeps the whole part's memory (``holds``): a detached
    single-key call keeps it out of circulation, as the batch call would have."""
    if op == "get_into":
        keys, views = part.arg
        return [_Part(([k], [v]), 0, part.holds) for k, v in zip(keys, views, strict=True)]
    return [_Part(part.arg[j:j + 1], 1 if part.writes else 0, part.holds) for j in range(len(part.arg))]


def _merged(op: str, outcomes: Sequence[Any]) -> Any:
    """One answer for a batch from its single-key calls' (FAULT where a key's call failed)."""
    if all(r is FAULT for r in outcomes):
        return FAULT
    if op == "get":
        return [None if r is FAULT else r[0] for r in outcomes]
    if op in ("contains", "get_into"):
        return [False if r is FAULT else bool(r[0]) for r in outcomes]
    return _PerKeyWrite([r is not FAULT for r in outcomes], list(outcomes))  # put, delete
