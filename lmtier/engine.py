"""KVCacheEngine: the KV-aware façade engines call — tokens in, paged KV pages in and out.

::

    ns = KVNamespace(model="m", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=32,
                     block_size=16, num_kv_heads=8, head_size=128, page_bytes=65536, chunk_tokens=256)
    with KVCacheEngine("lmtier.yaml", ns) as engine:
        hit = engine.lookup(tokens)                          # tokens available, block-aligned
        loaded = engine.retrieve(tokens, kv_caches, block_ids, start=0, end=hit)
        engine.store(tokens, kv_caches, block_ids)           # returns at once; tiers written behind

**Chunks and blocks.** The engine's cache is paged: ``block_ids[i]`` holds tokens
``[i*block_size, (i+1)*block_size)`` in every layer (``kv_caches``, one tensor per layer, all of
the namespace's ``kv_layout``). A prompt is cut into chunks of ``chunk_tokens`` (a multiple of
``block_size``), each stored as one value ``[layers x pages x page_bytes]`` (the
:mod:`lmtier.transfer` host format) under a key naming the chunk *and its whole prefix*. Only
whole chunks are stored, plus — with ``save_tail`` (default) — the block-aligned tail after the
last whole chunk, under a key of its own (a partial chunk's key never aliases the full chunk it
could grow into). A lookup counts the leading whole chunks present and then probes the tail
lengths after them, so a repeated prompt finds its tail too. A retrieve may load a prefix of a
chunk (only the pages it needs), so a hit is usable down to block granularity.

**Storage.** Everything below the engine is one :class:`~lmtier.store.KVStore`: a
:class:`~lmtier.store.LocalStore` (the tiers of ``config``, in this process) or one passed in
(``kvstore=``, e.g. a ``ServerStore`` of ``lmtier serve``). The engine never touches a tier.

**The critical path.** ``store`` asks the store for host buffers (never waiting on a tier; chunks
the hot tier holds already are skipped), copies the pages into them — synchronously for CPU
caches, enqueued on a CUDA stream otherwise — and returns; the commit (presence checks of the
other tiers, every tier write) happens behind it, after the copy completed. ``lookup`` and
``retrieve`` wait on tiers only within their deadlines (the store's per-tier deadlines; a whole
lookup, its tail probes included, within the longest lookup deadline: ``lookup_timeout_s``;
``load_timeout_s`` bounds a whole load).

**Retrieval.** :meth:`start_retrieve` starts the fetch and returns a :class:`RetrieveHandle`.
The store lends host chunks holding the pages: a RAM hit is the hot tier's own memory, a colder
hit was read once into it; the onload reads them in place (pinned where CUDA is). Only the first
or last chunk of a load, when just part of its pages is wanted, is copied once more (the
transfer layer reads whole ``[layers x pages]`` chunks). On CUDA, the onload runs on a side
stream, one layer at a time, each followed by an event: :meth:`RetrieveHandle.wait_layer` makes
the current stream wait for that layer's event only, so loading layer ``l+1`` overlaps computing
layer ``l``; the host chunks are returned once the last copy completed, by a background thread
(no caller waits for it). On CPU, ``wait_layer`` copies the layers up to ``l`` in place.

**Quantized on the device.** With a ``device_codec`` (config ``device_codec: fp8``, or the
argument), chunks are quantized where the cache is (:mod:`lmtier.transfer.coded`: gathered into a
device buffer, encoded there, only the encoding copied to the host) and dequantized there after
the copy back, so every offload and onload moves about half the bytes and every tier, the RAM
tier included, holds twice the chunks. The codec's tag enters the namespace (lossy KV is served
only to engines configured alike); the tiers store the encodings as they are (a lossy tier codec
on top would quantize twice: a ConfigError). On CUDA the onload of a coded load is one step for
all layers (not layer by layer). The encoding is the codec's own, so a CPU engine decodes what a
GPU one stored, and back (``docs/codecs.md``).

**Faults are misses.** A tier fault, a chunk that is missing when fetched, or a value of the wrong
size ends the loaded prefix there; the caller recomputes the rest. Only bad arguments raise
(:class:`~lmtier.errors.InvalidArgumentError`). Every host buffer borrowed along the way is
returned on every path, errors and cancellation included.

**Load only what beats recomputing** (:mod:`lmtier.cost`). A lookup answers the tokens *worth
loading*: with ``load_policy: cost`` (the default) the hit's chunks are weighed where they live
now (the store's learned read cost of each tier, plus the share of the engine's learned onload
cost that layer-wise loading does not hide) against the engine's learned prefill speed
(:meth:`observe_compute`, fed by the integration), and only the prefix expected to load faster
than it computes is answered. The chunks skipped that way are promoted in the background to a
faster tier (or, when there is none, one of them is read to keep the tier's estimate current), so
the next request finds them in RAM. No estimate yet (a cold start): everything is loaded, and the
load teaches the estimates.

Log lines (logger ``lmtier.engine``): ``Stored N of M tokens for request R (K already present)``
after a store reaches the tiers; per recorded lookup ``Request R: total N tokens, hit M`` and,
for a weighed hit, what is loaded and why, e.g. ``Request R: total 10000 tokens, hit 9984 tokens,
loading 0 (disk ~680 ms > recompute ~360 ms), promoting``.
Metrics (the store's registry): ``lmtier_requested_tokens``, ``lmtier_hit_tokens``,
``lmtier_hit_ratio``, ``lmtier_loaded_tokens``, ``lmtier_stored_tokens``,
``lmtier_skipped_tokens``, ``lmtier_load_decisions{outcome}``,
``lmtier_recompute_tokens_per_second{prompt_tokens}``, ``lmtier_onload_bytes_per_second``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from lmtier.config import LmtierConfig, load_config
from lmtier.cost import (
    METRIC_PROMPT_LENGTHS,
    ChunkSpan,
    LoadPlan,
    LoadPolicy,
    OnloadEstimator,
    RecomputeEstimator,
    SupportsReadCosts,
    plan_load,
)
from lmtier.errors import ConfigError, InvalidArgumentError, LmtierError, NotSupportedError
from lmtier.keys import ChunkKey, KVNamespace, chunk_keys, partial_keys
from lmtier.memory import release_all
from lmtier.store import HostChunk, KVStore, LocalStore, LookupResult, SupportsNamespaces

if TYPE_CHECKING:
    import os

    import numpy as np
    import torch
    from prometheus_client import CollectorRegistry

    from lmtier.manager import StorageManager
    from lmtier.metrics import Metrics
    from lmtier.registry import BackendRegistry
    from lmtier.transfer import PageLayout

__all__ = ["DEVICE_CODEC_FIELD", "KVCacheEngine", "Located", "RetrieveHandle", "StoreHandle"]

#: The namespace field (``KVNamespace.extra``) naming the engine's device codec (its tag).
DEVICE_CODEC_FIELD = "device_codec"

log = logging.getLogger("lmtier.engine")
_NAMESPACE_RE = re.compile(r"^[0-9a-f]{16}$")
#: How much longer than its own budget the engine waits for a fetch future (the store promises
#: to answer by the budget; this only covers a store that does not).
_FETCH_GRACE_S = 1.0
#: A lookup's tail probes are not sent with less of its budget left than this (they would miss).
_MIN_PROBE_S = 0.005
T = TypeVar("T")


@dataclass
class _Chunk:
    """One chunk of a transfer: its key, the pages of it in play, and the blocks they map to."""

    key: ChunkKey
    tokens: tuple[int, int]  # [start, end) of the chunk's stored extent
    stored_pages: int  # pages the stored value holds
    first_page: int  # first page of the value to move
    block_ids: list[int]  # destination/source blocks of pages [first_page, first_page + len)
    alt_key: ChunkKey | None = None  # a tail key to try when the full key misses


@dataclass(frozen=True)
class Located:
    """A lookup's answer with where it lives (:meth:`KVCacheEngine.locate_async`).

    Attributes:
        tokens: the tokens worth loading, as :meth:`KVCacheEngine.lookup` gives it.
        runs: ``(tier, tokens)`` runs in prefix order, summing to the whole hit (``tokens`` or
            more, see ``plan``): the hottest tier holding each chunk (what a load would read now).
            A store that does not say which tier names it ``""``.
        plan: how the hit was weighed (:class:`~lmtier.cost.LoadPlan`: ``hit_tokens``,
            ``load_tokens`` = ``tokens``, the ``reason``); None only for a bare ``Located``.
    """

    tokens: int
    runs: tuple[tuple[str, int], ...] = ()
    plan: LoadPlan | None = None


class StoreHandle:
    """A store in flight: ``copied`` once the pages are out of the cache, ``done`` once in the tiers.

    ``copy_event`` (CUDA caches) is the event after the offload on its stream: order a kernel
    that overwrites the stored blocks after it (``stream.wait_event``), or wait for ``copied``.
    ``keys``: the keys of every chunk the store covers, in token order (those already present
    included), e.g. to follow where they live (:class:`~lmtier.store.SupportsResidency`).
    """

    def __init__(self, request_id: str | None, offered: int, copied: concurrent.futures.Future[None],
                 done: concurrent.futures.Future[int], copy_event: Any = None,
                 keys: Sequence[ChunkKey] = ()) -> None:
        self.request_id = request_id
        self.offered_tokens = offered
        self.copied = copied
        self.done = done
        self.copy_event = copy_event
        self.keys = tuple(keys)

    def wait(self, timeout: float | None = None) -> int:
        """Block until the tiers have it; returns the tokens written (0 after a fault)."""
        return self.done.result(timeout)


def _finished(value: T) -> concurrent.futures.Future[T]:
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    fut.set_result(value)
    return fut


class RetrieveHandle:
    """A retrieve in flight. Call :meth:`wait_layer` per layer or :meth:`wait` once, then it is done.

    :attr:`loaded_tokens` (after the first wait) counts the tokens from ``start`` whose pages were
    (or are being) written in every layer; blocks past ``start + loaded_tokens`` were not touched
    except when :attr:`failed` is set, in which case nothing in ``[start, end)`` may be trusted.
    :attr:`staged_chunks` counts chunks copied once more on the host (partial chunks).
    """

    def __init__(self, engine: KVCacheEngine, kv_caches: Sequence[torch.Tensor], layout: PageLayout,
                 chunks: list[_Chunk], fetch: concurrent.futures.Future[list[HostChunk | None]], start: int,
                 end: int, request_id: str | None) -> None:
        self._engine = engine
        self._kv = list(kv_caches)
        self._layout = layout
        self._chunks = chunks
        self._fetch = fetch
        self.start = start
        self.end = end
        self.request_id = request_id
        self._hosts: list[torch.Tensor] | None = None
        self._ids: list[list[int]] = []
        self._spans: list[tuple[int, int]] = []  # (first page, stored pages) of each host chunk
        self._held: list[HostChunk] = []  # lent and staging chunks, returned by close()
        self._done_layers: set[int] = set()
        self._events: list[Any] | None = None  # CUDA: one event per layer after its onload
        self._closed = False
        self.loaded_tokens = 0
        self.staged_chunks = 0
        self.failed = False
        self.load_start: Any = None  # CUDA timing events around the onload (enqueue(timing=True))
        self.load_end: Any = None
        # CUDA: (start, end, bytes) of the onload, read once it completed: the engine's onload cost
        self._timed: tuple[Any, Any, int] | None = None

    @property
    def cuda(self) -> bool:
        return bool(self._kv and self._kv[0].is_cuda)

    def _resolve(self) -> None:
        if self._hosts is not None:
            return
        self._hosts = []
        engine = self._engine
        values = engine._fetched(self._fetch, len(self._chunks))
        last = self._chunks[-1] if self._chunks else None
        if last is not None and values[-1] is None and last.alt_key is not None:
            # the full chunk is absent: its tail, stored under a key of its own, covers exactly these pages
            pages = last.first_page + len(last.block_ids)
            size = engine._value_nbytes(len(self._kv), pages, self._layout)
            (alt,) = engine._fetched(engine.kvstore.fetch([last.alt_key], [size], timeout_s=engine.load_timeout_s), 1)
            if alt is not None:
                last.key, last.alt_key, last.stored_pages = last.alt_key, None, pages
                last.tokens = (last.tokens[0], last.tokens[0] + pages * engine.block_size)
                values[-1] = alt
        self._held.extend(v for v in values if v is not None)
        loaded_end = self.start
        for chunk, value in zip(self._chunks, values, strict=True):
            host = self._host_pages(chunk, value)
            if host is None:
                break
            self._hosts.append(host)
            self._ids.append(chunk.block_ids)
            self._spans.append((chunk.first_page, chunk.stored_pages))
            loaded_end = chunk.tokens[0] + (chunk.first_page + len(chunk.block_ids)) * engine.block_size
        self.loaded_tokens = max(0, loaded_end - self.start)

    def _host_pages(self, chunk: _Chunk, value: HostChunk | None) -> torch.Tensor | None:
        """A contiguous ``[layers x pages x page_bytes]`` tensor of the chunk's pages in play, or None."""
        if value is None:
            return None
        if self._engine.device_codec is not None:
            return value.tensor  # an encoding: decoded whole on the device, its pages in play picked there
        layers, page = len(self._kv), self._layout.page_bytes
        pages = len(chunk.block_ids)
        if chunk.first_page == 0 and pages == chunk.stored_pages:
            return value.tensor  # the lent chunk itself: read in place
        (buf,) = self._engine.kvstore.reserve([layers * pages * page])  # the pages in play, copied once more
        if buf is None:
            log.warning("lmtier: no host memory to stage part of %s; the load stops there", chunk.key)
            return None
        self._held.append(buf)
        self.staged_chunks += 1
        src = value.tensor.view(layers, chunk.stored_pages, page)
        buf.tensor.view(layers, pages, page).copy_(src[:, chunk.first_page: chunk.first_page + pages])
        return buf.tensor

    def enqueue(self, *, timing: bool = False) -> list[Any] | None:
        """CUDA: wait for the host chunks, then enqueue every layer's onload on the engine's load
        stream; returns one event per layer (None on CPU, where every layer is copied now).

        The load stream first waits for the current stream (its earlier kernels may still use the
        blocks). Order a consumer of layer ``l`` after ``events[l]``; :meth:`wait_layer` does.
        """
        if self._closed:
            return self._events
        self._resolve()
        if not self.cuda:
            self._onload([i for i in range(len(self._kv)) if i not in self._done_layers])
            return None
        if self._events is None:
            self._events = self._enqueue_cuda(timing)
        return self._events

    def _enqueue_cuda(self, timing: bool) -> list[Any]:
        import torch

        device = self._kv[0].device
        stream = self._engine.load_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        events: list[Any] = []
        layers = len(self._kv)
        begin = torch.cuda.Event(enable_timing=True)  # two events per load: the onload's cost is learned
        begin.record(stream)
        if not self._hosts or self.failed:
            ev = torch.cuda.Event()
            ev.record(stream)
            events = [ev] * layers
        else:
            from lmtier.transfer import onload

            try:
                if self._engine.device_codec is not None:
                    self._onload_coded(stream)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    events = [ev] * layers
                elif self._engine.layerwise:
                    for layer in range(layers):
                        onload(self._kv, self._layout, self._ids, self._hosts, layers=[layer], stream=stream)
                        ev = torch.cuda.Event()
                        ev.record(stream)
                        events.append(ev)
                else:
                    onload(self._kv, self._layout, self._ids, self._hosts, stream=stream)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    events = [ev] * layers
            except LmtierError as exc:
                stream.synchronize()  # what was enqueued still reads the host chunks
                self._fail(exc)
                ev = torch.cuda.Event()
                ev.record(stream)
                events = [ev] * layers
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        if timing:
            self.load_start, self.load_end = begin, end
        if self._hosts and not self.failed:
            self._timed = (begin, end, self._host_bytes())
        self._done_layers.update(range(layers))
        return events

    def _host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self._hosts or ())

    def wait_layer(self, layer: int) -> int:
        """Layer ``layer`` (and every lower one) is loaded for the caller: on CPU copied now, on
        CUDA ordered before the current stream's next kernels. Returns :attr:`loaded_tokens`."""
        if self._closed:
            return self.loaded_tokens
        if self.cuda:
            import torch

            events = self.enqueue()
            assert events is not None
            torch.cuda.current_stream(self._kv[0].device).wait_event(events[layer])
            return self.loaded_tokens
        self._resolve()
        self._onload([i for i in range(layer + 1) if i not in self._done_layers])
        return self.loaded_tokens

    def wait(self) -> int:
        """Every layer, then :meth:`close`; returns :attr:`loaded_tokens`."""
        if self._closed:
            return self.loaded_tokens
        try:
            self.wait_layer(len(self._kv) - 1)
        finally:
            self.close()
        return self.loaded_tokens

    def close(self) -> None:
        """Load no more and return the borrowed chunks (idempotent); cancels a fetch still running.

        On CUDA, chunks whose copies are enqueued go back once the last copy completed (a
        background thread waits for it); the caller never blocks here.
        """
        if self._closed:
            return
        self._closed = True
        if self._hosts is None:  # never resolved: the fetch's chunks (if any arrive) go back unused
            self._engine._drop_fetch(self._fetch)
        held, self._held = self._held, []
        self._hosts = []
        timed, engine = self._timed, self._engine
        if timed is not None:  # after the last copy: return the chunks, then learn what the onload took

            def done() -> None:
                release_all(held)
                begin, end, nbytes = timed
                engine._observe_onload(nbytes, begin.elapsed_time(end) / 1e3, overlapped=engine.layerwise)

            engine._after(timed[1], done)
        elif held and self._events:
            engine._after(self._events[-1], lambda: release_all(held))
        else:
            release_all(held)
        if not self.failed:
            self._engine._count_loaded(self.loaded_tokens)

    def _onload(self, layers: list[int]) -> None:
        if not layers or self.failed:
            return
        if self._hosts and self._engine.device_codec is not None:
            try:
                self._onload_coded(None)  # every layer at once: an encoding decodes whole
            except LmtierError as exc:
                self._fail(exc)
                return
            self._done_layers.update(range(len(self._kv)))
            return
        if self._hosts:
            from lmtier.transfer import onload

            t0 = time.perf_counter()
            try:
                onload(self._kv, self._layout, self._ids, self._hosts, layers=layers)
            except LmtierError as exc:
                self._fail(exc)
                return
            # on CPU the copy runs in the forward's thread, before the layers that need it: all exposed
            self._engine._observe_onload(self._host_bytes() * len(layers) // len(self._kv),
                                         time.perf_counter() - t0, overlapped=False)
        self._done_layers.update(layers)

    def _onload_coded(self, stream: Any) -> None:
        from lmtier.errors import CorruptDataError
        from lmtier.transfer.coded import onload_coded

        assert self._hosts is not None
        try:
            onload_coded(self._kv, self._layout, self._ids, self._hosts, self._engine.device_codec,
                         pages=self._spans, stream=stream)
        except ValueError as exc:  # an encoding that does not decode to its pages (it passed its checksum)
            raise CorruptDataError(f"a coded chunk does not decode: {exc}") from None

    def _fail(self, exc: LmtierError) -> None:
        self.failed = True
        self.loaded_tokens = 0
        log.error("lmtier: onload failed (%s); the %d-token range is reported unloaded", exc, self.end - self.start)

    def __enter__(self) -> RetrieveHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVCacheEngine:
    """Token-level lookup/store/retrieve of paged KV over a :class:`~lmtier.store.KVStore`.

    Args:
        config: tier configuration (YAML path, mapping, :class:`LmtierConfig`, or ``None`` for
            ``LMTIER_CONFIG`` / the embedded default), opened as a :class:`LocalStore` this
            engine owns; with ``kvstore`` it is only checked (``None`` then skips the check). Its
            ``chunk_tokens`` must equal the namespace's.
        kv: what makes the stored bytes interpretable; ``kv.namespace`` prefixes every key.
            ``kv.kv_layout`` is a :data:`lmtier.transfer.LAYOUT_KINDS` kind, ``kv.page_bytes`` one
            layer's block in bytes.
        save_tail: also store (and look up) the block-aligned tail after the last whole chunk.
        load_timeout_s: longest wait for a fetch; past it the load is a miss.
        layerwise: on CUDA, one onload and one event per layer (else one onload for all layers).
        kvstore: an open store to use instead of opening ``config`` (not closed by the engine).
        registry, metrics_registry, name: for the :class:`LocalStore` opened from ``config``.
        device_codec: a quantizing codec (``"fp8"``, ``{"name": "int8", "scales": "layer"}``) to
            run on the cache's device (see "Quantized on the device"); default: the config's
            ``device_codec``. ConfigError for a codec that cannot (lossless, unknown, KV it cannot
            quantize).
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | Mapping[str, Any] | LmtierConfig | None,
        kv: KVNamespace,
        *,
        save_tail: bool = True,
        load_timeout_s: float = 60.0,
        layerwise: bool = True,
        kvstore: KVStore | None = None,
        registry: BackendRegistry | None = None,
        metrics_registry: CollectorRegistry | None = None,
        name: str = "lmtier-engine",
        device_codec: str | Mapping[str, Any] | None = None,
    ) -> None:
        cfg = load_config(config) if config is not None or kvstore is None else None
        if kv.block_size <= 0 or kv.chunk_tokens <= 0 or kv.chunk_tokens % kv.block_size:
            raise ConfigError(
                f"chunk_tokens ({kv.chunk_tokens}) must be a positive multiple of the engine's block "
                f"size ({kv.block_size}); set chunk_tokens in the lmtier config accordingly"
            )
        if cfg is not None and cfg.chunk_tokens != kv.chunk_tokens:
            raise ConfigError(f"the config's chunk_tokens ({cfg.chunk_tokens}) differs from the KV "
                              f"namespace's ({kv.chunk_tokens}); build the namespace from the config")
        if not load_timeout_s > 0:
            raise InvalidArgumentError(f"load_timeout_s must be > 0, got {load_timeout_s!r}")
        self.device_codec = _device_codec(device_codec, cfg, kv, registry)
        if self.device_codec is not None:  # quantized KV is other KV: the codec enters the namespace
            kv = replace(kv, extra=(*kv.extra, (DEVICE_CODEC_FIELD, self.device_codec.tag())))
        self.kv = kv
        self.config = cfg
        self.namespace = kv.namespace
        self.block_size = kv.block_size
        self.chunk_tokens = kv.chunk_tokens
        self.pages_per_chunk = kv.chunk_tokens // kv.block_size
        self.save_tail = save_tail
        self.load_timeout_s = load_timeout_s
        #: a whole lookup's budget (its first store call, then the tail probes get the rest): the
        #: longest lookup deadline of the config's tiers, or of its server; None: unbounded
        self.lookup_timeout_s = _lookup_budget(cfg)
        self.layerwise = layerwise
        #: ``cost`` (weigh each hit: load what beats recomputing) or ``always``; may be changed live
        self.load_policy: LoadPolicy = cfg.load_policy if cfg is not None else "cost"
        self.load_margin = cfg.load_margin if cfg is not None else 0.1
        #: the engine's prefill speed, learned from :meth:`observe_compute`
        self.recompute = RecomputeEstimator(seed_tokens_per_s=cfg.recompute_tokens_per_s if cfg is not None else None)
        #: the cost of copying loaded bytes from host memory into the engine's cache, learned from the onloads
        self.onload = OnloadEstimator()
        self._onload_exposed = 1.0  # the share of it not hidden behind compute (layer-wise overlap)
        self._promoting: concurrent.futures.Future[int] | None = None
        self._layouts: dict[tuple[Any, ...], PageLayout] = {}
        self._pending: set[concurrent.futures.Future[int]] = set()
        self._pending_lock = threading.Lock()
        self._streams: dict[Any, Any] = {}
        self._closed = False
        self._owns_store = kvstore is None
        if kvstore is None and cfg is not None and cfg.server is not None:
            kvstore = _server_store(cfg, kv, metrics_registry, name)  # lmtier serve holds the tiers
        self.kvstore: KVStore = kvstore if kvstore is not None else LocalStore.open(
            cfg, registry=registry, metrics_registry=metrics_registry, name=name)
        if isinstance(self.kvstore, SupportsNamespaces):  # a lossy tier's codec enters the namespace
            try:
                self.kv = self.kvstore.register_namespace(kv)
                _one_quantizer(self.device_codec, self.kv)
            except BaseException:
                if self._owns_store:
                    self.kvstore.close()
                raise
            self.namespace = self.kv.namespace
        if self.device_codec is not None:
            from lmtier.codecs.base import KVGeometry

            self._geometry = KVGeometry.of(self.kv)
        # lookups wait on the store (and probe tails after the chunk lookup): off the caller's thread
        self._lookups = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=f"{name}-lookup")
        # waits for CUDA copies: commits after offloads, returns of host chunks after onloads
        self._waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-copies")

    # -- properties ----------------------------------------------------------------------------
    @property
    def metrics(self) -> Metrics:
        return self.kvstore.metrics

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def manager(self) -> StorageManager:
        """The StorageManager of a :class:`LocalStore` (for tests and tools; the engine uses none)."""
        if not isinstance(self.kvstore, LocalStore):
            raise NotSupportedError(f"this engine stores through {type(self.kvstore).__name__}, not a local manager")
        return self.kvstore.manager

    @property
    def tier_names(self) -> list[str]:
        """Names of the store's tiers, hottest first (empty when the store does not say)."""
        return list(self.kvstore.tier_names)

    # -- lookup --------------------------------------------------------------------------------
    def lookup(self, token_ids: Any, *, request_id: str | None = None, record: bool = True,
               limit: int | None = None, namespace: str | None = None, start: int = 0) -> int:
        """Tokens of ``token_ids``'s prefix worth loading now (a multiple of the block size).

        That is the stored prefix, or — with ``load_policy: cost`` — the part of it expected to
        load faster than the engine recomputes it (see the module doc; :meth:`locate_async` tells why).
        ``start``: tokens the caller has already (its own prefix cache): they cost nothing either
        way, and an answer of at most ``start`` means "load nothing".

        ``limit`` caps the answer (rounded down to a block), for a caller that computes the last
        tokens itself: pass the whole prompt and the cap rather than a shortened prompt, so that
        a chunk stored whole can serve its leading blocks (a shortened prompt names only the
        chunk's tail key). ``record`` counts the lookup in the hit metrics and logs it (once per
        request, please). A fault is a miss (0). ``namespace`` (default: the engine's) keys the
        lookup under another namespace, e.g. one that adds a tenant's salt or a LoRA adapter to the
        engine's (:meth:`derive_namespace`); store and retrieve take the same argument.
        """
        return self.lookup_async(token_ids, request_id=request_id, record=record, limit=limit,
                                 namespace=namespace, start=start).result()

    def lookup_async(self, token_ids: Any, *, request_id: str | None = None, record: bool = True,
                     limit: int | None = None, namespace: str | None = None,
                     start: int = 0) -> concurrent.futures.Future[int]:
        """:meth:`lookup` without blocking: a future of the tokens to load (never an exception)."""
        args = self._lookup_args(token_ids, limit, namespace, start)
        return self._lookups.submit(lambda: self._lookup(*args, request_id, record).tokens)

    def locate_async(self, token_ids: Any, *, request_id: str | None = None, record: bool = True,
                     limit: int | None = None, namespace: str | None = None,
                     start: int = 0) -> concurrent.futures.Future[Located]:
        """:meth:`lookup_async` that also says which tier holds each part of the hit, and how it
        was weighed (:attr:`Located.plan`)."""
        args = self._lookup_args(token_ids, limit, namespace, start)
        return self._lookups.submit(self._lookup, *args, request_id, record)

    def observe_compute(self, spans: Sequence[tuple[int, int]], seconds: float) -> None:
        """Teach the engine its prefill speed: a forward computed tokens ``[start, end)`` of each
        request in ``spans`` in ``seconds`` (and loaded nothing). Integrations call it; thread-safe."""
        self.recompute.observe(spans, seconds)
        cost = self.recompute.cost()
        if cost is not None:
            for n in METRIC_PROMPT_LENGTHS:
                self.metrics.recompute_tokens_per_s.labels(str(n)).set(cost.tokens_per_s(n))

    def _observe_onload(self, nbytes: int, seconds: float, *, overlapped: bool) -> None:
        """An onload copied ``nbytes`` in ``seconds``; ``overlapped``: layer by layer on a side stream,
        so that all but about one layer's share hides behind the forward's compute (a copy slower than
        the compute it overlaps shows more; the estimate leaves that out)."""
        if nbytes <= 0:
            return
        self.onload.observe(nbytes, seconds)
        layers = self.kv.num_layers
        self._onload_exposed = 1.0 / layers if overlapped and layers > 1 else 1.0
        cost = self.onload.cost()
        if cost is not None:
            self.metrics.onload_bytes_per_s.set(cost.bytes_per_s)

    def _lookup_args(self, token_ids: Any, limit: int | None, namespace: str | None,
                     start: int) -> tuple[np.ndarray[Any, Any], int | None, str, int]:
        tokens = _tokens(token_ids)
        self._check_open()
        if limit is not None and limit < 0:
            raise InvalidArgumentError(f"limit={limit} must be >= 0")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise InvalidArgumentError(f"start={start!r} must be an int >= 0")
        return tokens, limit, self._namespace(namespace), start

    def _lookup(self, tokens: np.ndarray[Any, Any], limit: int | None, ns: str, start: int,
                request_id: str | None, record: bool) -> Located:
        total, c, b = len(tokens), self.chunk_tokens, self.block_size
        cap = total if limit is None else min(total, limit // b * b)
        # only the chunks reaching into [0, cap) are asked for, each under its whole-chunk key when
        # the tokens complete it: a chunk stored whole serves its leading blocks too
        tokens = tokens[: min(total, -(-cap // c) * c)]
        full: list[ChunkKey] = []
        found = LookupResult(0)
        tail: tuple[ChunkKey, str] | None = None  # a tail found after the whole chunks, and its tier
        try:
            full = chunk_keys(tokens, ns, c)
            began = time.monotonic()
            # the tails a whole hit could end with ride on the lookup (no probe of their own)
            ends = self._tail_ends(len(full) * c, cap)
            tails = partial_keys(tokens, ns, c, ends) if ends else []
            if full or tails:
                found = self.kvstore.lookup(full, tails=tails).result()
            hit = found.hit_chunks * c
            answers: Sequence[tuple[int, ChunkKey, str | None]] = ()
            if found.hit_chunks == len(full):
                answers = _tail_answers(ends, tails, found.tail_tiers)
            else:  # a shorter hit: probe the tails that would extend it, in one call, on the rest of the budget
                ends = self._tail_ends(hit, cap)
                left = self._lookup_left(began)
                if ends and left != 0.0:
                    tails = partial_keys(tokens, ns, c, ends)
                    probe = self.kvstore.lookup([], tails=tails, timeout_s=left).result()
                    answers = _tail_answers(ends, tails, probe.tail_tiers)
            for end, key, tier in answers:  # longest first
                if tier is not None:
                    hit, tail = end, (key, tier)
                    break
        except Exception as exc:  # the store degrades tier faults; anything else is still a miss
            log.warning("lmtier: lookup failed (%s: %s); treated as a miss", type(exc).__name__, exc)
            hit, found, tail = 0, LookupResult(0), None
        hit = min(hit, cap)
        chunks, keys = self._hit_chunks(hit, full, found, tail)
        plan = self._decide(chunks, start)
        promoting = ""
        if plan.decided and plan.load_chunks < len(chunks):
            promoting = self._promote(keys[plan.load_chunks:], chunks[plan.load_chunks:])
        if record:
            m = self.metrics
            m.requested_tokens.inc(total)
            m.hit_tokens.inc(hit)
            m.observe_hit_ratio()
            if not plan.decided:
                if plan.hit_tokens > start:
                    m.load_decisions.labels("unweighed").inc()
            else:
                m.load_decisions.labels("all" if not plan.skipped_tokens else
                                        "none" if plan.load_tokens <= start else "part").inc()
                m.skipped_tokens.inc(plan.skipped_tokens)
            if not plan.decided and (self.load_policy == "always" or plan.hit_tokens <= start):
                log.info("Request %s: total %d tokens, hit %d", request_id or "-", total, hit)
            else:
                log.info("Request %s: total %d tokens, hit %d tokens, loading %d (%s)%s", request_id or "-",
                         total, hit, max(0, plan.load_tokens - start), plan.reason, promoting)
        return Located(plan.load_tokens, _runs([(ch.tier or "", ch.end - ch.start) for ch in chunks], hit), plan)

    def _tail_ends(self, base: int, cap: int) -> list[int]:
        """Where a stored partial chunk after ``base`` tokens (a chunk boundary) could end, longest
        first: each whole block up to a chunk's pages - 1, within ``cap`` (none without save_tail)."""
        if not self.save_tail:
            return []
        b = self.block_size
        longest = min(self.pages_per_chunk - 1, (cap - base) // b)
        return [base + k * b for k in range(longest, 0, -1)]

    def _lookup_left(self, began: float) -> float | None:
        """What is left of a lookup's budget (:attr:`lookup_timeout_s`) for its later store calls
        (tail probes): None without a budget, 0.0 when spent. The first call waits on each tier
        for its own deadline (so a frozen tier is blamed and its circuit opens); the probes after
        it get only the rest, so a lookup waits about one deadline however many tiers froze."""
        if self.lookup_timeout_s is None:
            return None
        left = self.lookup_timeout_s - (time.monotonic() - began)
        return left if left > _MIN_PROBE_S else 0.0

    def _hit_chunks(self, hit: int, full: Sequence[ChunkKey], found: LookupResult,
                    tail: tuple[ChunkKey, str] | None) -> tuple[list[ChunkSpan], list[ChunkKey]]:
        """The hit's chunks as the decision sees them (tokens, stored bytes, tier) and their keys."""
        c, b = self.chunk_tokens, self.block_size
        per_page = self.kv.num_layers * self.kv.page_bytes
        spans: list[ChunkSpan] = []
        keys: list[ChunkKey] = []
        for i in range(min(found.hit_chunks, -(-hit // c))):
            tier = found.tiers[i] if i < len(found.tiers) else ""
            spans.append(ChunkSpan(i * c, min((i + 1) * c, hit), self.pages_per_chunk * per_page, tier or None))
            keys.append(full[i])
        if tail is not None and hit > found.hit_chunks * c:
            s = found.hit_chunks * c
            spans.append(ChunkSpan(s, hit, (hit - s) // b * per_page, tail[1] or None))
            keys.append(tail[0])
        return spans, keys

    def _decide(self, chunks: Sequence[ChunkSpan], start: int) -> LoadPlan:
        reads = self.kvstore.read_costs() if isinstance(self.kvstore, SupportsReadCosts) else {}
        return plan_load(chunks, policy=self.load_policy, margin=self.load_margin, reads=reads,
                         recompute=self.recompute.cost(), start=start, onload=self.onload.cost(),
                         onload_exposed=self._onload_exposed)

    def _promote(self, keys: Sequence[ChunkKey], chunks: Sequence[ChunkSpan]) -> str:
        """Read skipped chunks in the background so the next request finds them in a faster tier.

        Chunks whose tier has a hotter one above it are fetched (the store promotes what it
        fetches); when none has, one is read anyway: that read keeps the tier's learned cost
        current, or a tier that got faster would never be loaded from again. One such read at a
        time per engine; the returned words are for the log line.
        """
        names = self.tier_names
        colder = [(k, ch) for k, ch in zip(keys, chunks, strict=True)
                  if ch.tier is not None and ch.tier in names and names.index(ch.tier) > 0]
        what = ", promoting"
        if not colder:
            colder, what = list(zip(keys, chunks, strict=True))[:1], ", probing the tier"
        with self._pending_lock:
            if self._promoting is not None and not self._promoting.done():
                return ", not promoting (a promotion is running)"
            done: concurrent.futures.Future[int] = concurrent.futures.Future()
            self._promoting = done
            self._pending.add(done)
        done.add_done_callback(self._forget)
        try:
            fut = self.kvstore.fetch([k for k, _ in colder], [ch.nbytes for _, ch in colder])
        except Exception as exc:  # best effort: a promotion that cannot start is no error
            log.debug("lmtier: promotion not started (%s: %s)", type(exc).__name__, exc)
            done.set_result(0)
            return ""

        def release(f: concurrent.futures.Future[list[HostChunk | None]]) -> None:
            n = 0
            try:
                if not f.cancelled() and f.exception() is None:
                    for chunk in f.result():
                        if chunk is not None:
                            n += 1
                            chunk.release()
            finally:
                done.set_result(n)

        fut.add_done_callback(release)
        return what

    # -- store ---------------------------------------------------------------------------------
    def store(self, token_ids: Any, kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], *,
              end: int | None = None, request_id: str | None = None, namespace: str | None = None,
              stream: Any = None) -> StoreHandle:
        """Store the chunks of ``token_ids[:end]`` not yet present; returns once the pages are copied.

        ``end`` (default: all tokens) must have its pages in ``block_ids``. Whole chunks are stored,
        plus the block-aligned tail with ``save_tail``. Chunks the store's hot tier holds already
        are skipped without a copy. CUDA caches: the copy is enqueued on ``stream`` (default: the
        current stream, so later kernels reusing the blocks are ordered after it) and
        :attr:`StoreHandle.copy_event` follows it. The tier writes continue in the background
        (:attr:`StoreHandle.done`); :meth:`flush` waits for all of them.
        """
        tokens = _tokens(token_ids)
        self._check_open()
        n = len(tokens) if end is None else end
        if not 0 <= n <= len(tokens):
            raise InvalidArgumentError(f"end={end} must lie in [0, {len(tokens)}]")
        c, b = self.chunk_tokens, self.block_size
        stop = n // c * c + ((n % c) // b * b if self.save_tail else 0)
        if stop == 0:
            return StoreHandle(request_id, n, _finished(None), _finished(0))
        layout = self._layout_of(kv_caches)
        blocks = _block_list(block_ids)
        if len(blocks) < math.ceil(stop / b):
            raise InvalidArgumentError(f"{stop} tokens need {math.ceil(stop / b)} block ids, got {len(blocks)}")
        keys = chunk_keys(tokens[:stop], self._namespace(namespace), c, include_partial=True)
        spans = [(i * c, min((i + 1) * c, stop)) for i in range(len(keys))]
        sizes = [self._value_nbytes(len(kv_caches), (e - s) // b, layout) for s, e in spans]
        try:
            bufs = self.kvstore.reserve(sizes, keys=keys)
        except InvalidArgumentError:
            raise
        except LmtierError as exc:
            log.warning("lmtier: store of request %s skipped (%s: %s)", request_id, type(exc).__name__, exc)
            return StoreHandle(request_id, stop, _finished(None), _finished(0), keys=keys)
        todo = [(i, buf) for i, buf in enumerate(bufs) if buf is not None]
        if not todo:
            log.info("Stored 0 of %d tokens for request %s (%d already present)", stop, request_id or "-", stop)
            return StoreHandle(request_id, stop, _finished(None), _finished(0), keys=keys)
        event = None
        try:
            ids = [blocks[spans[i][0] // b: spans[i][1] // b] for i, _ in todo]
            if self.device_codec is not None:
                from lmtier.transfer.coded import offload_coded

                offload_coded(kv_caches, layout, ids, [buf.tensor for _, buf in todo], self.device_codec,
                              self._geometry, stream=stream)
            else:
                from lmtier.transfer import offload

                offload(kv_caches, layout, ids, [buf.tensor for _, buf in todo], stream=stream)
            if kv_caches[0].is_cuda:
                import torch

                event = torch.cuda.Event()
                event.record(stream if stream is not None else torch.cuda.current_stream(kv_caches[0].device))
        except BaseException:
            release_all([buf for _, buf in todo])
            raise
        items = [(keys[i], buf) for i, buf in todo]
        new_tokens = [spans[i][1] - spans[i][0] for i, _ in todo]
        copied: concurrent.futures.Future[None] = concurrent.futures.Future()
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._pending_lock:
            self._pending.add(done)
        done.add_done_callback(self._forget)

        def commit() -> None:
            try:
                fut = self.kvstore.commit(items, request_id=request_id)  # the store owns the chunks now
            except BaseException as exc:
                release_all([buf for _, buf in items])
                log.warning("lmtier: store of request %s failed (%s: %s)", request_id, type(exc).__name__, exc)
                done.set_result(0)
                return
            fut.add_done_callback(lambda f: self._stored(f, done, new_tokens, stop, request_id))

        if event is None:
            copied.set_result(None)
            commit()
        else:
            def after_copy() -> None:
                copied.set_result(None)
                commit()

            def failed_copy() -> None:
                release_all([buf for _, buf in items])
                copied.set_result(None)
                done.set_result(0)

            self._after(event, after_copy, on_error=failed_copy)
        return StoreHandle(request_id, stop, copied, done, copy_event=event, keys=keys)

    def _stored(self, fut: concurrent.futures.Future[int], done: concurrent.futures.Future[int],
                spans: list[int], offered: int, request_id: str | None) -> None:
        written = 0 if fut.cancelled() or fut.exception() is not None else fut.result()
        tokens = sum(spans[:written])  # the store says how many, not which: the leading ones, as a rule
        if tokens:
            self.metrics.stored_tokens.inc(tokens)
        log.info("Stored %d of %d tokens for request %s (%d already present)",
                 tokens, offered, request_id or "-", offered - sum(spans))
        done.set_result(tokens)

    def _forget(self, fut: concurrent.futures.Future[int]) -> None:
        with self._pending_lock:
            self._pending.discard(fut)

    # -- retrieve ------------------------------------------------------------------------------
    def retrieve(self, token_ids: Any, kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], *,
                 start: int = 0, end: int | None = None, request_id: str | None = None,
                 namespace: str | None = None) -> int:
        """Load tokens ``[start, end)`` into their blocks; returns the tokens loaded from ``start``."""
        return self.start_retrieve(token_ids, kv_caches, block_ids, start=start, end=end,
                                   request_id=request_id, namespace=namespace).wait()

    def start_retrieve(self, token_ids: Any, kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], *,
                       start: int = 0, end: int | None = None, request_id: str | None = None,
                       namespace: str | None = None) -> RetrieveHandle:
        """Start fetching tokens ``[start, end)``'s chunks; onload with the handle's waits.

        ``start`` and ``end`` are block-aligned (``end`` defaults to the last whole block of
        ``token_ids``); blocks before ``start`` are never written. ``block_ids`` maps the request's
        blocks from token 0.
        """
        tokens = _tokens(token_ids)
        self._check_open()
        b, c = self.block_size, self.chunk_tokens
        n = len(tokens)
        end = n // b * b if end is None else end
        if start % b or end % b or not 0 <= start <= end <= n:
            raise InvalidArgumentError(
                f"start={start} and end={end} must be multiples of the block size {b} with "
                f"0 <= start <= end <= {n}")
        layout = self._layout_of(kv_caches)
        blocks = _block_list(block_ids)
        if len(blocks) < end // b:
            raise InvalidArgumentError(f"{end} tokens need {end // b} block ids, got {len(blocks)}")
        chunks: list[_Chunk] = []
        ns = self._namespace(namespace)
        if end > start:
            full = chunk_keys(tokens[: min(n, math.ceil(end / c) * c)], ns, c)
            for ci in range(start // c, math.ceil(end / c)):
                cs, ce = ci * c, min((ci + 1) * c, end)
                first = (max(start, cs) - cs) // b
                ids = blocks[cs // b + first: ce // b]
                tail_key = None
                if ce - cs < c:
                    tail_key = chunk_keys(tokens[:ce], ns, c, include_partial=True)[-1]
                if ci < len(full):
                    chunks.append(_Chunk(full[ci], (cs, cs + c), self.pages_per_chunk, first, ids, tail_key))
                else:
                    assert tail_key is not None
                    chunks.append(_Chunk(tail_key, (cs, ce), (ce - cs) // b, first, ids))
        if chunks:
            sizes = [self._value_nbytes(len(kv_caches), ch.stored_pages, layout) for ch in chunks]
            fetch = self.kvstore.fetch([ch.key for ch in chunks], sizes, timeout_s=self.load_timeout_s)
        else:
            fetch = _finished([])
        return RetrieveHandle(self, kv_caches, layout, chunks, fetch, start, end, request_id)

    def _fetched(self, fut: concurrent.futures.Future[list[HostChunk | None]], n: int) -> list[HostChunk | None]:
        """The fetch's chunks, or all misses when it failed or outlived its budget."""
        try:
            return fut.result(self.load_timeout_s + _FETCH_GRACE_S)
        except Exception as exc:
            self._drop_fetch(fut)
            log.warning("lmtier: fetch of %d chunk(s) failed (%s: %s); treated as a miss", n, type(exc).__name__, exc)
            return [None] * n

    def _drop_fetch(self, fut: concurrent.futures.Future[list[HostChunk | None]]) -> None:
        """Cancel a fetch nobody will read; chunks it delivers anyway go back at once."""
        if fut.cancel():
            return

        def release(f: concurrent.futures.Future[list[HostChunk | None]]) -> None:
            if not f.cancelled() and f.exception() is None:
                release_all(f.result())

        fut.add_done_callback(release)

    def _count_loaded(self, tokens: int) -> None:
        if tokens:
            self.metrics.loaded_tokens.inc(tokens)

    # -- lifecycle -----------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Wait for every store in flight and the tiers' background writes."""
        if self._closed:
            return
        with self._pending_lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending, timeout)
        self.kvstore.flush(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush, stop the engine's threads, close the store if the engine opened it; within
        ``timeout`` (``None``: no bound) for the flush and a local store's close together
        (:meth:`LocalStore.close <lmtier.store.LocalStore.close>`: what the budget cuts short is
        dropped or abandoned, logged and counted). Idempotent."""
        if self._closed:
            return
        end = None if timeout is None else time.monotonic() + timeout
        try:
            self.flush(timeout)
        except Exception as exc:  # closing must go on: the tiers hold files and connections
            log.warning("lmtier: flush at close failed (%s: %s)", type(exc).__name__, exc)
        self._closed = True
        # lookups not started are dropped; those running end by their own deadline, or as misses
        # when the store closes under them
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self._waiter.shutdown(wait=True)  # deferred returns of host chunks run first
        if self._owns_store:
            if isinstance(self.kvstore, LocalStore):
                self.kvstore.close(None if end is None else max(0.0, end - time.monotonic()))
            else:
                self.kvstore.close()
        self._lookups.shutdown(wait=True)

    def __enter__(self) -> KVCacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"KVCacheEngine(namespace={self.namespace}, chunk_tokens={self.chunk_tokens}, "
                f"block_size={self.block_size}, store={self.kvstore!r})")

    # -- namespaces ----------------------------------------------------------------------------
    def derive_namespace(self, *extra: tuple[str, str]) -> str:
        """The namespace of this engine's KV with ``extra`` identity fields added (name, value pairs).

        For KV whose bytes depend on more than the engine's :class:`KVNamespace` — a LoRA adapter
        — or that must stay apart — a tenant's cache salt: pass the result as ``namespace=`` to
        :meth:`lookup`, :meth:`store` and :meth:`start_retrieve`. No extra: the engine's namespace.
        """
        if not extra:
            return self.namespace
        derived = replace(self.kv, extra=(*self.kv.extra, *extra))
        if isinstance(self.kvstore, SupportsNamespaces):  # its codecs learn it (lossy tags are in self.kv)
            derived = self.kvstore.register_namespace(derived)
        return derived.namespace

    def _namespace(self, namespace: str | None) -> str:
        if namespace is None:
            return self.namespace
        if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
            raise InvalidArgumentError(f"namespace must be 16 lowercase hex characters (from "
                                       f"derive_namespace()), got {namespace!r}")
        return namespace

    # -- machinery -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LmtierError("this KVCacheEngine is closed")

    def load_stream(self, device: Any) -> Any:
        """The CUDA side stream onloads run on (one per device, made on first use)."""
        stream = self._streams.get(device)
        if stream is None:
            import torch

            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def _after(self, event: Any, job: Callable[[], None], *, on_error: Callable[[], object] | None = None) -> None:
        """Run ``job`` on the waiter thread once the CUDA ``event`` completed."""

        def run() -> None:
            try:
                event.synchronize()
            except Exception as exc:  # a failed copy: nothing it wrote may be stored or trusted
                log.error("lmtier: a CUDA copy failed (%s: %s)", type(exc).__name__, exc)
                if on_error is not None:
                    on_error()
                return
            job()

        try:
            self._waiter.submit(run)
        except RuntimeError:  # shut down (closing): wait here instead
            run()

    def _value_nbytes(self, layers: int, pages: int, layout: PageLayout) -> int:
        """Bytes of the stored value of a chunk of ``pages`` pages: raw, or its encoding."""
        raw = layers * pages * layout.page_bytes
        return raw if self.device_codec is None else int(self.device_codec.encoded_nbytes(raw, self._geometry))

    def _layout_of(self, kv_caches: Sequence[torch.Tensor]) -> PageLayout:
        """The layers' PageLayout, checked against the namespace (cached per cache geometry)."""
        import torch

        if not kv_caches or not all(isinstance(t, torch.Tensor) for t in kv_caches):
            raise InvalidArgumentError("kv_caches must be a non-empty sequence of tensors, one per layer")
        t = kv_caches[0]
        sig = (len(kv_caches), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        layout = self._layouts.get(sig)
        if layout is None:
            from lmtier.transfer import describe_layout

            layout = describe_layout(t, self.kv.kv_layout)
            if len(kv_caches) != self.kv.num_layers or layout.page_bytes != self.kv.page_bytes:
                raise InvalidArgumentError(
                    f"the KV caches ({len(kv_caches)} layers, {layout.page_bytes}-byte pages) do not match "
                    f"the namespace ({self.kv.num_layers} layers, {self.kv.page_bytes}-byte pages)")
            self._layouts[sig] = layout
        return layout


def _runs(where: list[tuple[str, int]], limit: int) -> tuple[tuple[str, int], ...]:
    """Consecutive parts in one tier merged, cut at ``limit`` tokens."""
    runs: list[tuple[str, int]] = []
    left = limit
    for tier, n in where:
        n = min(n, left)
        if n <= 0:
            break
        left -= n
        if runs and runs[-1][0] == tier:
            runs[-1] = (tier, runs[-1][1] + n)
        else:
            runs.append((tier, n))
    return tuple(runs)


def _tail_answers(ends: Sequence[int], tails: Sequence[ChunkKey], tiers: Sequence[str | None]
                  ) -> list[tuple[int, ChunkKey, str | None]]:
    """Each probed tail's end, key and tier; none when the store did not answer for the tails."""
    return list(zip(ends, tails, tiers, strict=True)) if len(tiers) == len(tails) else []


def _lookup_budget(cfg: LmtierConfig | None) -> float | None:
    """The deadline of a whole engine lookup: one tier's lookup deadline (the longest), or the
    server's; None when the engine was given a store without a config."""
    if cfg is None:
        return None
    if cfg.server is not None:
        return float(cfg.server_timeout_s.lookup)
    return max((float(t.timeout_s.lookup) for t in cfg.tiers), default=None)


def _device_codec(given: str | Mapping[str, Any] | None, cfg: LmtierConfig | None, kv: KVNamespace,
                  registry: BackendRegistry | None) -> Any:
    """The engine's device codec (the argument, else the config's), built and checked; None for none."""
    from lmtier.codecs.base import KVGeometry
    from lmtier.config import CodecConfig, TierConfig
    from lmtier.registry import BackendRegistry

    if given is not None:
        spec = CodecConfig.model_validate(TierConfig._codec_by_name(given))
    elif cfg is not None:
        spec = cfg.device_codec
    else:
        return None
    if not spec.enabled:
        return None
    codec = (registry or BackendRegistry.discover()).create_codec(spec.name, spec.options, path="device_codec")
    if not codec.lossy or not hasattr(codec, "encode_tensor"):
        raise ConfigError(f"device_codec: {spec.name} does not run on the KV cache's device; use a quantizing codec "
                          "(fp8, int8), or put a lossless codec on a tier (tiers[i].codec)")
    reason = codec.check_kv(KVGeometry.of(kv))
    if reason is not None:
        raise ConfigError(f"device_codec: {reason}")
    return codec


def _one_quantizer(device_codec: Any, kv: KVNamespace) -> None:
    """ConfigError when the store's tiers quantize too (the registered namespace declares lossy
    tier codecs): the KV would be quantized twice."""
    from lmtier.codecs.base import LOSSY_FIELD

    tiers = [v for k, v in kv.extra if k == LOSSY_FIELD]
    if device_codec is not None and tiers:
        raise ConfigError(f"device_codec {device_codec.tag()} and the store's lossy tier codecs ({tiers[-1]}) would "
                          "quantize the KV twice; keep one of them (docs/codecs.md)")


def _server_store(cfg: LmtierConfig, kv: KVNamespace, metrics_registry: CollectorRegistry | None,
                  name: str) -> KVStore:
    """The client of the ``lmtier serve`` that ``cfg`` names (``server:`` / ``LMTIER_SERVER``)."""
    from lmtier.metrics import Metrics, default_metrics
    from lmtier.server.client import ServerStore

    metrics = Metrics(metrics_registry) if metrics_registry is not None else default_metrics()
    return ServerStore.from_config(cfg, metrics=metrics, namespace=kv.namespace, name=name)


def _tokens(token_ids: Any) -> np.ndarray[Any, Any]:
    import numpy as np

    if hasattr(token_ids, "detach") and hasattr(token_ids, "cpu"):
        token_ids = token_ids.detach().cpu().numpy()
    try:
        arr = np.asarray(token_ids, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"token ids must be a 1-D sequence of ints: {exc}") from None
    if arr.ndim != 1:
        raise InvalidArgumentError(f"token ids must be 1-D, got shape {arr.shape}")
    return arr


def _block_list(block_ids: Sequence[int]) -> list[int]:
    if hasattr(block_ids, "tolist"):
        return [int(x) for x in block_ids.tolist()]  # type: ignore[attr-defined]
    return [int(x) for x in block_ids]
