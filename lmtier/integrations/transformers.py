"""Prefix KV reuse for Hugging Face ``transformers`` decoder models, through lmtier's tiers.

::

    kv = KVPrefixCache(model, "lmtier.yaml", model_id="Qwen/Qwen3-8B")
    out = kv.generate(input_ids, max_new_tokens=64)          # model.generate, prefix reused
    logits, cache, hit_tokens = kv.prefill(input_ids)        # one forward, last-position logits
    kv.flush(); kv.close()

Before the forward, the prompt's full chunks (``chunk_tokens`` each) are hashed into chunk keys
(:mod:`lmtier.keys`) and looked up; the hit prefix's KV is fetched from the tiers and copied into
the model's cache on the GPU by :mod:`lmtier.transfer` (the native kernel when the cache is on
CUDA and the host chunks are pinned), and only the suffix is computed. The new full chunks are
copied back to host and stored by a background thread after the prompt's last layer wrote them,
off the critical path.

**The cache.** :class:`PagedKVCache` is a ``transformers`` :class:`~transformers.Cache` for one
sequence whose storage per layer is ``(2, num_blocks, block_size, kv_heads, head_dim)`` (layout
kind ``"vllm_kv_first"``; block ``b`` holds tokens ``[b*block_size, (b+1)*block_size)``).
Attention sees K and V as views ``[1, kv_heads, seq, head_dim]`` (the transpose of
``[seq, kv_heads, head_dim]``, last dim contiguous, which SDPA / eager attention accept). A chunk
is then exactly two contiguous byte runs per layer: the transfer kernel moves it at link speed,
where ``DynamicCache``'s ``[B, H, S, D]`` tensors would scatter it into ``2*H`` strided runs.

**Layer-wise overlap (CUDA).** The prefix is onloaded on a side stream one layer at a time, each
followed by an event; the cache's ``update`` for layer ``l`` (called inside attention, after the
Q/K/V projections) makes the compute stream wait for event ``l`` before attention reads the
prefix. Loading layer ``l+1`` thus overlaps computing layer ``l``, for any model that calls the
standard ``Cache.update`` — no model hooks needed.

**Faults are misses.** Tier faults come back from the :class:`~lmtier.manager.StorageManager` as
misses; a chunk of the wrong size is a miss; a hit that cannot be staged is truncated. The
result is always the model's own computation for whatever was not loaded.

Limits: batch size 1 (no beams); every layer must be full attention (no sliding windows,
no linear-attention layers); ``transformers >= 4.56`` (the layered ``Cache`` API).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

import numpy as np
import torch

from lmtier.buffers import as_bytes_view
from lmtier.errors import InvalidArgumentError, LmtierError, NotSupportedError
from lmtier.keys import ChunkKey, KVNamespace, chunk_keys
from lmtier.manager import StorageManager
from lmtier.memory import HostBuffer, HostMemoryPool, host_tensor_of
from lmtier.protocol import SupportsAllocate
from lmtier.transfer import PageLayout, describe_layout, offload, onload

try:
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as _exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        f"lmtier.integrations.transformers needs transformers>=4.56 ({_exc}); "
        "install it with `pip install 'transformers>=4.56'`"
    ) from _exc

if TYPE_CHECKING:
    import os

    from lmtier.config import LmtierConfig
    from lmtier.protocol import Buffer
    from lmtier.registry import BackendRegistry

__all__ = ["KVPrefixCache", "LoadInfo", "PagedKVCache", "PrefillResult"]

log = logging.getLogger("lmtier.transformers")
T = TypeVar("T")

#: Layout kind of :class:`PagedKVCache` storage (see :data:`lmtier.transfer.LAYOUT_KINDS`).
LAYOUT_KIND = "vllm_kv_first"


# -- the cache -----------------------------------------------------------------------------------
@dataclass
class _Fence:
    """A background store reading a cache: ``enqueued`` once its reads are issued (CPU: done);
    on CUDA, ``done`` is the store-stream event after them."""

    enqueued: threading.Event
    done: Any = None


class _KVStorage:
    """One sequence's KV: ``buf[layer] = (2, blocks, block_size, heads, head_dim)``. Immutable size.

    Growing makes a new object, so a background store still holding the old one reads the bytes
    it was given, never a buffer swapped under it.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.buf = torch.empty((num_layers, 2, num_blocks, block_size, heads, head_dim),
                               dtype=dtype, device=device)
        self.layers: list[torch.Tensor] = list(self.buf.unbind(0))
        # token-major views [blocks*block_size, heads, head_dim] of K and V, per layer
        self.tokens = [(t[0].view(-1, heads, head_dim), t[1].view(-1, heads, head_dim)) for t in self.layers]
        self.layout: PageLayout = describe_layout(self.layers[0], LAYOUT_KIND)

    @property
    def capacity(self) -> int:
        return self.buf.shape[2] * self.block_size

    def grown(self, tokens: int) -> _KVStorage:
        """A copy with room for at least ``tokens`` tokens (doubling, to keep growth rare)."""
        L, _, n, blk, h, d = self.buf.shape
        blocks = max(-(-tokens // blk), 2 * n)
        new = _KVStorage(L, blocks, blk, h, d, self.buf.dtype, self.buf.device)
        new.buf[:, :, :n].copy_(self.buf)
        return new


class _PagedLayer(DynamicLayer):  # type: ignore[misc]
    """One layer of a :class:`PagedKVCache`: K/V are views into the shared paged storage."""

    is_croppable = True

    def __init__(self, cache: PagedKVCache, index: int) -> None:
        super().__init__()
        self._cache = cache
        self._index = index
        self.length = 0
        self.dtype = cache._storage.buf.dtype
        self.device = cache._storage.buf.device
        self.is_initialized = True
        self._refresh()

    def _refresh(self) -> None:
        k, v = self._cache._storage.tokens[self._index]
        self.keys = k[: self.length].transpose(0, 1).unsqueeze(0)
        self.values = v[: self.length].transpose(0, 1).unsqueeze(0)

    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: the storage exists from the start."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cache._update(self._index, key_states, value_states)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self, *args: Any, **kwargs: Any) -> int:
        return -1

    def reset(self) -> None:
        self._cache._before_rewrite()
        self.length = 0
        self._refresh()

    def crop(self, tokens_to_remove: int) -> None:
        # negative: remove that many tokens; positive (legacy HF meaning): keep at most that many
        keep = self.length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, self.length)
        keep = max(keep, 0)
        if keep < self.length:
            self._cache._before_rewrite()
            self.length = keep
            self._refresh()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotSupportedError("PagedKVCache holds one sequence: beams / num_return_sequences > 1 "
                                    "are not supported; run sequences one by one")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.numel() != 1 or int(indices.reshape(-1)[0]) != 0:
            raise NotSupportedError("PagedKVCache holds one sequence (batch size 1)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def offload(self) -> None:
        raise NotSupportedError("PagedKVCache does not do HF layer offloading; lmtier stores chunks itself")

    def prefetch(self) -> None:
        raise NotSupportedError("PagedKVCache does not do HF layer offloading; lmtier stores chunks itself")


class PagedKVCache(Cache):  # type: ignore[misc]
    """A ``transformers`` cache for one sequence over page-friendly storage (see module doc).

    Use it like any HF cache (``model(..., past_key_values=cache)``, ``model.generate``); it
    grows when a forward writes past its capacity. :attr:`storage_layers` are the per-layer
    ``(2, blocks, block_size, kv_heads, head_dim)`` tensors the transfer layer copies pages of.
    """

    def __init__(self, *, num_layers: int, kv_heads: int, head_dim: int, block_size: int,
                 capacity_tokens: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if num_layers < 1 or kv_heads < 1 or head_dim < 1 or block_size < 1:
            raise InvalidArgumentError("num_layers, kv_heads, head_dim and block_size must be positive")
        blocks = max(1, -(-max(capacity_tokens, 1) // block_size))
        self._storage = _KVStorage(num_layers, blocks, block_size, kv_heads, head_dim, dtype,
                                   torch.device(device))
        self._load_events: list[Any] = [None] * num_layers
        self._prompt_len: int | None = None
        self._on_prompt: Callable[[PagedKVCache], None] | None = None
        self._fences: list[_Fence] = []
        self._fence_lock = threading.Lock()
        self._paged = [_PagedLayer(self, i) for i in range(num_layers)]
        super().__init__(layers=list(self._paged))

    # -- public ------------------------------------------------------------------------------
    @property
    def storage_layers(self) -> list[torch.Tensor]:
        """Per-layer storage tensors (views of one buffer), layout kind ``"vllm_kv_first"``."""
        return self._storage.layers

    @property
    def layout(self) -> PageLayout:
        return self._storage.layout

    @property
    def capacity(self) -> int:
        """Tokens the cache holds before it has to grow."""
        return self._storage.capacity

    # -- machinery used by KVPrefixCache -------------------------------------------------------
    def _set_prefix(self, tokens: int, events: Sequence[Any] | None) -> None:
        """Declare the first ``tokens`` tokens present (being onloaded until ``events[l]``)."""
        for i, layer in enumerate(self._paged):
            layer.length = tokens
            layer._refresh()
            self._load_events[i] = events[i] if events else None

    def _arm(self, prompt_len: int, callback: Callable[[PagedKVCache], None]) -> None:
        """Call ``callback(self)`` once the last layer holds ``prompt_len`` tokens."""
        self._prompt_len, self._on_prompt = prompt_len, callback

    def _add_fence(self, fence: _Fence) -> None:
        with self._fence_lock:
            self._fences.append(fence)

    def _before_rewrite(self) -> None:
        """Before positions are overwritten: pending loads and background stores must be done."""
        self._wait_loads()
        with self._fence_lock:
            fences, self._fences = self._fences, []
        for fence in fences:
            fence.enqueued.wait()
            if fence.done is not None:  # the offload reads on the store stream: order writes after it
                torch.cuda.current_stream(self._storage.buf.device).wait_event(fence.done)

    def _wait_loads(self) -> None:
        for i, ev in enumerate(self._load_events):
            if ev is not None:
                torch.cuda.current_stream(self._storage.buf.device).wait_event(ev)
                self._load_events[i] = None

    def _update(self, index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key.dim() != 4 or key.shape[0] != 1:
            raise NotSupportedError(f"PagedKVCache holds one sequence; got key states of shape {tuple(key.shape)}")
        layer = self._paged[index]
        ev = self._load_events[index]
        if ev is not None:  # layer-wise overlap: attention of this layer needs its onloaded prefix
            torch.cuda.current_stream(key.device).wait_event(ev)
            self._load_events[index] = None
        start = layer.length
        end = start + key.shape[-2]
        if end > self._storage.capacity:
            self._wait_loads()
            self._storage = self._storage.grown(end)
            for other in self._paged:
                other._refresh()
        st = self._storage
        if key.dtype != st.buf.dtype:
            raise InvalidArgumentError(f"key states are {key.dtype} but the cache holds {st.buf.dtype}")
        k, v = st.tokens[index]
        k[start:end].copy_(key[0].transpose(0, 1))
        v[start:end].copy_(value[0].transpose(0, 1))
        layer.length = end
        layer._refresh()
        if (self._on_prompt is not None and index == len(self._paged) - 1 and self._prompt_len is not None
                and end >= self._prompt_len):
            callback, self._on_prompt = self._on_prompt, None
            callback(self)
        return layer.keys, layer.values  # type: ignore[return-value]


# -- background machinery -----------------------------------------------------------------------
class _LoopThread:
    """An asyncio loop in a daemon thread (the manager's home); ``run`` blocks on a coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.owned = loop is None
        self.loop = loop or asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        if self.owned:
            self._thread = threading.Thread(target=self.loop.run_forever, name="lmtier-hf-loop", daemon=True)
            self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.owned and self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            self._thread = None


class _Worker:
    """One background thread running jobs in submission order; a failing job is logged only."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="lmtier-hf-store", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def join(self) -> None:
        self._queue.join()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _main(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                job()
            except Exception:  # a failed store is a skipped write, never the caller's problem
                log.exception("lmtier transformers: background job failed")
            finally:
                job = None
                self._queue.task_done()


# -- the façade ----------------------------------------------------------------------------------
class PrefillResult(NamedTuple):
    """What :meth:`KVPrefixCache.prefill` returns (unpacks as ``logits, cache, hit_tokens``)."""

    logits: torch.Tensor
    cache: PagedKVCache
    hit_tokens: int


@dataclass
class LoadInfo:
    """How the last :meth:`KVPrefixCache.load` went (also :attr:`KVPrefixCache.last`)."""

    prompt_tokens: int
    hit_tokens: int
    hit_chunks: int
    bytes_loaded: int
    staged_chunks: int  # chunks copied into pinned staging first (not zero-copy from the tier)
    fetch_ms: float = 0.0  # wall time of lookup + get (+ staging copies), before the onload
    load_start: Any = None  # CUDA timing events on the load stream (with timing=True)
    load_end: Any = None

    def load_ms(self) -> float | None:
        """GPU time of the onload (waits for it); None without CUDA timing events."""
        if self.load_start is None or self.load_end is None:
            return None
        self.load_end.synchronize()
        return float(self.load_start.elapsed_time(self.load_end))


@dataclass
class _Fetched:
    chunks: int
    host: list[torch.Tensor]
    holds: list[Any]  # lease views / staging HostBuffers that keep ``host`` alive
    staged: int


class KVPrefixCache:
    """Reuse cached prompt prefixes of a HF decoder model from lmtier's tiers.

    Args:
        model: a ``transformers`` causal LM (batch size 1, all layers full attention).
        storage: a config for a new :class:`~lmtier.manager.StorageManager` (YAML path, mapping,
            :class:`~lmtier.config.LmtierConfig`) that this object opens and closes, or an open
            manager together with ``loop``, the running event loop it lives on.
        model_id: names the weights in the key namespace (default: ``config._name_or_path``;
            required when that is empty, e.g. a randomly initialised model). Two models must
            never share a ``model_id``: that is what keeps their KV apart.
        chunk_tokens: tokens per stored chunk (default: the config's ``chunk_tokens``).
        block_size: tokens per page of :class:`PagedKVCache` (default ``chunk_tokens``; must
            divide it). Part of the namespace.
        registry: backend registry for opening ``storage`` (default: entry points).
        host_pool_bytes: pinned staging for chunks a tier hands out unpinned (disk, redis) and for
            stores when the hottest tier cannot allocate them itself (default: the config's).
        layerwise: on CUDA, overlap loading layer ``l+1`` with computing layer ``l``.
        timing: record CUDA timing events around each onload (:attr:`last`).
    """

    def __init__(
        self,
        model: Any,
        storage: str | os.PathLike[str] | Mapping[str, Any] | LmtierConfig | StorageManager,
        *,
        model_id: str | None = None,
        chunk_tokens: int | None = None,
        block_size: int | None = None,
        registry: BackendRegistry | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        host_pool_bytes: int | None = None,
        layerwise: bool = True,
        timing: bool = False,
    ) -> None:
        self.model = model
        self.layerwise = layerwise
        self.timing = timing
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers, self.kv_heads, self.head_dim = _model_shape(cfg)
        self.dtype: torch.dtype = model.dtype
        self.device: torch.device = model.device
        ident = model_id or getattr(cfg, "_name_or_path", "") or ""
        if not ident:
            raise InvalidArgumentError(
                "the model has no name_or_path; pass model_id= naming its weights (KV of different "
                "weights must never share a namespace)")
        self._closed = True  # until everything below is open
        if isinstance(storage, StorageManager):
            if loop is None:
                raise InvalidArgumentError("pass loop= (the running event loop the StorageManager lives on)")
            self._loop = _LoopThread(loop)
            self._manager, self._owns_manager = storage, False
        else:
            if loop is not None:
                raise InvalidArgumentError("loop= goes with an open StorageManager, not with a config")
            self._loop = _LoopThread()
            try:
                self._manager = self._loop.run(StorageManager.from_config(storage, registry=registry))
            except BaseException:
                self._loop.stop()
                raise
            self._owns_manager = True
        try:
            self._setup(cfg, ident, chunk_tokens, block_size, host_pool_bytes)
        except BaseException:
            if self._owns_manager:
                self._loop.run(self._manager.aclose())
            self._loop.stop()
            raise
        self._worker = _Worker()
        self._copiers = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="lmtier-hf-copy")
        self._load_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._store_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._closed = False
        self.last: LoadInfo | None = None

    def _setup(self, cfg: Any, ident: str, chunk_tokens: int | None, block_size: int | None,
               host_pool_bytes: int | None) -> None:
        mcfg = self._manager.config
        self.chunk_tokens = int(chunk_tokens or (mcfg.chunk_tokens if mcfg is not None else 256))
        self.block_size = int(block_size or self.chunk_tokens)
        if self.block_size < 1 or self.chunk_tokens % self.block_size:
            raise InvalidArgumentError(f"block_size {self.block_size} must divide chunk_tokens {self.chunk_tokens}")
        self.pages_per_chunk = self.chunk_tokens // self.block_size
        esize = torch.empty((), dtype=self.dtype).element_size()
        page_bytes = 2 * self.block_size * self.kv_heads * self.head_dim * esize
        self.chunk_bytes = self.num_layers * self.pages_per_chunk * page_bytes
        cfg_digest = hashlib.sha256(cfg.to_json_string(use_diff=False).encode()).hexdigest()[:16]
        self.namespace = KVNamespace(
            model=ident, kv_layout=f"hf_{LAYOUT_KIND}", dtype=str(self.dtype).removeprefix("torch."),
            num_layers=self.num_layers, block_size=self.block_size, num_kv_heads=self.kv_heads,
            head_size=self.head_dim, page_bytes=page_bytes, chunk_tokens=self.chunk_tokens,
            engine="transformers", extra=(("config", cfg_digest),),
        ).namespace
        pool_bytes = host_pool_bytes or (int(mcfg.host_pool_bytes) if mcfg is not None else 256 << 20)
        self._cuda = self.device.type == "cuda"
        self._pool = HostMemoryPool(pool_bytes, pin=self._cuda, name="hf-staging")

    # -- public API ----------------------------------------------------------------------------
    @property
    def manager(self) -> StorageManager:
        """The storage manager (call its coroutines on :attr:`loop`)."""
        return self._manager

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the manager lives on (running in a background thread)."""
        return self._loop.loop

    def keys(self, input_ids: Any) -> list[ChunkKey]:
        """Chunk keys of the prompt's full chunks."""
        return chunk_keys(_flat_ids(input_ids).numpy(), self.namespace, self.chunk_tokens)

    def load(self, input_ids: Any, *, extra_tokens: int = 0) -> tuple[PagedKVCache, int]:
        """A :class:`PagedKVCache` holding the longest stored prefix of the prompt, and its length.

        At least one prompt token is left to compute (the forward must produce logits). The
        cache is armed to store the prompt's new full chunks once a forward has written them.
        On CUDA the prefix may still be loading on a side stream: the cache orders attention
        after it. ``extra_tokens`` reserves room for tokens generated afterwards.
        """
        self._check_open()
        ids = _flat_ids(input_ids)  # hashing needs the tokens on the host: pass CPU ids to avoid a sync
        n = int(ids.numel())
        if n == 0:
            raise InvalidArgumentError("the prompt is empty")
        keys = chunk_keys(ids.numpy(), self.namespace, self.chunk_tokens)
        cache = PagedKVCache(num_layers=self.num_layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
                             block_size=self.block_size, capacity_tokens=n + max(extra_tokens, 0),
                             dtype=self.dtype, device=self.device)
        t0 = time.perf_counter()
        fetched = self._fetch(keys[: (n - 1) // self.chunk_tokens])
        info = LoadInfo(n, fetched.chunks * self.chunk_tokens, fetched.chunks,
                        fetched.chunks * self.chunk_bytes, fetched.staged, (time.perf_counter() - t0) * 1e3)
        if fetched.chunks:
            self._onload(cache, fetched, info)
        self.last = info
        cache._arm(n, lambda c: self._schedule_store(c, keys, fetched.chunks))
        return cache, info.hit_tokens

    def prefill(self, input_ids: Any, *, max_new_tokens: int = 0, all_logits: bool = False,
                **forward_kwargs: Any) -> PrefillResult:
        """Run the prompt through the model, reusing its stored prefix.

        Returns ``(logits, cache, hit_tokens)``: the logits of the last position (all computed
        positions with ``all_logits=True``), the filled :class:`PagedKVCache` (continue decoding
        with it) and how many prompt tokens came from the tiers. The logits are on the GPU and may
        still be computing (asynchronous like any CUDA forward).
        """
        flat = _flat_ids(input_ids)
        ids = flat.unsqueeze(0).to(self.device)
        cache, hit = self.load(flat, extra_tokens=max_new_tokens)
        if not all_logits and "logits_to_keep" not in forward_kwargs:
            forward_kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            out = self.model(input_ids=ids[:, hit:], past_key_values=cache, use_cache=True, **forward_kwargs)
        return PrefillResult(out.logits, cache, hit)

    def generate(self, input_ids: Any, **generate_kwargs: Any) -> Any:
        """``model.generate`` with the prompt's stored prefix loaded first; same arguments/result.

        Batch size 1 without beams. ``past_key_values`` is supplied here and must not be passed.
        """
        if "past_key_values" in generate_kwargs:
            raise InvalidArgumentError("KVPrefixCache.generate supplies past_key_values itself")
        flat = _flat_ids(input_ids)
        ids = flat.unsqueeze(0).to(self.device)
        gen_cfg = generate_kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        extra = generate_kwargs.get("max_new_tokens") or getattr(gen_cfg, "max_new_tokens", None)
        if not extra:
            max_length = generate_kwargs.get("max_length") or getattr(gen_cfg, "max_length", None) or 0
            extra = max(int(max_length) - ids.shape[1], 0)
        cache, _ = self.load(flat, extra_tokens=int(extra or 0))
        generate_kwargs.setdefault("attention_mask", torch.ones_like(ids))
        with torch.no_grad():
            return self.model.generate(ids, past_key_values=cache, **generate_kwargs)

    def flush(self) -> None:
        """Wait until every scheduled store reached the tiers (including async tiers' queues)."""
        self._check_open()
        self._worker.join()
        self._loop.run(self._manager.flush())

    def close(self) -> None:
        """Finish background stores, close the manager if this object opened it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._worker.join()
            self._worker.stop()
            self._copiers.shutdown(wait=True)
            if self._owns_manager:
                self._loop.run(self._manager.aclose())
        finally:
            self._loop.stop()
            self._pool.close()

    def __enter__(self) -> KVPrefixCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- retrieval -----------------------------------------------------------------------------
    def _fetch(self, keys: Sequence[ChunkKey]) -> _Fetched:
        """The leading stored chunks of ``keys`` as host tensors the transfer layer can read."""
        if not keys:
            return _Fetched(0, [], [], 0)
        hit = self._loop.run(self._manager.lookup(keys))
        if not hit:
            return _Fetched(0, [], [], 0)
        values = self._loop.run(self._manager.get(keys[:hit]))
        host: list[torch.Tensor] = []
        holds: list[Any] = []
        staging: list[tuple[HostBuffer, Any]] = []
        for key, value in zip(keys, values, strict=False):
            if value is None:  # evicted since lookup, or the tier faulted: a miss from here on
                break
            size = as_bytes_view(value).nbytes
            if size != self.chunk_bytes:
                log.warning("lmtier transformers: %s holds %d bytes, expected %d; treated as a miss",
                            key, size, self.chunk_bytes)
                break
            tensor = host_tensor_of(value)
            if tensor is not None and tensor.numel() == size and (tensor.is_pinned() or not self._cuda):
                host.append(tensor)  # zero copy: the transfer reads the tier's own memory
                holds.append(value)
                continue
            buf = self._pool.try_allocate(size)
            if buf is None:
                log.info("lmtier transformers: staging pool full; loading %d of %d hit chunks",
                         len(host), len(values))
                break
            staging.append((buf, value))
            host.append(buf.tensor)
            holds.append(buf)
        del values
        if staging:
            try:
                list(self._copiers.map(_copy_into, staging))
            except BaseException:
                _release(holds)
                raise
        return _Fetched(len(host), host, holds, len(staging))

    def _onload(self, cache: PagedKVCache, fetched: _Fetched, info: LoadInfo) -> None:
        ppc = self.pages_per_chunk
        block_ids = [list(range(c * ppc, (c + 1) * ppc)) for c in range(fetched.chunks)]
        layers = cache.storage_layers
        layout = cache.layout
        if not self._cuda:
            try:
                onload(layers, layout, block_ids, fetched.host)
            finally:
                _release(fetched.holds)
            cache._set_prefix(info.hit_tokens, None)
            return
        stream = self._load_stream
        assert stream is not None
        # the fresh buffer may reuse memory the compute stream just freed: start after its work
        stream.wait_stream(torch.cuda.current_stream(self.device))
        cache._storage.buf.record_stream(stream)
        if self.timing:
            info.load_start = torch.cuda.Event(enable_timing=True)
            info.load_end = torch.cuda.Event(enable_timing=True)
            info.load_start.record(stream)
        events: list[Any] = []
        try:
            if self.layerwise:
                for layer in range(self.num_layers):
                    onload(layers, layout, block_ids, fetched.host, layers=[layer], stream=stream)
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    events.append(ev)
            else:
                onload(layers, layout, block_ids, fetched.host, stream=stream)
                ev = torch.cuda.Event()
                ev.record(stream)
                events = [ev] * self.num_layers
        except BaseException:
            stream.synchronize()
            _release(fetched.holds)
            raise
        if info.load_end is not None:
            info.load_end.record(stream)
        cache._set_prefix(info.hit_tokens, events)
        last, holds = events[-1], fetched.holds

        def release_after_load() -> None:
            last.synchronize()
            _release(holds)

        self._worker.submit(release_after_load)

    # -- storing -------------------------------------------------------------------------------
    def _schedule_store(self, cache: PagedKVCache, keys: Sequence[ChunkKey], first: int) -> None:
        """Called from the prompt's last layer update: store chunks ``first..`` in the background."""
        if first >= len(keys):
            return
        storage = cache._storage
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        fence = _Fence(threading.Event())
        cache._add_fence(fence)
        todo_keys = list(keys[first:])

        def job() -> None:
            try:
                self._store(storage, todo_keys, first, ready, fence)
            finally:
                fence.enqueued.set()

        self._worker.submit(job)

    def _store(self, storage: _KVStorage, keys: list[ChunkKey], first: int, ready: Any, fence: _Fence) -> None:
        present = self._loop.run(self._manager.contains(keys))
        todo = [(first + i, k) for i, (k, p) in enumerate(zip(keys, present, strict=True)) if not p]
        if not todo:
            return
        bufs = self._loop.run(self._allocate(len(todo)))
        try:
            if len(bufs) < len(todo):
                log.info("lmtier transformers: room to store %d of %d new chunks", len(bufs), len(todo))
            todo = todo[: len(bufs)]
            if not todo:
                return
            ppc = self.pages_per_chunk
            ids = [list(range(c * ppc, (c + 1) * ppc)) for c, _ in todo]
            host = [b.tensor for b in bufs]
            if self._cuda:
                stream = self._store_stream
                assert stream is not None
                stream.wait_event(ready)
                offload(storage.layers, storage.layout, ids, host, stream=stream)
                done = torch.cuda.Event()
                done.record(stream)
                fence.done = done
                fence.enqueued.set()
                done.synchronize()
            else:
                offload(storage.layers, storage.layout, ids, host)
                fence.enqueued.set()
            # HostBuffer has no buffer protocol before Python 3.12; the manager and tiers accept it
            items = cast("list[tuple[ChunkKey, Buffer]]", [(k, b) for (_, k), b in zip(todo, bufs, strict=False)])
            self._loop.run(self._manager.put(items))
        finally:
            _release(bufs)

    async def _allocate(self, count: int) -> list[HostBuffer]:
        """Host buffers for new chunks: in the hottest tier's own memory when it offers that
        (``put`` then adopts them without a copy), else in the staging pool. Runs on the loop,
        where the tier's bookkeeping lives."""
        hot = self._manager.tiers[0].backend
        allocate = hot.allocate if isinstance(hot, SupportsAllocate) else None
        out: list[HostBuffer] = []
        own_memory = allocate is not None
        for _ in range(count):
            buf: HostBuffer | None
            if own_memory:
                # When the tier's own memory is full, a staged copy would not fit there either:
                # its put would evict the chunks we are storing. Store what fits.
                try:
                    assert allocate is not None
                    buf = allocate(self.chunk_bytes)
                except LmtierError:
                    break
                if self._cuda and not buf.pinned:
                    buf.release()
                    own_memory = False  # an unpinned slab: stage in our pinned pool instead
                    buf = self._pool.try_allocate(self.chunk_bytes)
            else:
                buf = self._pool.try_allocate(self.chunk_bytes)
            if buf is None:
                break
            out.append(buf)
        return out

    def _check_open(self) -> None:
        if self._closed:
            raise LmtierError("this KVPrefixCache is closed")


# -- helpers -------------------------------------------------------------------------------------
def _model_shape(cfg: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config; NotSupportedError for non-full attention."""
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
    except (AttributeError, TypeError):
        raise NotSupportedError(f"{type(cfg).__name__} is not a decoder config with num_hidden_layers / "
                                "num_attention_heads") from None
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        raise NotSupportedError(f"layer types {sorted(set(types))}: KVPrefixCache supports full-attention "
                                "layers only (sliding windows keep no full prefix)")
    if types is None and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise NotSupportedError("sliding-window attention is not supported by KVPrefixCache")
    return layers, kv_heads, head_dim


def _flat_ids(input_ids: Any) -> torch.Tensor:
    """Token ids as a 1-D int64 CPU tensor (one sequence)."""
    t = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(np.asarray(input_ids))
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise NotSupportedError(f"one sequence at a time (batch size 1), got shape {tuple(t.shape)}")
        t = t[0]
    if t.dim() != 1:
        raise InvalidArgumentError(f"input_ids must be 1-D or [1, n], got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.int64)


def _copy_into(item: tuple[HostBuffer, Any]) -> None:
    # numpy releases the GIL for the copy, so chunks are copied in parallel
    buf, value = item
    np.copyto(buf.tensor.numpy(), np.frombuffer(as_bytes_view(value), dtype=np.uint8))


def _release(holds: Sequence[Any]) -> None:
    for h in holds:
        if isinstance(h, HostBuffer):
            with contextlib.suppress(LmtierError):  # already released on another path
                h.release()

