"""Prometheus metrics: one :class:`Metrics` object per registry, labelled by tier.

Managers built without an explicit registry share :func:`default_metrics` (on prometheus_client's
global ``REGISTRY``, which is what vLLM's ``/metrics`` and ``lmtier serve-metrics`` expose), so
two managers in one process never collide on metric names. Tests pass their own
``CollectorRegistry`` to read exact values.

Backend-reported gauges (objects, bytes, corrupt entries, ...) are read from each backend's
``stats()`` at scrape time by one collector, so backends need no metrics code of their own.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics", "default_metrics"]

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every lmtier metric, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.hits = Counter("lmtier_tier_hits", "Chunks found in a tier by get", ["tier"], registry=r)
        self.misses = Counter("lmtier_tier_misses", "Chunks asked of a tier and not found", ["tier"], registry=r)
        self.bytes_read = Counter("lmtier_tier_read_bytes", "Payload bytes returned by a tier", ["tier"], registry=r)
        self.bytes_written = Counter("lmtier_tier_written_bytes", "Payload bytes stored into a tier", ["tier"], registry=r)
        self.objects_written = Counter("lmtier_tier_written_objects", "Chunks stored into a tier", ["tier"], registry=r)
        self.errors = Counter("lmtier_tier_errors", "Failed tier calls by operation and error kind",
                              ["tier", "op", "kind"], registry=r)
        self.skipped_writes = Counter("lmtier_tier_skipped_writes",
                                      "Chunks not written to a tier (fault, full, queue full, circuit open)",
                                      ["tier", "reason"], registry=r)
        self.evictions = Counter("lmtier_tier_evictions", "Chunks evicted from a tier", ["tier"], registry=r)
        self.demotions = Counter("lmtier_tier_demotions", "Evicted chunks written to the next tier", ["tier"], registry=r)
        self.promotions = Counter("lmtier_tier_promotions", "Chunks copied into a hotter tier on a hit", ["tier"], registry=r)
        self.latency = Histogram("lmtier_tier_latency_seconds", "Latency of tier calls", ["tier", "op"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.deadline_misses = Counter("lmtier_tier_deadline_misses",
                                       "Tier calls that had not answered by their deadline (a miss / skipped write)",
                                       ["tier", "op"], registry=r)
        self.detached_calls = Gauge("lmtier_tier_detached_calls",
                                    "Tier calls past their deadline still running in the background", ["tier"],
                                    registry=r)
        self.abandoned_calls = Counter("lmtier_tier_abandoned_calls",
                                       "Tier calls still running when a close's budget ran out: left to end in "
                                       "the background (the tier is closed and their buffers go back then)",
                                       ["tier"], registry=r)
        self.per_key_retries = Counter("lmtier_tier_per_key_retries",
                                       "Keys asked again one by one after their batch call failed on the tier's "
                                       "answer (one key's fault costs that key only)", ["tier", "op"], registry=r)
        self.circuit_open = Gauge("lmtier_tier_circuit_open", "1 while a tier's circuit breaker is open",
                                  ["tier"], registry=r)
        self.tier_up = Gauge("lmtier_tier_up", "1 while a tier is open; 0 while it is down (its service was "
                             "unreachable at start) and being re-opened in the background", ["tier"], registry=r)
        self.queue_depth = Gauge("lmtier_tier_queue_depth", "Background writes queued for a tier", ["tier"], registry=r)
        self.codec_raw_bytes = Counter("lmtier_codec_raw_bytes", "Bytes of values a tier's codec encoded (before)",
                                       ["tier", "codec"], registry=r)
        self.codec_stored_bytes = Counter("lmtier_codec_stored_bytes", "Bytes a tier's codec produced (after)",
                                          ["tier", "codec"], registry=r)
        self.codec_raw_values = Counter("lmtier_codec_raw_values",
                                        "Values a codec tier stored raw, by reason (namespace, incompressible, error)",
                                        ["tier", "reason"], registry=r)
        self.codec_seconds = Histogram("lmtier_codec_seconds", "Time to encode or decode one value (worker thread)",
                                       ["tier", "op"], registry=r,
                                       buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.codec_unknown = Counter("lmtier_codec_unknown_values",
                                     "Values read with a codec id this process cannot decode (misses left in place)",
                                     ["tier"], registry=r)
        self.codec_foreign_values = Counter(
            "lmtier_codec_foreign_values",
            "Encoded values read from a tier configured without a codec (another process's), decoded",
            ["tier"], registry=r)
        self.lookup_chunks = Counter("lmtier_lookup_chunks", "Chunks asked of lookup", registry=r)
        self.lookup_hit_chunks = Counter("lmtier_lookup_hit_chunks", "Leading chunks found by lookup", registry=r)
        # engine-level (KVCacheEngine / connectors)
        self.requested_tokens = Counter("lmtier_requested_tokens", "Prompt tokens looked up", registry=r)
        self.hit_tokens = Counter("lmtier_hit_tokens", "Prompt tokens found in lmtier", registry=r)
        self.loaded_tokens = Counter("lmtier_loaded_tokens", "Tokens whose KV was loaded to the engine", registry=r)
        self.stored_tokens = Counter("lmtier_stored_tokens", "Tokens whose KV was stored", registry=r)
        self.hit_ratio = Gauge("lmtier_hit_ratio", "hit_tokens / requested_tokens since start", registry=r)
        # load decisions (lmtier.cost): what is learned, and what was decided
        self.read_bytes_per_s = Gauge("lmtier_tier_read_bytes_per_second",
                                      "Learned read bandwidth of a tier (from its recent reads)", ["tier"],
                                      registry=r)
        self.read_call_seconds = Gauge("lmtier_tier_read_call_seconds",
                                       "Learned per-call latency of a tier's reads", ["tier"], registry=r)
        self.recompute_tokens_per_s = Gauge("lmtier_recompute_tokens_per_second",
                                            "Learned prefill speed of the engine for a prompt of this length",
                                            ["prompt_tokens"], registry=r)
        self.onload_bytes_per_s = Gauge("lmtier_onload_bytes_per_second",
                                        "Learned speed of copying loaded KV from host memory into the engine's "
                                        "cache (the onload)", registry=r)
        self.load_decisions = Counter("lmtier_load_decisions",
                                      "Lookups by what the load policy decided (all, part, none: weighed; "
                                      "unweighed: no estimate yet or load_policy always)", ["outcome"],
                                      registry=r)
        self.skipped_tokens = Counter("lmtier_skipped_tokens",
                                      "Hit tokens not loaded because recomputing them was expected to be faster",
                                      registry=r)
        self._stats = _StatsCollector()
        r.register(self._stats)

    def declare_tier(self, tier: str) -> None:
        """Export ``tier``'s per-tier counters at 0 from the start, so a dashboard or an alert on
        ``rate(lmtier_tier_evictions_total[5m])`` sees a series before the first eviction (a
        labelled counter is otherwise absent until first incremented)."""
        for counter in (self.hits, self.misses, self.bytes_read, self.bytes_written, self.objects_written,
                        self.evictions, self.demotions, self.promotions):
            counter.labels(tier)
        self.circuit_open.labels(tier).set(0)
        self.tier_up.labels(tier).set(1)

    def add_stats_source(self, tier: str, stats: Callable[[], dict[str, Any]]) -> None:
        """Export ``stats()`` numbers as ``lmtier_backend_<name>{tier=...}`` gauges at scrape time."""
        self._stats.add(tier, stats)

    def remove_stats_source(self, tier: str, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats.remove(tier, stats)

    def observe_hit_ratio(self) -> None:
        requested = self.requested_tokens._value.get()
        if requested:
            self.hit_ratio.set(self.hit_tokens._value.get() / requested)


class _StatsCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[tuple[str, Any]] = []

    def add(self, tier: str, stats: Callable[[], dict[str, Any]]) -> None:
        ref = weakref.WeakMethod(stats) if hasattr(stats, "__self__") else (lambda: stats)
        with self._lock:
            self._sources.append((tier, ref))

    def remove(self, tier: str, stats: Callable[[], dict[str, Any]]) -> None:
        with self._lock:
            self._sources = [(t, r) for t, r in self._sources if not (t == tier and r() == stats)]

    def describe(self) -> list[Any]:
        return []  # names depend on the backends; nothing to check at registration

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        with self._lock:
            sources = list(self._sources)
        for tier, ref in sources:
            fn = ref()
            if fn is None:
                continue
            try:
                values = fn()
            except Exception:  # a scrape must never fail because one backend's stats did
                continue
            for key, value in values.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                name = f"lmtier_backend_{key}"
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = GaugeMetricFamily(name, f"backend stat {key!r}", labels=["tier"])
                fam.add_metric([tier], float(value))
        yield from families.values()


@functools.cache
def default_metrics() -> Metrics:
    """The process-wide metrics on prometheus_client's global REGISTRY (created on first use)."""
    return Metrics(REGISTRY)
