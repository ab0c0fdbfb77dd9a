"""SGLang HiCache L3 storage backend: SGLang's hierarchical cache backed by lmtier's tiers.

Launch SGLang (0.5.23) with::

    python -m sglang.launch_server --model-path M --enable-hierarchical-cache \\
        --hicache-mem-layout page_first --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "lmtier",
            "module_path": "lmtier.integrations.sglang", "class_name": "LMTierHiCacheStorage",
            "interface_v1": 1, "lmtier_config": "/etc/lmtier.yaml"}'

SGLang's backend factory calls ``LMTierHiCacheStorage(storage_config, kwargs)``; the cache
controller then registers its host pool (:meth:`~LMTierHiCacheStorage.register_mem_pool_host`) and
calls the storage methods from its prefetch and backup threads. The tiers come from
``"lmtier_config"`` (a YAML path), else ``LMTIER_CONFIG``, else lmtier's embedded default (cpu +
disk); a configuration naming a server (``server: unix:///...``) makes every rank a client of
``lmtier serve``, so all ranks and engines on the node (SGLang and vLLM alike) share one cache.

**Extra-config keys.** SGLang's own (``backend_name``, ``module_path``, ``class_name``,
``interface_v1``, ``allocator``, and the ones SGLang consumes before us) and lmtier's:
``lmtier_config`` (YAML path) and ``lmtier_namespace_salt`` (any string: change it when the weights
behind a model name change, or to keep two deployments apart). Any other key is a
:class:`~lmtier.errors.ConfigError` naming it and the allowed keys, raised while SGLang starts.

**Keys and namespace.** SGLang names a page by a hex SHA-256 chained over the page's tokens and
all before it; lmtier stores it under :class:`~lmtier.keys.ChunkKey` ``(namespace,
xxh3_128(sglang key))``, whose string form is hex only (file names, Redis keys, S3 keys). The
namespace hashes everything that makes the bytes interpretable: model, pipeline/context-parallel
ranks, the TP rank and size (not for MLA models, whose KV is the same on every rank: there only the
writer rank SGLang selects stores, and every rank reads the same objects), the host pool's class,
layout, dtype and page geometry (known once the pool is registered), the interface (``v1`` pages
and ``flat`` pages are stored apart) and the salt. Data-parallel ranks share KV (same heads), so the
DP rank is not in it.

**Zero-copy v1** (``"interface_v1": 1``, what SGLang uses with this flag): ``batch_set_v1`` /
``batch_get_v1`` take host-pool indices; the pool's ``get_page_buffer_meta`` names where each
page's pieces lie (K and V for MHA, one run for MLA). A page is stored as one object (its pieces
in that order). Writes copy the pieces once, straight from SGLang's pool into buffers the store
reserved (its hot tier's memory: nothing is copied again to land there). Reads of a one-piece
page fill the pool in place from whichever tier holds it (one copy); a multi-piece page is fetched
into the store's buffer (no copy for a RAM hit) and its pieces are copied into the pool. The layout
is checked when the pool is registered: pieces outside the pool's buffers, pieces whose count or
size varies, or a pool that cannot describe its pages is a
:class:`~lmtier.errors.NotSupportedError` then — never wrong bytes later.

**Value codecs.** A tier's ``codec:`` applies to pages. For a lossy one (fp8, int8) the page's
geometry is registered with the store when the pool registers, and pages are keyed under the
namespace that declares the codec (``docs/codecs.md``); a chain without one keeps the namespace.

**Plain interface** (``interface_v1`` 0): ``batch_set(keys, values)`` stores CPU tensors (SGLang's
flat data pages), ``batch_get(keys, target_locations)`` fills CPU tensors in place.

**Faults are misses.** A tier that is down, slow or full makes ``batch_exists`` count fewer pages,
``batch_get*`` report a page missing and ``batch_set*`` report it unstored — within the store's
deadlines, never an exception. Only bad arguments raise (:class:`~lmtier.errors.InvalidArgumentError`).

**Observability.** Logger ``lmtier.sglang``: one line at start and one at registration (namespace,
store, page geometry); debug lines per call. Engine counters on the store's metrics
(``lmtier_requested_tokens``, ``lmtier_hit_tokens``, ``lmtier_loaded_tokens``,
``lmtier_stored_tokens``, ``lmtier_hit_ratio``) and, for ``--enable-cache-report``-style storage
metrics, :meth:`~LMTierHiCacheStorage.get_stats` returns SGLang's ``StorageMetrics`` (pages per
call, GB/s) for ``sglang:*`` histograms.

**clear()** drops this deployment's pages (its namespace) from every tier that can clear (RAM,
disk, ``lmtier serve``'s), leaving other engines' pages and remote tiers (Redis, S3) alone.

**Not supported:** hybrid models' side pools (Mamba, SWA, DSA indexer, draft KV: registering one
raises) and heterogeneous-TP head splitting (``tp_lcm_size``).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

try:
    import torch
    from sglang.srt.mem_cache.hicache_storage import (
        HiCacheStorage,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
    )
except ImportError as _exc:  # pragma: no cover - exercised only without sglang
    raise ImportError(
        f"lmtier.integrations.sglang needs SGLang 0.5.23+ ({_exc}). Install it with "
        "`pip install 'lmtier[sglang]'` (on CPU-only hosts: `pip install --no-deps sglang==0.5.23` "
        "plus orjson and IPython; the engine itself needs CUDA)."
    ) from _exc

import numpy as np
import xxhash

from lmtier.buffers import as_bytes_view, writable_bytes_view
from lmtier.config import LmtierConfig, load_config
from lmtier.errors import ConfigError, InvalidArgumentError, LmtierError, NotSupportedError
from lmtier.keys import ChunkKey, make_namespace

if TYPE_CHECKING:
    from lmtier.keys import KVNamespace
    from lmtier.protocol import Buffer
    from lmtier.store import HostChunk, KVStore

__all__ = ["LMTierHiCacheStorage", "parse_extra_config"]

log = logging.getLogger("lmtier.sglang")

#: Keys SGLang reads itself (some are popped before the backend sees them; newer or older
#: releases may leave them in), so they are allowed next to ours.
SGLANG_KEYS = frozenset({
    "backend_name", "module_path", "class_name", "interface_v1", "allocator", "file_storage_path",
    "tp_lcm_size", "prefetch_threshold", "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
    "hicache_storage_pass_prefix_keys",
})
#: lmtier's own keys.
LMTIER_KEYS = frozenset({"lmtier_config", "lmtier_namespace_salt"})
_ENGINE = "sglang-hicache"
#: Bound on the per-call samples kept for get_stats between two calls of it.
_MAX_SAMPLES = 4096


@dataclass(frozen=True)
class _Options:
    config: LmtierConfig
    config_source: str
    salt: str
    interface_v1: bool


def parse_extra_config(extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None) -> _Options:
    """Validate SGLang's ``--hicache-storage-backend-extra-config`` and load the lmtier config.

    Raises :class:`~lmtier.errors.ConfigError` naming an unknown key (and the allowed ones), a
    ``lmtier_config`` that is not a string, or a configuration file that cannot be read or is
    invalid (the message names ``lmtier_config`` or ``LMTIER_CONFIG`` and the file).
    """
    extra = dict(extra or {})
    unknown = sorted(set(extra) - SGLANG_KEYS - LMTIER_KEYS)
    if unknown:
        raise ConfigError(
            f"--hicache-storage-backend-extra-config: unknown key(s) {unknown} for lmtier; lmtier "
            f"reads {sorted(LMTIER_KEYS)} (besides SGLang's own {sorted(SGLANG_KEYS)})")
    env = os.environ if env is None else env
    path = extra.get("lmtier_config")
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"--hicache-storage-backend-extra-config: lmtier_config must be the path of "
                          f"an lmtier YAML file, got {path!r}")
    salt = extra.get("lmtier_namespace_salt", "")
    if not isinstance(salt, str):
        raise ConfigError(f"--hicache-storage-backend-extra-config: lmtier_namespace_salt must be a "
                          f"string, got {salt!r}")
    where = (f"lmtier_config={path}" if path is not None
             else f"LMTIER_CONFIG={env['LMTIER_CONFIG']}" if env.get("LMTIER_CONFIG") else "the embedded default")
    try:
        cfg = load_config(path, env=env)
    except ConfigError as exc:
        raise ConfigError(f"--hicache-storage-backend-extra-config ({where}): {exc}") from None
    return _Options(cfg, where, salt, bool(extra.get("interface_v1", 0)))


@dataclass(frozen=True)
class _Region:
    """One host-pool tensor the page pieces may lie in."""

    base: int
    nbytes: int
    array: np.ndarray[Any, np.dtype[np.uint8]]  # flat uint8 view of the same memory


@dataclass(frozen=True)
class _PageGeometry:
    """How one page of the registered host pool lies in memory (checked at registration)."""

    tokens: int  # host indices per page
    piece_sizes: tuple[int, ...]  # bytes of each piece, in get_page_buffer_meta order
    regions: tuple[_Region, ...]

    @property
    def page_bytes(self) -> int:
        return sum(self.piece_sizes)


class _Samples:
    """Per-call figures for SGLang's StorageMetrics, kept until get_stats drains them."""

    def __init__(self) -> None:
        self.prefetch_pgs: collections.deque[int] = collections.deque(maxlen=_MAX_SAMPLES)
        self.backup_pgs: collections.deque[int] = collections.deque(maxlen=_MAX_SAMPLES)
        self.prefetch_bandwidth: collections.deque[float] = collections.deque(maxlen=_MAX_SAMPLES)
        self.backup_bandwidth: collections.deque[float] = collections.deque(maxlen=_MAX_SAMPLES)


