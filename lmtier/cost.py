"""Load only when loading beats recomputing: learned read and prefill costs, and the decision.

A cache hit is not always a win. A chunk on a cold disk, a busy NVMe or a remote tier may take
longer to read than the engine takes to compute it again (an H100 prefills 10,000 tokens of a
Qwen3-8B in ~0.37 s; reading their 1.5 GB of KV from a cold disk at 2.2 GB/s takes ~0.68 s). So
a lookup answers the tokens *worth loading*, from three parts:

* :class:`TierReadEstimator` — one per tier, kept by the manager: the cost of a read,
  ``seconds = calls x latency + bytes / bandwidth``, learned from the tier's real reads (each
  ``get`` / ``get_into`` batch the manager sends it, foreground or background) and optionally
  seeded from the config (``read_bytes_per_s``, ``read_latency_s``).
* :class:`RecomputeEstimator` — one per engine, fed by its integration: the cost of a forward,
  ``seconds = a + b x tokens + c x pairs``, where ``tokens`` counts the tokens computed and
  ``pairs = sum((end**2 - start**2) / 2)`` over the requests' computed spans ``[start, end)``
  (attention work). Recomputing a prefix ``[p, q)`` on top of ``[0, p)`` then costs
  ``b (q - p) + c (q**2 - p**2) / 2``: the per-step overhead ``a`` is paid either way.
* :func:`plan_load` — the decision: among the prefixes of the hit, the one with the largest
  expected saving ``recompute - load x (1 + margin)``, loaded; the rest recomputed (and, by the
  engine, promoted in the background to a faster tier so the next request reads RAM). With no
  estimate yet (a cold start) everything is loaded — today's behaviour — and the load teaches
  the estimators.

**How the fits learn.** Both estimators are weighted least squares with exponential forgetting
(``half_life`` samples): the newest samples count most, so an estimate follows a tier whose speed
changes (a page cache gone cold, a throttled bucket, a busy disk) within a few reads. Samples are
weighted by ``1 / seconds**2`` — timing noise is proportional to the time — so a 30 ms read of one
chunk counts as much as a 700 ms read of forty. Coefficients are non-negative; of the subsets of
terms, the simplest one that fits within :data:`FIT_TOLERANCE` of the best is used (so a single
prompt length gives a per-token cost, not an arbitrary split between tokens and attention, and
reads all of one size give a bandwidth).

Everything here is pure computation and thread-safe; nothing is imported that is not cheap.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "FIT_TOLERANCE",
    "LOAD_POLICIES",
    "SLACK_S",
    "ChunkSpan",
    "LoadPlan",
    "LoadPolicy",
    "ReadCost",
    "RecomputeCost",
    "RecomputeEstimator",
    "TierReadEstimator",
    "plan_load",
]

LoadPolicy = Literal["always", "cost"]
#: ``always``: load every hit (no decision); ``cost``: load what is expected to beat recomputing.
LOAD_POLICIES: tuple[LoadPolicy, ...] = ("always", "cost")
#: A simpler fit (fewer terms) is preferred while its weighted squared error is within this
#: fraction of the samples' total (relative errors of about sqrt(0.005) = 7%).
FIT_TOLERANCE = 0.005
#: Skipping hits is chosen only when it is expected to save more than this (seconds): a near tie
#: loads, since loaded tokens also spare the engine's compute for other requests.
SLACK_S = 0.002
#: Lengths (tokens) at which :meth:`RecomputeCost.tokens_per_s` is exported as a metric.
METRIC_PROMPT_LENGTHS = (256, 1024, 4096, 16384)
_MIN_SECONDS = 1e-6  # samples faster than this are clamped (a lease of RAM, a clock's resolution)


class _ForgettingFit:
    """Non-negative weighted least squares ``y = sum(coef[j] * x[j])`` with exponential forgetting.

    ``candidates`` lists the subsets of terms tried, simplest and most plausible first; the first
    whose error is within :data:`FIT_TOLERANCE` (of the weighted ``sum y**2``) of the best
    feasible subset wins. ``scales`` bring the features near 1 for the solver.
    """

    def __init__(self, scales: Sequence[float], half_life: float, candidates: Sequence[tuple[int, ...]]) -> None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life!r}")
        n = len(scales)
        self._scales = tuple(float(s) for s in scales)
        self._decay = 0.5 ** (1.0 / half_life)
        self._candidates = tuple(candidates)
        self._xx = [[0.0] * n for _ in range(n)]
        self._xy = [0.0] * n
        self._yy = 0.0
        self._coef: tuple[float, ...] | None = None

    def add(self, x: Sequence[float], y: float, weight: float = 1.0) -> None:
        y = max(float(y), _MIN_SECONDS)
        w = weight / (y * y)  # relative errors: a sample's influence does not grow with its size
        xs = [float(v) / s for v, s in zip(x, self._scales, strict=True)]
        d = self._decay
        n = len(xs)
        for i in range(n):
            row = self._xx[i]
            for j in range(n):
                row[j] = row[j] * d + w * xs[i] * xs[j]
            self._xy[i] = self._xy[i] * d + w * xs[i] * y
        self._yy = self._yy * d + w * y * y
        self._coef = None

    def coef(self) -> tuple[float, ...]:
        """The fitted coefficients in the features' own units (zeros before any sample)."""
        if self._coef is None:
            self._coef = self._solve()
        return self._coef

    def _solve(self) -> tuple[float, ...]:
        n = len(self._scales)
        fits: list[tuple[tuple[int, ...], list[float], float]] = []
        for subset in self._candidates:
            c = _solve_normal([[self._xx[i][j] for j in subset] for i in subset], [self._xy[i] for i in subset])
            if c is None or any(v < 0 for v in c):
                continue
            sse = self._yy - 2 * sum(ci * self._xy[i] for ci, i in zip(c, subset, strict=True))
            sse += sum(c[a] * c[b] * self._xx[i][j] for a, i in enumerate(subset) for b, j in enumerate(subset))
            fits.append((subset, c, max(sse, 0.0)))
        out = [0.0] * n
        if not fits:
            return tuple(out)
        best = min(sse for _, _, sse in fits)
        subset, c, _ = next(f for f in fits if f[2] <= best + FIT_TOLERANCE * self._yy)
        for i, v in zip(subset, c, strict=True):
            out[i] = v / self._scales[i]
        return tuple(out)


