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

**Threads.** The engine owns the :class:`~lmtier.manager.StorageManager` and runs its asyncio loop
on a background thread; the synchronous methods exchange futures with it. ``store`` copies the
pages out of the cache before it returns (CPU caches) or enqueues the copy on the current CUDA
stream (so later kernels that reuse the blocks are ordered after it); writing the tiers happens
on the loop, off the caller's critical path. :meth:`start_retrieve` starts the fetch and returns a
:class:`RetrieveHandle` whose :meth:`~RetrieveHandle.wait_layer` onloads one layer at a time, so
an engine can overlap loading layer ``l+1`` with computing layer ``l``.

**Faults are misses.** A tier fault, a chunk that is missing when fetched, or a value of the wrong
size ends the loaded prefix there; the caller recomputes the rest. Only bad arguments raise
(:class:`~lmtier.errors.InvalidArgumentError`). Every host buffer borrowed along the way (tier
leases, staging buffers) is returned on every path, errors and cancellation included.

Log lines (logger ``lmtier.engine``): ``Stored N of M tokens for request R (K already present)``
after a store reaches the tiers, ``Request R: total N tokens, hit M`` per recorded lookup.
Metrics (the manager's registry): ``lmtier_requested_tokens``, ``lmtier_hit_tokens``,
``lmtier_hit_ratio``, ``lmtier_loaded_tokens``, ``lmtier_stored_tokens``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import re
import threading
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from lmtier.buffers import as_bytes_view
from lmtier.config import LmtierConfig, load_config
from lmtier.errors import ConfigError, InvalidArgumentError, LmtierError
from lmtier.keys import ChunkKey, KVNamespace, chunk_keys
from lmtier.memory import HostBuffer, HostMemoryPool, host_tensor_of
from lmtier.protocol import SupportsAllocate

if TYPE_CHECKING:
    import os

    import numpy as np
    import torch
    from prometheus_client import CollectorRegistry

    from lmtier.manager import StorageManager
    from lmtier.metrics import Metrics
    from lmtier.registry import BackendRegistry
    from lmtier.transfer import PageLayout

__all__ = ["KVCacheEngine", "RetrieveHandle", "StoreHandle"]

log = logging.getLogger("lmtier.engine")
_NAMESPACE_RE = re.compile(r"^[0-9a-f]{16}$")
T = TypeVar("T")


class _LoopThread:
    """An asyncio loop running forever on a daemon thread; coroutines are submitted to it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@dataclass
class _Chunk:
    """One chunk of a transfer: its key, the pages of it in play, and the blocks they map to."""

    key: ChunkKey
    tokens: tuple[int, int]  # [start, end) of the chunk's stored extent
    stored_pages: int  # pages the stored value holds
    first_page: int  # first page of the value to move
    block_ids: list[int]  # destination/source blocks of pages [first_page, first_page + len)
    alt_key: ChunkKey | None = None  # a tail key to try when the full key misses


class StoreHandle:
    """A store in flight: ``copied`` once the pages are out of the cache, ``done`` once in the tiers."""

    def __init__(self, request_id: str | None, offered: int, copied: concurrent.futures.Future[None],
                 done: concurrent.futures.Future[int]) -> None:
        self.request_id = request_id
        self.offered_tokens = offered
        self.copied = copied
        self.done = done

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
    """

    def __init__(self, engine: KVCacheEngine, kv_caches: Sequence[torch.Tensor], layout: PageLayout,
                 chunks: list[_Chunk], fetch: concurrent.futures.Future[list[Any]], start: int,
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
        self._held: list[Any] = []  # leases and staging buffers, released by _release()
        self._done_layers: set[int] = set()
        self._closed = False
        self.loaded_tokens = 0
        self.failed = False

    def _resolve(self) -> None:
        if self._hosts is not None:
            return
        self._hosts = []
        try:
            values = self._fetch.result(self._engine.load_timeout_s)
        except Exception as exc:  # a fault (or timeout) of the fetch is a miss of everything
            self._fetch.cancel()
            log.warning("lmtier: fetch of %d chunk(s) failed (%s: %s); treated as a miss",
                        len(self._chunks), type(exc).__name__, exc)
            values = [None] * len(self._chunks)
        loaded_end = self.start
        try:
            for chunk, value in zip(self._chunks, values, strict=True):
                host = self._engine._host_pages(chunk, value, self._layout, len(self._kv), self._held)
                if host is None:
                    break
                self._hosts.append(host)
                self._ids.append(chunk.block_ids)
                loaded_end = chunk.tokens[0] + (chunk.first_page + len(chunk.block_ids)) * self._engine.block_size
        finally:
            del values  # references to leases not kept in _held die here
        self.loaded_tokens = max(0, loaded_end - self.start)

    def wait_layer(self, layer: int) -> int:
        """Onload ``layer`` (and any lower layer not yet loaded); returns :attr:`loaded_tokens`."""
        if self._closed:
            return self.loaded_tokens
        self._resolve()
        todo = [i for i in range(layer + 1) if i not in self._done_layers]
        self._onload(todo)
        return self.loaded_tokens

    def wait(self) -> int:
        """Onload every remaining layer, return the borrowed buffers; returns :attr:`loaded_tokens`."""
        if self._closed:
            return self.loaded_tokens
        try:
            self._resolve()
            self._onload([i for i in range(len(self._kv)) if i not in self._done_layers])
        finally:
            self.close()
        return self.loaded_tokens

    def close(self) -> None:
        """Release everything without loading more (idempotent). Cancels a fetch still running."""
        if self._closed:
            return
        self._closed = True
        self._fetch.cancel()
        if self._hosts and self._kv and self._kv[0].is_cuda:
            import torch

            torch.cuda.current_stream(self._kv[0].device).synchronize()  # copies read the host chunks
        self._hosts = []
        held, self._held = self._held, []
        for item in held:
            if isinstance(item, HostBuffer):
                item.release()
        del held
        if not self.failed:
            self._engine._count_loaded(self.loaded_tokens)

    def _onload(self, layers: list[int]) -> None:
        if not layers or self.failed:
            return
        if self._hosts:
            from lmtier.transfer import onload

            try:
                onload(self._kv, self._layout, self._ids, self._hosts, layers=layers)
            except LmtierError as exc:
                self.failed = True
                self.loaded_tokens = 0
                log.error("lmtier: onload failed (%s); the %d-token range is reported unloaded",
                          exc, self.end - self.start)
                return
        self._done_layers.update(layers)

    def __enter__(self) -> RetrieveHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KVCacheEngine:
    """Token-level lookup/store/retrieve of paged KV over lmtier's tiers (see the module doc).

    Args:
        config: tier configuration (YAML path, mapping, :class:`LmtierConfig`, or ``None`` for
            ``LMTIER_CONFIG`` / the embedded default). Its ``chunk_tokens`` must equal the
            namespace's.
        kv: what makes the stored bytes interpretable; ``kv.namespace`` prefixes every key.
            ``kv.kv_layout`` is a :data:`lmtier.transfer.LAYOUT_KINDS` kind, ``kv.page_bytes`` one
            layer's block in bytes.
        save_tail: also store (and look up) the block-aligned tail after the last whole chunk.
        load_timeout_s: longest wait for a fetch; past it the load is a miss.
        registry, metrics_registry: passed to :meth:`StorageManager.from_config`.
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | Mapping[str, Any] | LmtierConfig | None,
        kv: KVNamespace,
        *,
        save_tail: bool = True,
        load_timeout_s: float = 60.0,
        registry: BackendRegistry | None = None,
        metrics_registry: CollectorRegistry | None = None,
        name: str = "lmtier-engine",
    ) -> None:
        cfg = load_config(config)
        if kv.block_size <= 0 or kv.chunk_tokens <= 0 or kv.chunk_tokens % kv.block_size:
            raise ConfigError(
                f"chunk_tokens ({kv.chunk_tokens}) must be a positive multiple of the engine's block "
                f"size ({kv.block_size}); set chunk_tokens in the lmtier config accordingly"
            )
        if cfg.chunk_tokens != kv.chunk_tokens:
            raise ConfigError(f"the config's chunk_tokens ({cfg.chunk_tokens}) differs from the KV "
                              f"namespace's ({kv.chunk_tokens}); build the namespace from the config")
        self.kv = kv
        self.config = cfg
        self.namespace = kv.namespace
        self.block_size = kv.block_size
        self.chunk_tokens = kv.chunk_tokens
        self.pages_per_chunk = kv.chunk_tokens // kv.block_size
        self.save_tail = save_tail
        self.load_timeout_s = load_timeout_s
        self._pool: HostMemoryPool | None = None
        self._pool_lock = threading.Lock()
        self._layouts: dict[tuple[Any, ...], PageLayout] = {}
        self._pending: set[concurrent.futures.Future[int]] = set()
        self._pending_lock = threading.Lock()
        self._closed = False
        from lmtier.manager import StorageManager

        self._loop = _LoopThread(name)
        try:
            self.manager: StorageManager = self._loop.call(StorageManager.from_config(
                cfg, registry=registry, metrics_registry=metrics_registry))
        except BaseException:
            self._loop.stop()
            raise

    # -- properties ----------------------------------------------------------------------------
    @property
    def metrics(self) -> Metrics:
        return self.manager.metrics

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lookup --------------------------------------------------------------------------------
    def lookup(self, token_ids: Any, *, request_id: str | None = None, record: bool = True,
               limit: int | None = None, namespace: str | None = None) -> int:
        """Tokens of ``token_ids``'s prefix whose KV is available now (a multiple of the block size).

        ``limit`` caps the answer (rounded down to a block), for a caller that computes the last
        tokens itself: pass the whole prompt and the cap rather than a shortened prompt, so that
        a chunk stored whole can serve its leading blocks (a shortened prompt names only the
        chunk's tail key). ``record`` counts the lookup in the hit metrics and logs it (once per
        request, please). A fault is a miss (0). ``namespace`` (default: the engine's) keys the
        lookup under another namespace, e.g. one that adds a tenant's salt or a LoRA adapter to the
        engine's (:meth:`derive_namespace`); store and retrieve take the same argument.
        """
        return self.lookup_async(token_ids, request_id=request_id, record=record, limit=limit,
                                 namespace=namespace).result()

    def lookup_async(self, token_ids: Any, *, request_id: str | None = None, record: bool = True,
                     limit: int | None = None, namespace: str | None = None) -> concurrent.futures.Future[int]:
        """:meth:`lookup` without blocking: a future of the hit tokens (never an exception)."""
        tokens = _tokens(token_ids)
        self._check_open()
        if limit is not None and limit < 0:
            raise InvalidArgumentError(f"limit={limit} must be >= 0")
        ns = self._namespace(namespace)
        return self._loop.submit(self._lookup(tokens, request_id, record, limit, ns))

    async def _lookup(self, tokens: np.ndarray[Any, Any], request_id: str | None, record: bool,
                      limit: int | None, ns: str) -> int:
        total, c, b = len(tokens), self.chunk_tokens, self.block_size
        cap = total if limit is None else min(total, limit // b * b)
        # only the chunks reaching into [0, cap) are asked for, each under its whole-chunk key when
        # the tokens complete it: a chunk stored whole serves its leading blocks too
        tokens = tokens[: min(total, -(-cap // c) * c)]
        try:
            full = chunk_keys(tokens, ns, c)
            hits = await self.manager.lookup(full) if full else 0
            hit = hits * c
            if self.save_tail:
                base = hits * c
                longest = min(self.pages_per_chunk - 1, (cap - base) // b)
                if longest > 0:
                    cands = [chunk_keys(tokens[: base + k * b], ns, c, include_partial=True)[-1]
                             for k in range(longest, 0, -1)]
                    present = await self.manager.contains(cands)
                    for k, p in zip(range(longest, 0, -1), present, strict=True):
                        if p:
                            hit = base + k * b
                            break
        except InvalidArgumentError:
            raise
        except Exception as exc:  # the manager degrades tier faults; anything else is still a miss
            log.warning("lmtier: lookup failed (%s: %s); treated as a miss", type(exc).__name__, exc)
            hit = 0
        hit = min(hit, cap)
        if record:
            m = self.metrics
            m.requested_tokens.inc(total)
            m.hit_tokens.inc(hit)
            m.observe_hit_ratio()
            log.info("Request %s: total %d tokens, hit %d", request_id or "-", total, hit)
        return hit

    # -- store ---------------------------------------------------------------------------------
    def store(self, token_ids: Any, kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], *,
              end: int | None = None, request_id: str | None = None, namespace: str | None = None) -> StoreHandle:
        """Store the chunks of ``token_ids[:end]`` not yet present; returns once the pages are copied.

        ``end`` (default: all tokens) must have its pages in ``block_ids``. Whole chunks are stored,
        plus the block-aligned tail with ``save_tail``. The tier writes continue in the background
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
        sizes = [len(kv_caches) * ((e - s) // b) * layout.page_bytes for s, e in spans]
        try:
            todo = self._loop.call(self._prepare_store(keys, sizes))
        except Exception as exc:
            log.warning("lmtier: store of request %s skipped (%s: %s)", request_id, type(exc).__name__, exc)
            return StoreHandle(request_id, stop, _finished(None), _finished(0))
        if not todo:
            log.info("Stored 0 of %d tokens for request %s (%d already present)", stop, request_id or "-", stop)
            return StoreHandle(request_id, stop, _finished(None), _finished(0))
        bufs = [buf for _, buf in todo]
        try:
            from lmtier.transfer import offload

            ids = [blocks[spans[i][0] // b: spans[i][1] // b] for i, _ in todo]
            offload(kv_caches, layout, ids, [buf.tensor for buf in bufs])
            event = None
            if kv_caches[0].is_cuda:
                import torch

                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(kv_caches[0].device))
        except BaseException:
            for buf in bufs:
                buf.release()
            raise
        items = [(keys[i], buf) for i, buf in todo]
        new_tokens = sum(spans[i][1] - spans[i][0] for i, _ in todo)
        copied: concurrent.futures.Future[None] = concurrent.futures.Future()
        if event is None:
            copied.set_result(None)
        done = self._loop.submit(self._put(items, event, copied, request_id, new_tokens, stop))
        with self._pending_lock:
            self._pending.add(done)
        done.add_done_callback(self._forget)
        return StoreHandle(request_id, stop, copied, done)

    async def _prepare_store(self, keys: list[ChunkKey], sizes: list[int]) -> list[tuple[int, HostBuffer]]:
        """Which chunks are missing, each with a host buffer to copy it into (on the loop thread)."""
        present = await self.manager.contains(keys)
        hottest = self.manager.tiers[0].backend
        allocate = hottest.allocate if isinstance(hottest, SupportsAllocate) else None
        out: list[tuple[int, HostBuffer]] = []
        try:
            for i, (p, size) in enumerate(zip(present, sizes, strict=True)):
                if p:
                    continue
                buf = None
                if allocate is not None:  # a buffer inside the hot tier's slab: its put adopts it
                    try:
                        buf = allocate(size)
                    except LmtierError:
                        buf = None
                if buf is None:
                    buf = self._staging(size)
                if buf is None:
                    log.warning("lmtier: no host memory for a %d-byte chunk; storing %d of %d chunks",
                                size, len(out), len(keys))
                    break
                out.append((i, buf))
        except BaseException:
            for _, buf in out:
                buf.release()
            raise
        return out

    async def _put(self, items: list[tuple[ChunkKey, HostBuffer]], event: Any,
                   copied: concurrent.futures.Future[None], request_id: str | None,
                   new_tokens: int, offered: int) -> int:
        try:
            if event is not None:
                await asyncio.get_running_loop().run_in_executor(None, event.synchronize)
                copied.set_result(None)
            # HostBuffers expose their bytes through as_bytes_view (the cpu tier adopts them), not
            # through a static __buffer__, so they are not a typing Buffer
            await self.manager.put(items)  # type: ignore[arg-type]
        except Exception as exc:
            log.warning("lmtier: store of request %s failed (%s: %s)", request_id, type(exc).__name__, exc)
            return 0
        finally:
            if not copied.done():
                copied.set_result(None)
            for _, buf in items:
                buf.release()
        self.metrics.stored_tokens.inc(new_tokens)
        log.info("Stored %d of %d tokens for request %s (%d already present)",
                 new_tokens, offered, request_id or "-", offered - new_tokens)
        return new_tokens

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
        fetch = self._loop.submit(self._fetch(chunks)) if chunks else _finished([])
        return RetrieveHandle(self, kv_caches, layout, chunks, fetch, start, end, request_id)

    async def _fetch(self, chunks: list[_Chunk]) -> list[Any]:
        values = await self.manager.get([ch.key for ch in chunks])
        last = chunks[-1]
        if values[-1] is None and last.alt_key is not None:  # the full chunk is absent: its tail?
            (alt,) = await self.manager.get([last.alt_key])
            if alt is not None:
                last.key, last.alt_key = last.alt_key, None
                pages = last.first_page + len(last.block_ids)  # the tail key covers exactly these
                last.stored_pages = pages
                last.tokens = (last.tokens[0], last.tokens[0] + pages * self.block_size)
                values[-1] = alt
        return values

    def _host_pages(self, chunk: _Chunk, value: Any, layout: PageLayout, num_layers: int,
                    held: list[Any]) -> torch.Tensor | None:
        """A contiguous ``[layers x pages x page_bytes]`` tensor of the chunk's pages in play, or None."""
        if value is None:
            return None
        expected = num_layers * chunk.stored_pages * layout.page_bytes
        view = as_bytes_view(value)
        if view.nbytes != expected:
            log.warning("lmtier: %s holds %d bytes, expected %d; treated as a miss (and deleted)",
                        chunk.key, view.nbytes, expected)
            self._loop.submit(self.manager.delete([chunk.key]))
            return None
        src = host_tensor_of(value)
        pinned_ok = src is not None and (src.is_pinned() or not self._cuda_pool())
        pages = len(chunk.block_ids)
        whole = chunk.first_page == 0 and pages == chunk.stored_pages
        if src is not None and pinned_ok and whole:
            held.append(value)  # keep the lease alive until the onload completed
            return src
        buf = self._staging(num_layers * pages * layout.page_bytes)
        if buf is None:
            log.warning("lmtier: no staging memory for %s; the load stops there", chunk.key)
            return None
        held.append(buf)
        import numpy as np

        if src is None:  # a foreign read-only buffer: copy the pages in play through numpy
            arr = np.frombuffer(view, dtype=np.uint8).reshape(num_layers, chunk.stored_pages, layout.page_bytes)
            dst = buf.tensor.numpy().reshape(num_layers, pages, layout.page_bytes)
            np.copyto(dst, arr[:, chunk.first_page: chunk.first_page + pages])
        else:
            part = src.view(num_layers, chunk.stored_pages, layout.page_bytes)
            buf.tensor.view(num_layers, pages, layout.page_bytes).copy_(
                part[:, chunk.first_page: chunk.first_page + pages])
        return buf.tensor

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
        self._loop.call(self.manager.flush(), timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush, close the tiers, stop the loop thread. Idempotent."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        except Exception as exc:  # closing must go on: the tiers hold files and connections
            log.warning("lmtier: flush at close failed (%s: %s)", type(exc).__name__, exc)
        self._closed = True
        try:
            self._loop.call(self.manager.aclose(), timeout)
        finally:
            self._loop.stop()
            if self._pool is not None:
                self._pool.close()

    def __enter__(self) -> KVCacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"KVCacheEngine(namespace={self.namespace}, chunk_tokens={self.chunk_tokens}, "
                f"block_size={self.block_size}, tiers={[t.name for t in self.manager.tiers]})")

    # -- namespaces ----------------------------------------------------------------------------
    def derive_namespace(self, *extra: tuple[str, str]) -> str:
        """The namespace of this engine's KV with ``extra`` identity fields added (name, value pairs).

        For KV whose bytes depend on more than the engine's :class:`KVNamespace` — a LoRA adapter
        — or that must stay apart — a tenant's cache salt: pass the result as ``namespace=`` to
        :meth:`lookup`, :meth:`store` and :meth:`start_retrieve`. No extra: the engine's namespace.
        """
        if not extra:
            return self.namespace
        return replace(self.kv, extra=(*self.kv.extra, *extra)).namespace

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

    def _cuda_pool(self) -> bool:
        import torch

        return bool(torch.cuda.is_available())

    def _staging(self, nbytes: int) -> HostBuffer | None:
        """A buffer from the engine's own host pool (pinned where CUDA exists), or None when full."""
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = HostMemoryPool(int(self.config.host_pool_bytes), name="engine-staging")
        return self._pool.try_allocate(nbytes)

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