class LMTierHiCacheStorage(HiCacheStorage):
    """SGLang's ``HiCacheStorage`` over an lmtier :class:`~lmtier.store.KVStore` (see the module doc).

    Args:
        storage_config: SGLang's ``HiCacheStorageConfig`` (ranks, model, MLA, extra config).
        kwargs: what SGLang's dynamic backend factory passes along (unused).
        store: an open KVStore to use instead of opening one from the configuration (the caller
            keeps ownership: :meth:`close` does not close it).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Mapping[str, Any] | None = None, *,
                 store: KVStore | None = None) -> None:
        if not isinstance(storage_config, HiCacheStorageConfig):
            raise InvalidArgumentError(f"storage_config must be SGLang's HiCacheStorageConfig, got "
                                       f"{type(storage_config).__name__}")
        opts = parse_extra_config(storage_config.extra_config)
        if storage_config.should_split_heads:
            raise NotSupportedError(
                "lmtier does not split KV heads across heterogeneous TP sizes (tp_lcm_size); remove "
                "tp_lcm_size from --hicache-storage-backend-extra-config")
        self.storage_config = storage_config
        self.interface_v1 = opts.interface_v1
        self.is_writer = bool(storage_config.is_storage_writer)
        self._salt = opts.salt
        self._geometry: _PageGeometry | None = None
        self._pool_fields: dict[str, Any] | None = None
        self.namespace = self._make_namespace()
        self._samples = _Samples()
        self._lock = threading.Lock()  # registration vs calls: the geometry changes as one
        self._owns_store = store is None
        self.store: KVStore = (store if store is not None
                               else _open_store(opts.config, storage_config, namespace=self.namespace))
        if self._owns_store:
            self._warn_if_private(opts.config)
        log.info("lmtier HiCache storage: namespace %s (model %s, %s), config %s, %s interface%s",
                 self.namespace, storage_config.model_name or "-", self._ranks(), opts.config_source,
                 "zero-copy v1" if self.interface_v1 else "plain",
                 "" if self.is_writer else "; this rank reads only (MLA: another rank writes)")

    # -- registration --------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Adopt SGLang's host pool; checks (v1) that its pages can be read and written in place.

        Raises :class:`~lmtier.errors.NotSupportedError` for a pool whose pages lmtier cannot
        address (see the module doc); the namespace then includes the pool's geometry.
        """
        geometry = _page_geometry(mem_pool_host, self.storage_config) if self.interface_v1 else None
        fields = _pool_fields(mem_pool_host, geometry)
        with self._lock:
            super().register_mem_pool_host(mem_pool_host)
            self._geometry = geometry
            self._pool_fields = fields
            self.namespace = self._make_namespace()
        self._declare_kv(mem_pool_host, geometry)
        if geometry is not None:
            log.info("lmtier HiCache storage: %s (layout %s, %s), pages of %d tokens stored as one "
                     "%d-byte object (%d piece(s)), namespace %s", fields["pool"], fields["layout"],
                     fields["dtype"], geometry.tokens, geometry.page_bytes, len(geometry.piece_sizes),
                     self.namespace)
        else:
            log.info("lmtier HiCache storage: %s registered (plain interface), namespace %s",
                     fields["pool"], self.namespace)

    def _declare_kv(self, pool: Any, geometry: _PageGeometry | None) -> None:
        """Tell the store what a page's bytes are (:class:`~lmtier.keys.KVNamespace`), so a tier
        with a lossy codec (fp8, int8) quantizes this deployment's pages; when the store's chain
        has one, pages are keyed under the namespace that declares it (lossy pages are only ever
        served to deployments configured alike). A chain without a lossy codec keeps the
        namespace as it was. Raises :class:`~lmtier.errors.ConfigError` when a lossy tier cannot
        quantize this KV (not a float dtype), naming the tier: SGLang fails the attach."""
        from lmtier.store import SupportsNamespaces

        kv = _kv_namespace(pool, geometry, self.storage_config, self.namespace)
        if kv is None or not isinstance(self.store, SupportsNamespaces):
            return
        declared = self.store.register_namespace(kv)
        if declared is not kv and declared.namespace != kv.namespace:
            with self._lock:
                self.namespace = declared.namespace
            log.info("lmtier HiCache storage: the store quantizes (%s): pages keyed under namespace %s",
                     dict(declared.extra).get("lossy_codecs", "?"), declared.namespace)

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Accept the KV pool under its v2 name; a hybrid model's side pool is NotSupportedError."""
        if str(host_pool_name) == "kv" and host_pool is getattr(self, "mem_pool_host", None):
            super().register_mem_host_pool_v2(host_pool, host_pool_name)
            return
        raise NotSupportedError(
            f"lmtier stores SGLang's KV pool only; the {str(host_pool_name)!r} pool "
            f"({type(host_pool).__name__}) of this model (hybrid: Mamba/SWA/DSA indexer/draft KV) is "
            "not supported. Use another --hicache-storage-backend for this model.")

    # -- zero-copy v1 --------------------------------------------------------------------------
    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Store the pages at ``host_indices`` under ``keys``; True per page handed to the store."""
        geometry, namespace = self._v1_state("batch_set_v1")
        n = len(keys)
        if n == 0:
            return []
        if not self.is_writer:
            return [True] * n  # MLA: the writer rank stores the (identical) pages
        start = time.perf_counter()
        pieces = self._pieces(geometry, keys, host_indices)
        ckeys = self._chunk_keys(keys, namespace)
        chunks = self.store.reserve([geometry.page_bytes] * n)
        ok = [c is not None for c in chunks]
        items: list[tuple[ChunkKey, HostChunk]] = []
        try:
            for i, chunk in enumerate(chunks):
                if chunk is None:
                    continue
                dst = np.frombuffer(chunk.view(), dtype=np.uint8)
                at = 0
                for src in pieces[i]:
                    np.copyto(dst[at:at + src.size], src)
                    at += src.size
                items.append((ckeys[i], chunk))
        except BaseException:
            for chunk in chunks:
                if chunk is not None:
                    chunk.release()
            raise
        if items:
            self.store.commit(items)  # takes over the chunks; tiers are written behind the call
        stored = sum(ok)
        self._count_backup(stored, stored * geometry.page_bytes, time.perf_counter() - start)
        if stored < n:
            log.debug("lmtier HiCache storage: no room for %d of %d pages", n - stored, n)
        return ok

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Fill the pages at ``host_indices`` with ``keys``' values in place; True per page filled."""
        geometry, namespace = self._v1_state("batch_get_v1")
        n = len(keys)
        if n == 0:
            return []
        start = time.perf_counter()
        pieces = self._pieces(geometry, keys, host_indices)
        ckeys = self._chunk_keys(keys, namespace)
        if len(geometry.piece_sizes) == 1:
            # the page is one run of the pool: whichever tier holds it writes it there, once
            ok = self.store.fetch_into(ckeys, [cast("Buffer", p[0]) for p in pieces])
        else:
            ok = self._fetch_scattered(ckeys, pieces, geometry.page_bytes)
        hits = sum(ok)
        self._count_prefetch(hits, hits * geometry.page_bytes, time.perf_counter() - start)
        log.debug("lmtier HiCache storage: batch_get_v1 filled %d of %d pages", hits, n)
        return ok

    def _fetch_scattered(self, ckeys: list[ChunkKey], pieces: list[list[np.ndarray[Any, Any]]],
                         page_bytes: int) -> list[bool]:
        # A multi-piece page cannot be filled by one fetch_into: take the store's buffers (a RAM
        # hit is a lease, no copy) and copy each piece into the pool.
        chunks = self.store.fetch(ckeys, [page_bytes] * len(ckeys)).result()
        ok = [False] * len(ckeys)
        try:
            for i, chunk in enumerate(chunks):
                if chunk is None:
                    continue
                src = np.frombuffer(chunk.view(), dtype=np.uint8)
                at = 0
                for dst in pieces[i]:
                    np.copyto(dst, src[at:at + dst.size])
                    at += dst.size
                ok[i] = True
        finally:
            for chunk in chunks:
                if chunk is not None:
                    chunk.release()
        return ok

    # -- presence ------------------------------------------------------------------------------
    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading ``keys`` are stored (prefix semantics); a fault counts as absent."""
        if not keys:
            return 0
        ckeys = self._chunk_keys(keys, self.namespace)
        hit = self.store.lookup(ckeys).result().hit_chunks
        metrics = self.store.metrics
        tokens = self._page_tokens()
        metrics.requested_tokens.inc(len(keys) * tokens)
        metrics.hit_tokens.inc(hit * tokens)
        metrics.observe_hit_ratio()
        log.debug("lmtier HiCache storage: batch_exists %d of %d pages", hit, len(keys))
        return hit

    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored (in this instance's interface's namespace)."""
        return self.batch_exists([key]) == 1

    # -- plain interface -----------------------------------------------------------------------
    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        """Store CPU tensors ``values[i]`` under ``keys[i]``; True when every page was handed over."""
        if values is None or len(values) != len(keys):
            raise InvalidArgumentError(
                f"batch_set needs one value (a CPU tensor) per key, got {0 if values is None else len(values)} "
                f"values for {len(keys)} keys; lmtier does not take raw target_locations pointers")
        if not keys or not self.is_writer:
            return True
        start = time.perf_counter()
        views = [as_bytes_view(v.contiguous() if isinstance(v, torch.Tensor) else v) for v in values]
        ckeys = self._chunk_keys(keys, self.namespace)
        try:
            self.store.put(list(zip(ckeys, views, strict=True)))
        except InvalidArgumentError:
            raise
        except LmtierError as exc:  # a closed store: report the pages unstored
            log.warning("lmtier HiCache storage: batch_set of %d pages skipped (%s)", len(keys), exc)
            return False
        self._count_backup(len(keys), sum(v.nbytes for v in views), time.perf_counter() - start)
        return True

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        """Store one CPU tensor under ``key``."""
        return self.batch_set([key], [value])

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
                  ) -> list[torch.Tensor | None]:
        """Fill ``target_locations[i]`` (CPU tensors of the stored size) with ``keys[i]``'s value.

        Returns the filled tensor, or ``None`` for a miss. Without ``target_locations`` the
        registered pool's ``get_dummy_flat_data_page()`` provides them.
        """
        if not keys:
            return []
        if target_locations is None:
            pool = getattr(self, "mem_pool_host", None)
            if pool is None:
                raise InvalidArgumentError("batch_get needs target_locations (CPU tensors to fill) "
                                           "until a host pool is registered")
            target_locations = [pool.get_dummy_flat_data_page() for _ in keys]
        if len(target_locations) != len(keys):
            raise InvalidArgumentError(f"batch_get got {len(target_locations)} target_locations for "
                                       f"{len(keys)} keys")
        start = time.perf_counter()
        outs = [writable_bytes_view(t, what="batch_get") for t in target_locations]
        ok = self.store.fetch_into(self._chunk_keys(keys, self.namespace), outs)
        hits = sum(ok)
        self._count_prefetch(hits, sum(o.nbytes for o, hit in zip(outs, ok, strict=True) if hit),
                             time.perf_counter() - start)
        return [t if hit else None for t, hit in zip(target_locations, ok, strict=True)]

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        """One page of :meth:`batch_get`."""
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    # -- admin ---------------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop this deployment's pages (its namespace) from every tier that can clear.

        SGLang calls it for ``POST /hicache/storage-backend/clear`` (each rank on its own backend)
        and on a PD role switch. Other engines' pages, in a tier or server shared with them, stay;
        so do pages in remote tiers lmtier cannot clear (Redis, S3, NIXL: a warning names them;
        they hold this namespace's KV, still valid for these weights — change
        ``lmtier_namespace_salt`` when the weights change).
        """
        with self._lock:
            namespace = self.namespace
        cleared = self.store.clear([namespace])
        kept = sorted(name for name, n in cleared.items() if n is None)
        log.warning("lmtier HiCache storage: cleared namespace %s: %s%s", namespace,
                    ", ".join(f"{name} {n}" for name, n in cleared.items() if n is not None) or "nothing",
                    f"; kept in {kept} (lmtier cannot clear them)" if kept else "")

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` for the calls since the last ``get_stats`` (pages, GB/s)."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        out = StorageMetrics()
        for name in ("prefetch_pgs", "backup_pgs", "prefetch_bandwidth", "backup_bandwidth"):
            samples = getattr(self._samples, name)
            while samples:
                getattr(out, name).append(samples.popleft())
        return out

    def close(self) -> None:
        """Flush (bounded) and close the store this instance opened. Idempotent."""
        if self._owns_store:
            self.store.close()

    # -- machinery -----------------------------------------------------------------------------
    def _v1_state(self, op: str) -> tuple[_PageGeometry, str]:
        with self._lock:
            geometry, namespace = self._geometry, self.namespace
        if geometry is None:
            raise InvalidArgumentError(
                f"{op} needs a registered host pool and an instance made with \"interface_v1\": 1 in "
                "--hicache-storage-backend-extra-config")
        return geometry, namespace

    def _pieces(self, geometry: _PageGeometry, keys: Sequence[str], host_indices: torch.Tensor
                ) -> list[list[np.ndarray[Any, Any]]]:
        """Per page, writable uint8 views of its pieces inside the host pool."""
        n, per = len(keys), len(geometry.piece_sizes)
        if len(host_indices) != n * geometry.tokens:
            raise InvalidArgumentError(f"{n} keys need {n * geometry.tokens} host indices "
                                       f"({geometry.tokens} per page), got {len(host_indices)}")
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        if len(ptrs) != n * per or list(sizes) != list(geometry.piece_sizes) * n:
            raise InvalidArgumentError(
                f"the host pool described {len(ptrs)} pieces of sizes {sorted(set(sizes))} for {n} pages; "
                f"registration found {per} per page of {geometry.piece_sizes}")
        return [[_piece(geometry, ptrs[i * per + j], geometry.piece_sizes[j]) for j in range(per)]
                for i in range(n)]

    def _chunk_keys(self, keys: Sequence[str], namespace: str) -> list[ChunkKey]:
        out = []
        for key in keys:
            if not isinstance(key, str):
                raise InvalidArgumentError(f"SGLang page keys are strings, got {type(key).__name__}: {key!r:.80}")
            out.append(ChunkKey(namespace, xxhash.xxh3_128_digest(key.encode())))
        return out

    def _page_tokens(self) -> int:
        pool = getattr(self, "mem_pool_host", None)
        return int(getattr(pool, "page_size", 1) or 1)

    def _count_backup(self, pages: int, nbytes: int, seconds: float) -> None:
        self.store.metrics.stored_tokens.inc(pages * self._page_tokens())
        if self.storage_config.enable_storage_metrics and pages:
            self._samples.backup_pgs.append(pages)
            self._samples.backup_bandwidth.append(nbytes / max(seconds, 1e-9) / 1e9)

    def _count_prefetch(self, pages: int, nbytes: int, seconds: float) -> None:
        self.store.metrics.loaded_tokens.inc(pages * self._page_tokens())
        if self.storage_config.enable_storage_metrics and pages:
            self._samples.prefetch_pgs.append(pages)
            self._samples.prefetch_bandwidth.append(nbytes / max(seconds, 1e-9) / 1e9)

    def _make_namespace(self) -> str:
        c = self.storage_config
        fields: dict[str, Any] = {
            "engine": _ENGINE, "interface": "v1" if self.interface_v1 else "flat",
            "model": c.model_name or "", "salt": self._salt,
            "pp": [c.pp_rank, c.pp_size], "attn_cp": [c.attn_cp_rank, c.attn_cp_size],
            # MLA KV is identical on every TP rank: one copy serves them all
            "tp": None if c.is_mla_model else [c.tp_rank, c.tp_size],
            "dcp": [c.dcp_rank, c.dcp_size, c.logical_page_size] if c.dcp_size > 1 else None,
            "pool": self._pool_fields,
        }
        return make_namespace(**fields)

    def _ranks(self) -> str:
        c = self.storage_config
        tp = "mla" if c.is_mla_model else f"{c.tp_rank}/{c.tp_size}"
        return f"tp {tp}, pp {c.pp_rank}/{c.pp_size}, cp {c.attn_cp_rank}/{c.attn_cp_size}, dp {c.dp_rank}"

    def _warn_if_private(self, cfg: LmtierConfig) -> None:
        c = self.storage_config
        if (c.is_mla_model and c.tp_size > 1 and cfg.server is None
                and all(t.backend in ("cpu", "disk") for t in cfg.tiers)):
            log.warning("lmtier HiCache storage: an MLA model with TP %d stores its KV from one rank only, "
                        "but every tier here is private to a process (cpu, disk): the other ranks will "
                        "never hit. Add a shared tier (redis, s3) or use lmtier serve (server: ...).",
                        c.tp_size)


def _piece(geometry: _PageGeometry, ptr: int, size: int) -> np.ndarray[Any, Any]:
    for region in geometry.regions:
        offset = ptr - region.base
        if offset >= 0 and offset + size <= region.nbytes:
            return region.array[offset:offset + size]
    raise InvalidArgumentError(f"the host pool named a {size}-byte piece at {ptr:#x}, outside its buffers")


def _regions(pool: Any) -> tuple[_Region, ...]:
    """The host pool's CPU tensors, as flat byte arrays to slice pieces from."""
    found: list[torch.Tensor] = []
    for name in ("kv_buffer", "k_buffer", "v_buffer", "index_k_buffer"):
        try:
            value = getattr(pool, name, None)
        except Exception:  # a property that needs state this pool does not have
            continue
        for t in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(t, torch.Tensor) and t.numel() and t.device.type == "cpu" and t.is_contiguous():
                found.append(t)
    regions, seen = [], set()
    for t in found:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        flat = t.detach().reshape(-1).view(torch.uint8)
        regions.append(_Region(t.data_ptr(), flat.numel(), flat.numpy()))
    return tuple(regions)