def _solve_normal(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve the small symmetric system ``a x = b`` (Gaussian elimination); None if singular."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    scale = max((abs(m[i][i]) for i in range(n)), default=0.0)
    if scale <= 0:
        return None
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) <= 1e-12 * scale:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for k in range(col, n + 1):
                    m[r][k] -= f * m[col][k]
    return [m[i][n] / m[i][i] for i in range(n)]


# -- reads ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadCost:
    """A snapshot of a tier's read cost: ``seconds = calls x latency_s + bytes x seconds_per_byte``."""

    latency_s: float
    seconds_per_byte: float
    samples: int = 0

    @property
    def bytes_per_s(self) -> float:
        return 1.0 / self.seconds_per_byte if self.seconds_per_byte > 0 else math.inf

    def seconds(self, nbytes: int, calls: int = 1) -> float:
        return calls * self.latency_s + nbytes * self.seconds_per_byte


class TierReadEstimator:
    """A tier's read cost, learned from its reads (see the module doc). Thread-safe.

    Args:
        half_life: samples after which a sample counts half.
        min_samples: real samples needed before :meth:`cost` answers (a seed answers at once).
        seed_bytes_per_s, seed_latency_s: a prior (from the config), worth ``min_samples`` samples
            and forgotten like any other as real reads arrive.
    """

    def __init__(self, *, half_life: float = 8.0, min_samples: int = 2, seed_bytes_per_s: float | None = None,
                 seed_latency_s: float | None = None) -> None:
        # terms: (per call, per byte); bandwidth alone first, then latency + bandwidth, latency alone
        self._fit = _ForgettingFit((1.0, float(1 << 26)), half_life, [(1,), (0, 1), (0,)])
        self._lock = threading.Lock()
        self._min = max(1, min_samples)
        self.samples = 0
        self._seeded = False
        if seed_bytes_per_s is not None or seed_latency_s is not None:
            self.seed(seed_bytes_per_s, seed_latency_s or 0.0)

    def seed(self, bytes_per_s: float | None, latency_s: float = 0.0) -> None:
        """Add a prior: reads of one call cost ``latency_s`` plus their bytes at ``bytes_per_s``."""
        if bytes_per_s is not None and not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s must be > 0, got {bytes_per_s!r}")
        if not latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s!r}")
        with self._lock:
            per_byte = 1.0 / bytes_per_s if bytes_per_s else 0.0
            for nbytes in (1 << 20, 1 << 26):  # two sizes, so latency and bandwidth are both pinned
                seconds = latency_s + nbytes * per_byte
                if seconds > 0:
                    self._fit.add((1, nbytes), seconds, weight=self._min / 2)
            self._seeded = True

    def observe(self, nbytes: int, seconds: float, calls: int = 1) -> None:
        """A read of ``nbytes`` in ``calls`` calls took ``seconds`` (a miss reads 0 bytes)."""
        if calls < 1 or not seconds >= 0 or nbytes < 0:
            return
        with self._lock:
            self._fit.add((calls, nbytes), seconds)
            self.samples += 1

    @property
    def ready(self) -> bool:
        return self._seeded or self.samples >= self._min

    def cost(self) -> ReadCost | None:
        """The current estimate, or None before enough samples (and no seed)."""
        with self._lock:
            if not self.ready:
                return None
            latency, per_byte = self._fit.coef()
            return ReadCost(latency, per_byte, self.samples)


