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
  ``seconds = b x tokens + c x pairs``, where ``tokens`` counts the tokens computed and
  ``pairs = sum((end**2 - start**2) / 2)`` over the requests' computed spans ``[start, end)``
  (attention work). Recomputing a prefix ``[p, q)`` on top of ``[0, p)`` then costs
  ``b (q - p) + c (q**2 - p**2) / 2``. There is no per-step term: a step's fixed overhead is
  folded into the per-token cost (so short prefixes look a little dearer to recompute than they
  are, which errs towards loading), because a fit free to explain time by a constant explains
  too much of it by one on a busy machine (measured on a 2-core host under load: 0.3k to 2k-token
  prefills all took ~0.45 s, and a fitted constant made recomputing look free).
* :func:`plan_load` — the decision: among the prefixes of the hit, the one with the largest
  expected saving ``recompute - load x (1 + margin)``, loaded; the rest recomputed (and, by the
  engine, promoted in the background to a faster tier so the next request reads RAM). With no
  estimate yet (a cold start) everything is loaded — today's behaviour — and the load teaches
  the estimators.

**Prefills are believed at their fastest.** The prefill fit is then scaled down to the faster
forwards of its window (:data:`FAST_QUANTILE`): the same shape of forward costs the same arithmetic,
so a slow one was held up by something else. Measured on an H100 (``benchmarks/ttft_gpu.py``):
the one full prefill a fresh engine had timed took 0.82 s (12k tok/s; what held it up is not
established: host memory was nearly exhausted by then) where the others took 0.36 s, and a 1.47 GB cold-disk hit (0.65 s) was
loaded for 0.52x of the full prefill's TTFT.

**How the fits learn.** Both estimators are weighted least squares over a window of the latest
samples (a tier is judged by its last 8 reads, the prefill by the last 16 forwards), so an
estimate follows a tier whose speed changes (a page cache gone cold, a throttled bucket, a busy
disk) within a window. Errors count relative to each sample's size: a read of one chunk counts as
much as a read of forty, and among reads of one size the fit averages *times*, not speeds. That
is deliberately cautious: one read ten times slower among fast ones doubles the expected time at
once, while a tier that turned fast is believed only once most of the window says so — loading
from a tier slower than believed can double a request's TTFT, while recomputing what could have
loaded costs at most the prefill it would have cost without a cache.
Coefficients are non-negative; of the subsets of terms, the simplest one that fits within
:data:`FIT_TOLERANCE` of the best is used (so a single prompt length gives a per-token cost, not
an arbitrary split between tokens and attention, and reads all of one size give a bandwidth).

Everything here is pure computation and thread-safe; nothing is imported that is not cheap.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAST_QUANTILE",
    "FIT_TOLERANCE",
    "LOAD_POLICIES",
    "METRIC_PROMPT_LENGTHS",
    "MIN_TIMED_PROMPT_TOKENS",
    "SLACK_S",
    "ChunkSpan",
    "ForwardClock",
    "LoadPlan",
    "LoadPolicy",
    "OnloadEstimator",
    "ReadCost",
    "RecomputeCost",
    "RecomputeEstimator",
    "SupportsReadCosts",
    "TierReadEstimator",
    "plan_load",
    "teaches_prefill",
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
#: The prefill estimate follows this quantile of the window's forwards, fastest first (0.25: with
#: 16 forwards the 4th fastest relative to the fit; with 1 or 2, the fastest). A forward's cost is
#: the model's arithmetic, so one slower than that was held up (host memory under pressure, a
#: garbage collection, a copy sharing the GPU) and says little about the
#: next; believing it makes loading from a tier slower than the real prefill look worth it, which
#: is the expensive mistake (see the module doc). A quartile, not the minimum, so a forward timed
#: too fast by a glitch does not make recomputing look free.
FAST_QUANTILE = 0.25
#: The prompt tokens a forward must compute (summed over its requests, decode steps left out) for
#: its time to teach the prefill estimate (:func:`teaches_prefill`). A shorter one — a few tokens
#: over a long cached context, after a hit in the engine's own prefix cache — is mostly the
#: forward's fixed cost (weights, launches), which the prefill model (no per-forward term) would
#: charge to attention: 8 forwards of 16 tokens over 9,984 at 34 ms next to 2 full 10,000-token
#: prefills at 0.365 s make the estimate 10.6 s, and every hit would be loaded.
MIN_TIMED_PROMPT_TOKENS = 256
#: Lengths (tokens) at which :meth:`RecomputeCost.tokens_per_s` is exported as a metric.
METRIC_PROMPT_LENGTHS = (256, 1024, 4096, 16384)
_MIN_SECONDS = 1e-6  # samples faster than this are clamped (a lease of RAM, a clock's resolution)