def _page_geometry(pool: Any, storage_config: HiCacheStorageConfig) -> _PageGeometry:
    """Probe the first and last page of ``pool``; NotSupportedError unless every piece is addressable."""
    name = type(pool).__name__
    layout = getattr(pool, "layout", "?")
    hint = "use --hicache-mem-layout page_first (or page_first_direct)"
    tokens = int(storage_config.logical_page_size if storage_config.dcp_size > 1 else pool.page_size)
    regions = _regions(pool)
    if not regions:
        raise NotSupportedError(f"SGLang's {name} (layout {layout}) has no CPU buffer lmtier can read and "
                                f"write in place (kv_buffer is {type(getattr(pool, 'kv_buffer', None)).__name__}); {hint}")
    pages = int(getattr(pool, "size", tokens)) // tokens
    geometry = None
    for page in sorted({0, max(pages - 1, 0)}):
        indices = torch.arange(page * tokens, (page + 1) * tokens, dtype=torch.int64)
        try:
            ptrs, sizes = pool.get_page_buffer_meta(indices)
        except Exception as exc:
            raise NotSupportedError(f"SGLang's {name} cannot describe its pages for zero-copy storage "
                                    f"(layout {layout}: {type(exc).__name__}: {exc}); {hint}") from None
        if (not ptrs or len(ptrs) != len(sizes)
                or not all(isinstance(p, int) and isinstance(s, int) and s > 0 for p, s in zip(ptrs, sizes, strict=True))):
            raise NotSupportedError(f"SGLang's {name} (layout {layout}) describes a page as {ptrs!r:.60} / "
                                    f"{sizes!r:.60}, not one flat list of (pointer, size) pieces; {hint}")
        piece_sizes = tuple(int(s) for s in sizes)
        if geometry is None:
            geometry = _PageGeometry(tokens, piece_sizes, regions)
        elif piece_sizes != geometry.piece_sizes:
            raise NotSupportedError(f"SGLang's {name} (layout {layout}) describes pages of different shapes "
                                    f"({geometry.piece_sizes} and {piece_sizes}); {hint}")
        try:
            for p, s in zip(ptrs, sizes, strict=True):
                _piece(geometry, p, s)
        except InvalidArgumentError:
            raise NotSupportedError(f"SGLang's {name} (layout {layout}) places page pieces outside the "
                                    f"buffers lmtier can see; {hint}") from None
    assert geometry is not None
    return geometry