# -- recomputation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecomputeCost:
    """A snapshot of the engine's prefill cost (see the module doc); ``seconds(p, q)`` to compute
    tokens ``[p, q)`` on top of ``[0, p)``."""

    per_token_s: float
    per_pair_s: float
    step_s: float = 0.0
    samples: int = 0

    def seconds(self, start: int, end: int) -> float:
        if end <= start:
            return 0.0
        return self.per_token_s * (end - start) + self.per_pair_s * (end * end - start * start) / 2

    def tokens_per_s(self, prompt_tokens: int) -> float:
        """Prefill speed of a whole prompt of ``prompt_tokens`` tokens (without the step overhead)."""
        t = self.seconds(0, prompt_tokens)
        return prompt_tokens / t if t > 0 else math.inf


class RecomputeEstimator:
    """The engine's prefill cost, learned from its forwards (see the module doc). Thread-safe.

    Integrations call :meth:`observe` after each forward that computed prompt tokens (and loaded
    nothing: a forward that waited for a load measures the load, not the compute).

    Args:
        half_life: samples after which a sample counts half.
        min_samples: samples needed before :meth:`cost` answers (a seed answers at once).
        seed_tokens_per_s: a prior (from the config): a per-token cost, worth ``min_samples``.
    """

    def __init__(self, *, half_life: float = 16.0, min_samples: int = 1,
                 seed_tokens_per_s: float | None = None) -> None:
        # terms: (per step, per token, per attention pair); per token alone is the simplest
        self._fit = _ForgettingFit((1.0, 1024.0, 1024.0 * 1024.0), half_life,
                                   [(1,), (0, 1), (1, 2), (0, 1, 2), (2,), (0, 2), (0,)])
        self._lock = threading.Lock()
        self._min = max(1, min_samples)
        self.samples = 0
        self._seeded = False
        if seed_tokens_per_s is not None:
            self.seed(seed_tokens_per_s)

    def seed(self, tokens_per_s: float) -> None:
        if not tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be > 0, got {tokens_per_s!r}")
        with self._lock:
            for n in (512, 4096):
                self._fit.add((1, n, n * n / 2), n / tokens_per_s, weight=self._min / 2)
            self._seeded = True

    def observe(self, spans: Sequence[tuple[int, int]], seconds: float) -> None:
        """A forward computed tokens ``[start, end)`` of each request in ``spans`` in ``seconds``."""
        tokens = pairs = 0.0
        for start, end in spans:
            if end > start >= 0:
                tokens += end - start
                pairs += (end * end - start * start) / 2
        if tokens <= 0 or not seconds > 0:
            return
        with self._lock:
            self._fit.add((1, tokens, pairs), seconds)
            self.samples += 1

    @property
    def ready(self) -> bool:
        return self._seeded or self.samples >= self._min

    def cost(self) -> RecomputeCost | None:
        with self._lock:
            if not self.ready:
                return None
            step, per_token, per_pair = self._fit.coef()
            return RecomputeCost(per_token, per_pair, step, self.samples)


# -- the decision --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkSpan:
    """One chunk of a hit, in prompt order: tokens ``[start, end)``, its stored bytes, its tier."""

    start: int
    end: int
    nbytes: int
    tier: str | None