class _WindowFit:
    """Non-negative weighted least squares ``y = sum(coef[j] * x[j])`` over the last ``size`` samples.

    ``candidates`` lists the subsets of terms tried, simplest and most plausible first; the first
    whose error is within :data:`FIT_TOLERANCE` (of the weighted ``sum y**2``) of the best
    feasible subset wins. ``scales`` bring the features near 1 for the solver.

    Errors count relative to each sample's size, in two passes: first relative to the sample's own
    time, then relative to what that first fit predicts for it. Among samples of one size the
    second pass averages their times (a slow one weighs as its time says), and samples of other
    sizes count alike (one big read does not drown many small ones).
    """

    def __init__(self, scales: Sequence[float], size: int, candidates: Sequence[tuple[int, ...]]) -> None:
        if size < 1:
            raise ValueError(f"the window must hold at least one sample, got {size!r}")
        self._scales = tuple(float(s) for s in scales)
        self._candidates = tuple(candidates)
        self._samples: deque[tuple[tuple[float, ...], float, float]] = deque(maxlen=size)
        self._coef: tuple[float, ...] | None = None

    def add(self, x: Sequence[float], y: float, weight: float = 1.0) -> None:
        xs = tuple(float(v) / s for v, s in zip(x, self._scales, strict=True))
        self._samples.append((xs, max(float(y), _MIN_SECONDS), weight))
        self._coef = None

    def coef(self) -> tuple[float, ...]:
        """The fitted coefficients in the features' own units (zeros before any sample)."""
        if self._coef is None:
            first = self._solve([w / (y * y) for _, y, w in self._samples])
            expected = [max(sum(c * v for c, v in zip(first, xs, strict=True)), _MIN_SECONDS)
                        for xs, _, _ in self._samples]
            scaled = self._solve([w / (e * e) for (_, _, w), e in zip(self._samples, expected, strict=True)])
            self._coef = tuple(c / s for c, s in zip(scaled, self._scales, strict=True))
        return self._coef

    def speed_quantile(self, q: float) -> float:
        """The ``q`` quantile (0: the fastest) of the samples' observed / fitted times: the factor
        that brings the fit to the faster samples of the window (1 before any sample)."""
        coef = self.coef()
        ratios = sorted(y / max(sum(c * v * s for c, v, s in zip(coef, xs, self._scales, strict=True)), _MIN_SECONDS)
                        for xs, y, _ in self._samples)
        if not ratios:
            return 1.0
        return ratios[int(q * (len(ratios) - 1))]

    def _solve(self, weights: list[float]) -> tuple[float, ...]:
        n = len(self._scales)
        xx = [[0.0] * n for _ in range(n)]
        xy = [0.0] * n
        yy = 0.0
        for (xs, y, _), w in zip(self._samples, weights, strict=True):
            for i in range(n):
                for j in range(n):
                    xx[i][j] += w * xs[i] * xs[j]
                xy[i] += w * xs[i] * y
            yy += w * y * y
        fits: list[tuple[tuple[int, ...], list[float], float]] = []
        for subset in self._candidates:
            c = _solve_normal([[xx[i][j] for j in subset] for i in subset], [xy[i] for i in subset])
            if c is None or any(v < 0 for v in c):
                continue
            sse = yy - 2 * sum(ci * xy[i] for ci, i in zip(c, subset, strict=True))
            sse += sum(c[a] * c[b] * xx[i][j] for a, i in enumerate(subset) for b, j in enumerate(subset))
            fits.append((subset, c, max(sse, 0.0)))
        out = [0.0] * n
        if not fits:
            return tuple(out)
        best = min(sse for _, _, sse in fits)
        subset, c, _ = next(f for f in fits if f[2] <= best + FIT_TOLERANCE * yy)
        for i, v in zip(subset, c, strict=True):
            out[i] = v
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
        window: the reads an estimate is made of (the latest).
        min_samples: real samples needed before :meth:`cost` answers (a seed answers at once).
        seed_bytes_per_s, seed_latency_s: a prior (from the config): two samples in the window,
            pushed out by real reads like any other.
    """

    def __init__(self, *, window: int = 8, min_samples: int = 1, seed_bytes_per_s: float | None = None,
                 seed_latency_s: float | None = None) -> None:
        # terms: (per call, per byte); bandwidth alone first, then latency + bandwidth (never latency
        # alone: a read always moves its bytes, and an infinite bandwidth would say it does not)
        self._fit = _WindowFit((1.0, float(1 << 26)), window, [(1,), (0, 1)])
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
                    self._fit.add((1, nbytes), seconds)
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


class OnloadEstimator:
    """The cost of copying loaded bytes from host memory into the engine's KV cache (the onload),
    learned from the engine's onloads. Thread-safe.

    A copy's speed is the memory system's: a slower sample means the host was busy (the copying
    thread descheduled, the link shared), not that copies got dearer. So the estimate is the
    fastest of the latest ``window`` onloads, a bandwidth only: one stalled copy must not make
    RAM hits look slow, since a hit that is not loaded is not copied either and could not correct
    the estimate.
    """

    def __init__(self, *, window: int = 16) -> None:
        self._per_byte: deque[float] = deque(maxlen=max(1, window))
        self._lock = threading.Lock()
        self.samples = 0

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or not seconds > 0:
            return
        with self._lock:
            self._per_byte.append(seconds / nbytes)
            self.samples += 1

    def cost(self) -> ReadCost | None:
        """The current estimate (no per-call latency), or None before the first onload."""
        with self._lock:
            if not self._per_byte:
                return None
            return ReadCost(0.0, min(self._per_byte), self.samples)


@runtime_checkable
class SupportsReadCosts(Protocol):
    """Optional for a :class:`~lmtier.store.KVStore`: the learned read cost of each of its tiers.

    The engine weighs a hit only when its store implements this (a store that does not is
    loaded from whatever it costs, as with ``load_policy: always``).
    """

    def read_costs(self) -> Mapping[str, ReadCost | None]:
        """Tier name -> its current read cost, None while not known; callable from any thread."""
        ...


# -- recomputation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecomputeCost:
    """A snapshot of the engine's prefill cost (see the module doc); ``seconds(p, q)`` to compute
    tokens ``[p, q)`` on top of ``[0, p)``."""

    per_token_s: float
    per_pair_s: float
    samples: int = 0

    def seconds(self, start: int, end: int) -> float:
        if end <= start:
            return 0.0
        return self.per_token_s * (end - start) + self.per_pair_s * (end * end - start * start) / 2

    def tokens_per_s(self, prompt_tokens: int) -> float:
        """Prefill speed of a whole prompt of ``prompt_tokens`` tokens."""
        t = self.seconds(0, prompt_tokens)
        return prompt_tokens / t if t > 0 else math.inf


class RecomputeEstimator:
    """The engine's prefill cost, learned from its forwards (see the module doc). Thread-safe.

    Integrations call :meth:`observe` after each forward that computed prompt tokens (and loaded
    nothing: a forward that waited for a load measures the load, not the compute).

    Args:
        window: the forwards an estimate is made of (the latest).
        min_samples: samples needed before :meth:`cost` answers (a seed answers at once).
        seed_tokens_per_s: a prior (from the config): a per-token cost, two samples in the window.
    """

    def __init__(self, *, window: int = 16, min_samples: int = 1,
                 seed_tokens_per_s: float | None = None) -> None:
        # terms: (per token, per attention pair); per token alone is the simplest
        self._fit = _WindowFit((1024.0, 1024.0 * 1024.0), window, [(0,), (0, 1), (1,)])
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
                self._fit.add((n, n * n / 2), n / tokens_per_s)
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
            self._fit.add((tokens, pairs), seconds)
            self.samples += 1

    @property
    def ready(self) -> bool:
        return self._seeded or self.samples >= self._min

    def cost(self) -> RecomputeCost | None:
        """The current estimate: the fit, scaled down to the faster forwards of the window (see
        :data:`FAST_QUANTILE`), or None before enough samples (and no seed)."""
        with self._lock:
            if not self.ready:
                return None
            per_token, per_pair = self._fit.coef()
            scale = self._fit.speed_quantile(FAST_QUANTILE)
            return RecomputeCost(per_token * scale, per_pair * scale, self.samples)


def teaches_prefill(spans: Sequence[tuple[int, int]]) -> bool:
    """Whether a forward computing tokens ``[start, end)`` of each request in ``spans`` should be
    timed for the prefill estimate: it computes at least :data:`MIN_TIMED_PROMPT_TOKENS` prompt
    tokens (spans of one token, decode steps, do not count)."""
    return sum(e - s for s, e in spans if e - s > 1) >= MIN_TIMED_PROMPT_TOKENS


class ForwardClock:
    """Times an engine's forwards for :meth:`RecomputeEstimator.observe`, without ever waiting.

    ``start(spans)`` before a forward, ``stop()`` after it, ``finished()`` later for the timed
    forwards that have completed. On CPU the forward has run when ``stop`` is called: wall
    clock. On CUDA it may only be enqueued: two events on the device's current stream, read once
    the second has completed (a later ``finished``), so timing never synchronises the GPU. Used by
    one thread (the engine's).
    """

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._device = device
        self._open: tuple[list[tuple[int, int]], Any] | None = None
        self._pending: list[tuple[list[tuple[int, int]], Any, Any]] = []

    def start(self, spans: Sequence[tuple[int, int]]) -> None:
        self._open = (list(spans), self._now())

    def stop(self) -> None:
        if self._open is None:
            return
        spans, begin = self._open
        self._open = None
        self._pending.append((spans, begin, self._now()))
        del self._pending[:-8]  # an idle GPU never leaves more; a stuck one must not grow this

    def finished(self) -> list[tuple[list[tuple[int, int]], float]]:
        """The timed forwards completed since the last call: ``(spans, seconds)``."""
        out, keep = [], []
        for spans, begin, end in self._pending:
            if not self._cuda:
                out.append((spans, end - begin))
            elif end.query():
                out.append((spans, begin.elapsed_time(end) / 1e3))
            else:
                keep.append((spans, begin, end))
        self._pending = keep
        return out

    def _now(self) -> Any:
        if not self._cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event


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