def _pool_fields(pool: Any, geometry: _PageGeometry | None) -> dict[str, Any]:
    """What of the pool makes a page's bytes interpretable (enters the namespace)."""
    return {
        "pool": type(pool).__name__,
        "layout": str(getattr(pool, "layout", "")),
        "dtype": str(getattr(pool, "dtype", "")).removeprefix("torch."),
        "page_size": int(getattr(pool, "page_size", 0) or 0),
        "size_per_token": int(getattr(pool, "size_per_token", 0) or 0),
        "layers": [getattr(pool, "start_layer", None), getattr(pool, "end_layer", None),
                   getattr(pool, "layer_num", None)],
        "format_tag": getattr(pool, "storage_format_tag", None),
        "pieces": list(geometry.piece_sizes) if geometry is not None else None,
    }


def _kv_namespace(pool: Any, geometry: _PageGeometry | None, c: HiCacheStorageConfig,
                  namespace: str) -> KVNamespace | None:
    """A page of ``pool`` as a lossy codec sees it: ``layers`` runs of head vectors (MHA: K and V of
    ``head_dim`` / ``v_head_dim`` elements, every layout keeps a head's vector contiguous; MLA: one
    ``kv_cache_dim`` vector per token and layer). None for a pool that does not say (its pages are
    then stored raw by lossy tiers). ``namespace`` (everything that makes the bytes interpretable,
    :meth:`LMTierHiCacheStorage._make_namespace`) rides in ``extra``."""
    import math

    from lmtier.keys import KVNamespace

    layers = int(getattr(pool, "layer_num", 0) or 0)
    dtype = str(getattr(pool, "dtype", "")).removeprefix("torch.")
    if hasattr(pool, "kv_cache_dim"):  # MLA: the latent and its rope part, one vector per token
        heads, head = 1, int(pool.kv_cache_dim)
    elif hasattr(pool, "head_num") and hasattr(pool, "head_dim"):
        heads = int(pool.head_num)
        head = math.gcd(int(pool.head_dim), int(getattr(pool, "v_head_dim", pool.head_dim) or pool.head_dim))
    else:
        return None
    tokens = geometry.tokens if geometry is not None else int(getattr(pool, "page_size", 0) or 0)
    page = (geometry.page_bytes if geometry is not None
            else int(getattr(pool, "size_per_token", 0) or 0) * int(getattr(pool, "page_size", 0) or 0))
    if not layers or not heads or not head or not tokens or page <= 0 or page % layers:
        return None
    return KVNamespace(model=c.model_name or "", kv_layout=f"sglang_{getattr(pool, 'layout', '')}", dtype=dtype,
                       num_layers=layers, block_size=tokens, num_kv_heads=heads, head_size=head,
                       page_bytes=page // layers, chunk_tokens=tokens, engine=_ENGINE,
                       extra=(("sglang_namespace", namespace),))