@dataclass(frozen=True)
class LoadPlan:
    """What to load of a hit, and why.

    Attributes:
        hit_tokens: the hit (end of the last hit chunk).
        load_tokens: the end of the prefix worth loading (``<= hit_tokens``); chunks after it are
            recomputed.
        load_chunks: how many leading chunks that is.
        reason: why, for the log line, e.g. ``disk ~680 ms > recompute ~360 ms``.
        decided: False when no decision was made (``always``, or a cold start).
    """

    hit_tokens: int
    load_tokens: int
    load_chunks: int
    reason: str
    decided: bool = True

    @property
    def skipped_tokens(self) -> int:
        return self.hit_tokens - self.load_tokens


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"~{ms:.0f} ms" if ms >= 10 else f"~{ms:.1g} ms" if ms >= 0.1 else "~0 ms"


def plan_load(chunks: Sequence[ChunkSpan], *, policy: LoadPolicy, margin: float,
              reads: Mapping[str, ReadCost | None], recompute: RecomputeCost | None,
              start: int = 0, slice_bytes: int = 64 << 20, onload: ReadCost | None = None,
              onload_exposed: float = 1.0) -> LoadPlan:
    """Decide how much of a hit to load.

    Args:
        chunks: the hit chunks, leading first (contiguous from token 0).
        policy: ``always`` loads everything; ``cost`` decides.
        margin: loading must be expected this much faster than recomputing (0.1: 10%).
        reads: each tier's read cost (None or absent: not known yet).
        recompute: the engine's prefill cost (None: not known yet).
        start: tokens the engine has already (its own prefix cache): neither loaded nor recomputed.
        slice_bytes: the most bytes per read call (the manager's slicing).
        onload: the cost of copying loaded bytes into the engine's KV cache (host to device),
            if known; ``onload_exposed`` is the part of it not hidden behind compute (layer-wise
            overlap: about ``1 / num_layers``).

    Returns the plan; the chosen prefix maximises ``recompute - load x (1 + margin)`` (the
    expected saving, 0 for loading nothing), preferring the longer prefix within :data:`SLACK_S`.
    """
    todo = [c for c in chunks if c.end > start]
    hit = chunks[-1].end if chunks else 0
    if not todo:
        return LoadPlan(hit, hit, len(chunks), "nothing to load", decided=False)
    if policy == "always":
        return LoadPlan(hit, hit, len(chunks), "load_policy: always", decided=False)
    unknown = sorted({c.tier or "?" for c in todo if c.tier is None or reads.get(c.tier) is None})
    if recompute is None or unknown:
        what = "recompute" if recompute is None else "+".join(unknown)
        return LoadPlan(hit, hit, len(chunks), f"no estimate of {what} yet: loading to learn", decided=False)
    skipped_before = len(chunks) - len(todo)
    per_tier_bytes: dict[str, int] = {}
    load = [0.0]  # load[k]: expected seconds to load the first k chunks of todo
    for c in todo:
        assert c.tier is not None
        per_tier_bytes[c.tier] = per_tier_bytes.get(c.tier, 0) + c.nbytes
        total = 0.0
        for tier, nbytes in per_tier_bytes.items():
            cost = reads[tier]
            assert cost is not None
            total += cost.seconds(nbytes, max(1, -(-nbytes // slice_bytes)))
        if onload is not None:
            total += onload_exposed * onload.seconds(sum(per_tier_bytes.values()))
        load.append(total)
    best_k, best_gain = 0, 0.0
    for k in range(1, len(todo) + 1):
        gain = recompute.seconds(start, todo[k - 1].end) - load[k] * (1 + margin)
        if gain > best_gain - SLACK_S:
            best_k, best_gain = k, max(gain, best_gain)
    end = todo[best_k - 1].end if best_k else min(start, hit)
    n = skipped_before + best_k
    if best_k == len(todo):
        tiers = "+".join(dict.fromkeys(c.tier or "?" for c in todo))
        redo = recompute.seconds(start, hit)
        if load[-1] * (1 + margin) <= redo:
            return LoadPlan(hit, hit, n, f"{tiers} {_ms(load[-1])} < recompute {_ms(redo)}")
        return LoadPlan(hit, hit, n, f"{tiers} {_ms(load[-1])} vs recompute {_ms(redo)}: a near tie loads")
    rest = todo[best_k:]
    tiers = "+".join(dict.fromkeys(c.tier or "?" for c in rest))
    rest_load = load[-1] - load[best_k]
    reason = f"{tiers} {_ms(rest_load)} > recompute {_ms(recompute.seconds(max(start, end), hit))}"
    if best_k:
        reason += f" for the last {hit - end} tokens"
    return LoadPlan(hit, max(end, 0), n, reason)
