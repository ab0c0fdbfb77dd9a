"""Prefix KV reuse for Hugging Face ``transformers`` decoder models, through lmtier's tiers.

::

    kv = KVPrefixCache(model, "lmtier.yaml", model_id="Qwen/Qwen3-8B")
    out = kv.generate(input_ids, max_new_tokens=64)          # model.generate, prefix reused
    logits, cache, hit_tokens = kv.prefill(input_ids)        # one forward, last-position logits
    kv.flush(); kv.close()

This module is glue: the cache class and ``generate``/``prefill``. Everything else — keys, lookup,
fetch, the layer-wise onload, the copy-out and the store — is one
:class:`~lmtier.engine.KVCacheEngine` (:attr:`KVPrefixCache.engine`), the same façade the vLLM
connector uses. Before the forward, the prompt is looked up (capped so that one token is left to
compute); the hit prefix's chunks are fetched (a RAM hit is read in place, a colder hit lands
once in pinned host memory) and copied into the model's cache by :mod:`lmtier.transfer` (the
native kernel on CUDA), and only the suffix is computed. The new full chunks are copied out and
stored by a background thread after the prompt's last layer wrote them, off the critical path.

**The cache.** :class:`PagedKVCache` is a ``transformers`` :class:`~transformers.Cache` for one
sequence whose storage per layer is ``(2, num_blocks, block_size, kv_heads, head_dim)`` (layout
kind ``"vllm_kv_first"``; block ``b`` holds tokens ``[b*block_size, (b+1)*block_size)``).
Attention sees K and V as views ``[1, kv_heads, seq, head_dim]`` (the transpose of
``[seq, kv_heads, head_dim]``, last dim contiguous, which SDPA / eager attention accept). A chunk
is then exactly two contiguous byte runs per layer: the transfer kernel moves it at link speed,
where ``DynamicCache``'s ``[B, H, S, D]`` tensors would scatter it into ``2*H`` strided runs.

**Layer-wise overlap (CUDA).** The engine onloads the prefix on a side stream one layer at a
time, each followed by an event (:meth:`~lmtier.engine.RetrieveHandle.enqueue`); the cache's
``update`` for layer ``l`` (called inside attention, after the Q/K/V projections) makes the
compute stream wait for event ``l`` before attention reads the prefix. Loading layer ``l+1`` thus overlaps computing layer ``l``, for any model that calls the
standard ``Cache.update`` — no model hooks needed.

**Faults are misses.** Tier faults come back from the store as misses, within the tiers'
deadlines; a chunk of the wrong size is a miss; a hit that cannot be loaded is truncated. The
result is always the model's own computation for whatever was not loaded.

Limits: batch size 1 (no beams); every layer must be full attention (no sliding windows,
no linear-attention layers); ``transformers >= 4.56`` (the layered ``Cache`` API).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from lmtier.config import LmtierConfig, load_config
from lmtier.cost import ForwardClock
from lmtier.engine import KVCacheEngine
from lmtier.errors import InvalidArgumentError, LmtierError, NotSupportedError
from lmtier.keys import ChunkKey, KVNamespace, chunk_keys
from lmtier.store import KVStore, LocalStore
from lmtier.transfer import PageLayout, describe_layout

try:
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as _exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        f"lmtier.integrations.transformers needs transformers>=4.56 ({_exc}); "
        "install it with `pip install 'transformers>=4.56'`"
    ) from _exc

if TYPE_CHECKING:
    import os

    from lmtier.manager import StorageManager
    from lmtier.registry import BackendRegistry

__all__ = ["KVPrefixCache", "LoadInfo", "PagedKVCache", "PrefillResult"]

log = logging.getLogger("lmtier.transformers")

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
    staged_chunks: int  # chunks copied once more on the host (a part of a chunk), not read in place
    fetch_ms: float = 0.0  # wall time of lookup + fetch (+ staging copies), before the onload
    load_start: Any = None  # CUDA timing events on the load stream (with timing=True)
    load_end: Any = None

    def load_ms(self) -> float | None:
        """GPU time of the onload (waits for it); None without CUDA timing events."""
        if self.load_start is None or self.load_end is None:
            return None
        self.load_end.synchronize()
        return float(self.load_start.elapsed_time(self.load_end))


class KVPrefixCache:
    """Reuse cached prompt prefixes of a HF decoder model from lmtier's tiers.

    Everything below the model's cache goes through one :class:`~lmtier.engine.KVCacheEngine`
    (lookup, fetch and layer-wise onload on a side stream, copy-out and store behind the call);
    this class adds only :class:`PagedKVCache` and the ``transformers`` glue.

    Args:
        model: a ``transformers`` causal LM (batch size 1, all layers full attention).
        storage: a config for a new :class:`~lmtier.store.LocalStore` (YAML path, mapping,
            :class:`~lmtier.config.LmtierConfig`) that this object opens and closes; an open
            :class:`~lmtier.store.KVStore` (e.g. another cache's :attr:`store`, a ``ServerStore``);
            or an open :class:`~lmtier.manager.StorageManager` together with ``loop``, the running
            event loop it lives on. The last two stay open when this object closes.
        model_id: names the weights in the key namespace (default: ``config._name_or_path``;
            required when that is empty, e.g. a randomly initialised model). Two models must
            never share a ``model_id``: that is what keeps their KV apart.
        chunk_tokens: tokens per stored chunk (default: the config's ``chunk_tokens``).
        block_size: tokens per page of :class:`PagedKVCache` (default ``chunk_tokens``; must
            divide it). Part of the namespace.
        registry: backend registry for opening ``storage`` (default: entry points).
        host_pool_bytes: the store's host pool (pinned), for chunks the hot tier cannot hold
            (default: the config's ``host_pool_bytes``; only with a config).
        layerwise: on CUDA, overlap loading layer ``l+1`` with computing layer ``l``.
        timing: record CUDA timing events around each onload (:attr:`last`).
    """

    def __init__(
        self,
        model: Any,
        storage: str | os.PathLike[str] | Mapping[str, Any] | LmtierConfig | StorageManager | KVStore,
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
        from lmtier.manager import StorageManager

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
        kvstore: KVStore | None = None
        config: LmtierConfig | None = None
        if isinstance(storage, StorageManager):
            if loop is None:
                raise InvalidArgumentError("pass loop= (the running event loop the StorageManager lives on)")
            kvstore = LocalStore.attach(storage, loop)
            config = storage.config
        elif isinstance(storage, KVStore):
            if loop is not None:
                raise InvalidArgumentError("loop= goes with an open StorageManager, not with a KVStore")
            kvstore = storage
            config = storage.manager.config if isinstance(storage, LocalStore) else None
        else:
            if loop is not None:
                raise InvalidArgumentError("loop= goes with an open StorageManager, not with a config")
            config = load_config(storage)
        self.chunk_tokens = int(chunk_tokens or (config.chunk_tokens if config is not None else 256))
        self.block_size = int(block_size or self.chunk_tokens)
        if self.block_size < 1 or self.chunk_tokens % self.block_size:
            raise InvalidArgumentError(f"block_size {self.block_size} must divide chunk_tokens {self.chunk_tokens}")
        self.pages_per_chunk = self.chunk_tokens // self.block_size
        esize = torch.empty((), dtype=self.dtype).element_size()
        page_bytes = 2 * self.block_size * self.kv_heads * self.head_dim * esize
        self.chunk_bytes = self.num_layers * self.pages_per_chunk * page_bytes
        cfg_digest = hashlib.sha256(cfg.to_json_string(use_diff=False).encode()).hexdigest()[:16]
        self.kv = KVNamespace(
            model=ident, kv_layout=LAYOUT_KIND, dtype=str(self.dtype).removeprefix("torch."),
            num_layers=self.num_layers, block_size=self.block_size, num_kv_heads=self.kv_heads,
            head_size=self.head_dim, page_bytes=page_bytes, chunk_tokens=self.chunk_tokens,
            engine="transformers", extra=(("config", cfg_digest),),
        )
        self.namespace = self.kv.namespace
        self._cuda = self.device.type == "cuda"
        if kvstore is None:
            assert config is not None
            update: dict[str, Any] = {"chunk_tokens": self.chunk_tokens}
            if host_pool_bytes:
                update["host_pool_bytes"] = host_pool_bytes
            config = config.model_copy(update=update)
        self.engine = KVCacheEngine(config if kvstore is None else None, self.kv, save_tail=False,
                                    layerwise=layerwise, kvstore=kvstore, registry=registry,
                                    name="lmtier-hf")
        # the engine's namespace: this one, naming the store's lossy codecs if a tier quantizes
        self.kv, self.namespace = self.engine.kv, self.engine.namespace
        self._worker = _Worker()
        self._store_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._clock = ForwardClock(self.device)  # times full prefills: the load decision weighs hits with it
        self._closed = False
        self.last: LoadInfo | None = None

    # -- public API ----------------------------------------------------------------------------
    @property
    def store(self) -> KVStore:
        """The KV store below the engine (pass it to another KVPrefixCache to share it)."""
        return self.engine.kvstore

    @property
    def manager(self) -> StorageManager:
        """The StorageManager of a local store (call its coroutines on :attr:`loop`)."""
        return self.engine.manager

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop a local store's manager lives on (running in a background thread)."""
        store = self.engine.kvstore
        if not isinstance(store, LocalStore):
            raise NotSupportedError(f"this cache stores through {type(store).__name__}, which has no local loop")
        return store.loop

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
        tokens = ids.numpy()
        cache = PagedKVCache(num_layers=self.num_layers, kv_heads=self.kv_heads, head_dim=self.head_dim,
                             block_size=self.block_size, capacity_tokens=n + max(extra_tokens, 0),
                             dtype=self.dtype, device=self.device)
        for spans, seconds in self._clock.finished():  # earlier prefills: the engine's prefill speed
            self.engine.observe_compute(spans, seconds)
        t0 = time.perf_counter()
        hit = self.engine.lookup(tokens, limit=n - 1)
        loaded, staged, start_ev, end_ev = 0, 0, None, None
        fetch_ms = 0.0
        if hit:
            layers = cache.storage_layers
            blocks = list(range(-(-hit // self.block_size)))
            if self._cuda:  # the fresh storage may be freed while the load stream still writes it
                cache._storage.buf.record_stream(self.engine.load_stream(self.device))
            handle = self.engine.start_retrieve(tokens, layers, blocks, start=0, end=hit)
            try:
                events = handle.enqueue(timing=self.timing)  # CUDA: enqueued per layer; CPU: copied
                fetch_ms = (time.perf_counter() - t0) * 1e3
                loaded, staged = handle.loaded_tokens, handle.staged_chunks
                start_ev, end_ev = handle.load_start, handle.load_end
                if handle.failed:
                    loaded = 0
            finally:
                handle.close()  # CUDA: the host chunks go back once the last copy completed
            cache._set_prefix(loaded, events if loaded else None)
        else:
            fetch_ms = (time.perf_counter() - t0) * 1e3
        page = self.chunk_bytes // self.pages_per_chunk // self.num_layers
        info = LoadInfo(n, loaded, -(-loaded // self.chunk_tokens), loaded // self.block_size * page * self.num_layers,
                        staged, fetch_ms, start_ev, end_ev)
        self.last = info
        cache._arm(n, lambda c: self._schedule_store(c, tokens))
        return cache, loaded

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
        timed = hit == 0  # a forward that waits for a load would time the load: only full prefills count
        if timed:
            self._clock.start([(0, int(flat.numel()))])
        with torch.no_grad():
            out = self.model(input_ids=ids[:, hit:], past_key_values=cache, use_cache=True, **forward_kwargs)
        if timed:
            self._clock.stop()
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
        self.engine.flush()

    def close(self) -> None:
        """Finish background stores and close the engine (and the store it opened). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._worker.join()
            self._worker.stop()
        finally:
            self.engine.close()

    def __enter__(self) -> KVPrefixCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- storing -------------------------------------------------------------------------------
    def _schedule_store(self, cache: PagedKVCache, tokens: Any) -> None:
        """Called from the prompt's last layer update: store its full chunks in the background.

        The engine skips the chunks its hot tier holds (the loaded prefix) without copying them.
        On CUDA the copy runs on a store stream ordered after the compute stream's position now;
        the cache's fence makes a later rewrite of these positions wait for it.
        """
        n = len(tokens)
        if n < self.chunk_tokens:
            return
        storage = cache._storage
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        fence = _Fence(threading.Event())
        cache._add_fence(fence)
        blocks = list(range(-(-n // self.block_size)))

        def job() -> None:
            try:
                stream = self._store_stream
                if stream is not None and ready is not None:
                    stream.wait_event(ready)
                handle = self.engine.store(tokens, storage.layers, blocks, end=n, stream=stream)
                fence.done = handle.copy_event
            finally:
                fence.enqueued.set()

        self._worker.submit(job)

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