def _open_store(cfg: LmtierConfig, storage_config: HiCacheStorageConfig, *, namespace: str = "",
                metrics_registry: Any = None) -> KVStore:
    """The KVStore the configuration names: ``lmtier serve`` (``server:``) or this rank's own tiers."""
    tag = _rank_tag(storage_config)
    name = f"lmtier-sglang-{tag}" if tag else "lmtier-sglang"
    if cfg.server is not None:  # lmtier serve holds the tiers; `namespace` and `name` show in its status
        from lmtier.metrics import Metrics
        from lmtier.server.client import ServerStore

        metrics = Metrics(metrics_registry) if metrics_registry is not None else None
        return cast("KVStore", ServerStore.from_config(cfg, metrics=metrics, namespace=namespace, name=name))
    from lmtier.store import LocalStore

    return LocalStore.open(cfg.per_process(tag), metrics_registry=metrics_registry, name=name)


def _rank_tag(c: HiCacheStorageConfig) -> str:
    """A directory suffix unique to this SGLang process among the ones of one deployment."""
    parts = [f"tp{c.tp_rank}"] if c.tp_size > 1 else []
    parts += [f"pp{c.pp_rank}"] if c.pp_size > 1 else []
    parts += [f"cp{c.attn_cp_rank}"] if c.attn_cp_size > 1 else []
    parts += [f"dp{c.dp_rank}"] if c.dp_rank else []
    return "-".join(parts)

