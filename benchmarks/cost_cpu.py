"""TTFT of a real vLLM engine (CPU) when the tier holding the hit is slower than recomputing it.

The tiny Llama of ``lmtier demo`` (preset ``demo``), vLLM in-process with its own prefix cache
off. lmtier's tiers: a RAM tier over a **slow** tier (a disk tier wrapped by the test throttle,
``tests/support/throttle.py``: reads answer at ``--rate`` MB/s, changeable mid-run). Each timed
request asks for a prompt whose chunks are only in the slow tier (the RAM tier is cleared before
it), so the request either loads from the slow tier or recomputes. Four modes:

* ``cost, throttled``: ``load_policy: cost`` (the default) with the slow tier throttled: lmtier
  sees that loading would be slower than recomputing and loads nothing (goal: TTFT <= 1.05x of
  vLLM without lmtier); the chunks are promoted to RAM in the background;
* ``always, throttled``: ``load_policy: always``, the behaviour before the decision: every hit is
  loaded, whatever it costs;
* ``cost, unthrottled`` and ``always, unthrottled``: the throttle lifted: loading wins again, and
  ``cost`` must keep that win.

**Pairs.** vLLM without lmtier runs in a child process for the whole run (two engines cannot
share one process); every timed lmtier request is paired with one of the same prompt on it,
right before or after it (the order alternates), and a ratio is the median of those pairs'
ratios, so a drift of this shared machine hits both sides alike. **Rounds** take turns: each
starts a fresh lmtier engine (RAM empty, estimates unlearned; the first round stores the prompts,
later engines find them in the slow tier) and runs every mode; the table gives each mode's ratio
per round and their median. Before each ``cost`` mode, ``--teach`` untimed requests (default 8:
a tier is judged by its last 8 reads) teach the estimate the tier's current speed (the cold start
loads everything to learn; later each skipped request's promotion is a read); what each of them
loaded is printed, which shows how many requests a change of speed takes to flip the decision.
TTFT is the wall time of ``LLM.generate`` of one prompt with ``max_tokens=1``. The load average
is printed per round. Nothing is asserted.

    python benchmarks/cost_cpu.py [--tokens 2048] [--prompts 4] [--rounds 3] [--rate 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import fmt_ratio, fmt_seconds, machine_line, median, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, from a checkout

_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
}
Mode = tuple[str, bool]
MODES: tuple[Mode, ...] = (("cost", True), ("always", True), ("cost", False), ("always", False))


def _label(mode: Mode) -> str:
    return f"{mode[0]}, {'throttled' if mode[1] else 'unthrottled'}"


class _Engine:
    """One in-process vLLM engine (with or without lmtier) timing single-prompt TTFTs."""

    def __init__(self, model: str, max_len: int, lmtier: dict[str, Any] | None) -> None:
        from vllm import LLM, SamplingParams
        from vllm.config import KVTransferConfig

        kwargs: dict[str, Any] = {}
        if lmtier is not None:
            kwargs["kv_transfer_config"] = KVTransferConfig(
                kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
                kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=lmtier)
        self.llm = LLM(model=model, dtype="bfloat16", max_model_len=max_len, seed=0, enforce_eager=True,
                       enable_prefix_caching=False, disable_log_stats=True, use_tqdm_on_load=False, **kwargs)
        self.params = SamplingParams(max_tokens=1, temperature=0.0)

    def ttft(self, prompt: list[int]) -> tuple[float, int]:
        """Seconds to the first token, and the prompt tokens vLLM did not prefill."""
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=prompt)], self.params, use_tqdm=False)
        return time.perf_counter() - t0, int(out.num_cached_tokens or 0)

    @property
    def kv(self) -> Any:
        """The worker's lmtier KVCacheEngine (in-process)."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        return get_kv_transfer_group().engine  # type: ignore[attr-defined]

    def on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.kv.kvstore.loop).result()

    def clear_ram(self) -> None:
        """Wait for stores and promotions, then empty the RAM tier: the prompts are in the slow tier only."""
        self.kv.flush()
        self.on_loop(self.kv.manager.tier("hot").backend.clear())

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


def _baseline_main(conn: Any, model: str, max_len: int) -> None:
    """The child process: vLLM without lmtier, answering each prompt sent with its TTFT."""
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    eng = _Engine(model, max_len, None)
    conn.send("ready")
    try:
        while (prompt := conn.recv()) is not None:
            conn.send(eng.ttft(prompt)[0])
    finally:
        eng.close()


class _Baseline:
    """vLLM without lmtier in a child process (spawned: vLLM's state is per process)."""

    def __init__(self, model: str, max_len: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_baseline_main, args=(child, model, max_len), daemon=True)
        self._proc.start()
        child.close()
        if self._conn.recv() != "ready":
            raise RuntimeError("the baseline engine did not start")

    def ttft(self, prompt: list[int]) -> float:
        self._conn.send(prompt)
        return float(self._conn.recv())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} / {five:.1f} (1 / 5 min) on {os.cpu_count()} CPUs"


def run(args: argparse.Namespace, root: Path) -> None:
    from lmtier.demo import TINY_PRESETS, build_tiny_llama
    from tests.support.throttle import install_entry_point

    site = root / "site"
    install_entry_point(site)
    sys.path.insert(0, str(site))  # the throttled backend, found by the worker's registry discovery
    spec = TINY_PRESETS[args.preset]
    model = str(build_tiny_llama(spec))
    n = args.tokens
    rng = random.Random(20261207)

    def prompt() -> list[int]:
        return [rng.randrange(3, spec.vocab_size) for _ in range(n)]

    prompts = [prompt() for _ in range(args.prompts)]
    teach = {mode: [prompt() for _ in range(args.teach)] for mode in MODES}
    # per round, prompts lmtier has never seen: the fresh engine's warm-up computes them, which
    # times its prefills (a server sees misses all the time; an engine that has timed none loads
    # every hit, whatever it costs)
    warm = [[prompt() for _ in range(2)] for _ in range(args.rounds)]
    kv_per_token = spec.num_hidden_layers * 2 * spec.num_key_value_heads * spec.head_dim * 2
    rate = args.rate * 1e6
    tiers = {"chunk_tokens": 256, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "2GiB"}},
        {"name": "slow", "backend": "throttled", "timeout_s": {"get": 600},
         "options": {"inner": {"backend": "disk", "options": {"root": str(root / "disk")}}}}]}
    import vllm

    print(f"# vLLM {vllm.__version__} (CPU, in-process) + lmtier; {machine_line()}")
    print(f"# model: tiny Llama {args.preset!r} ({spec.num_hidden_layers} layers, hidden {spec.hidden_size}; "
          f"{kv_per_token} KV bytes/token: {n * kv_per_token / 1e6:.2f} MB per {n}-token prompt); slow tier "
          f"read at {args.rate:g} MB/s when throttled; {args.prompts} prompts x {args.rounds} rounds, "
          f"{args.teach} teaching requests per cost mode")
    print(f"-- vLLM without lmtier (child process); {_load()}", flush=True)
    base = _Baseline(model, n + 16)
    # per mode, per round: (lmtier TTFT, paired no-lmtier TTFT) of each prompt
    pairs: dict[Mode, list[list[tuple[float, float]]]] = {m: [] for m in MODES}
    loaded: dict[Mode, list[int]] = {m: [] for m in MODES}
    learned: dict[Mode, str] = {}
    speed = "-"
    try:
        for p in warm[0]:
            base.ttft(p)
        for r in range(args.rounds):
            first = r == 0
            print(f"-- round {r + 1}/{args.rounds}: a fresh lmtier engine (RAM empty, estimates unlearned)"
                  + (", storing every prompt first" if first else "") + f"; {_load()}", flush=True)
            eng = _Engine(model, n + 16, tiers)
            try:
                for p in warm[r] + (prompts + [t for ts in teach.values() for t in ts] if first else []):
                    eng.ttft(p)
                knob = eng.kv.manager.tier("slow").backend.throttle
                for mode in MODES:
                    policy, throttled = mode
                    knob.set(bytes_per_s=rate if throttled else None)
                    eng.kv.load_policy = policy
                    taught = []
                    for t in teach[mode] if policy == "cost" else ():
                        eng.clear_ram()
                        taught.append(eng.ttft(t)[1])
                    got = []
                    for i, p in enumerate(prompts):
                        eng.clear_ram()
                        if (i + r) % 2:
                            dt, cached = eng.ttft(p)
                            b = base.ttft(p)
                        else:
                            b = base.ttft(p)
                            dt, cached = eng.ttft(p)
                        got.append((dt, b))
                        loaded[mode].append(cached)
                    pairs[mode].append(got)
                    cost = eng.kv.manager.read_costs()["slow"]
                    learned[mode] = "-" if cost is None else f"{cost.bytes_per_s / 1e6:.3g} MB/s"
                    print(f"   {_label(mode)}: {fmt_seconds(median([t for t, _ in got]))} vs "
                          f"{fmt_seconds(median([b for _, b in got]))} without lmtier = "
                          f"{fmt_ratio(median([t / b for t, b in got]))}; loaded "
                          f"{', '.join(str(x) for x in loaded[mode][-len(prompts):])} tokens"
                          + (f"; teaching requests loaded {', '.join(map(str, taught))}" if taught else ""),
                          flush=True)
                    print("      pairs (lmtier / no lmtier, ms): "
                          + ", ".join(f"{t * 1e3:.0f}/{b * 1e3:.0f}" for t, b in got), flush=True)
                rc = eng.kv.recompute.cost()
                speed = "-" if rc is None else f"{rc.tokens_per_s(n):,.0f} tokens/s"
            finally:
                eng.close()
        print(f"-- done; {_load()}", flush=True)
    finally:
        base.close()

    def per_round(mode: Mode) -> list[float]:
        """Each round's median of (lmtier TTFT / the paired no-lmtier TTFT)."""
        return [median([t / b for t, b in got]) for got in pairs[mode]]

    every_base = [b for m in MODES for got in pairs[m] for _, b in got]
    rows = [["vLLM without lmtier", fmt_seconds(median(every_base)), "1.00x", "-", "-", "-"]]
    for mode in MODES:
        rounds = per_round(mode)
        rows.append([_label(mode), fmt_seconds(median([t for got in pairs[mode] for t, _ in got])),
                     fmt_ratio(median(rounds)), ", ".join(fmt_ratio(x) for x in rounds),
                     f"{median(loaded[mode]):.0f}", learned[mode]])
    print()
    print_table(["mode", "TTFT", "/ no lmtier", "per round", "tokens loaded", "learned slow-tier speed"], rows,
                title=f"TTFT of {n}-token prompts held only by the slow tier: medians; a ratio is the median over "
                      f"rounds of each round's median of paired ratios; learned prefill {speed}")
    medians = [median([b for _, b in got]) for m in MODES for got in pairs[m]]
    thr, unthr = per_round(("cost", True)), per_round(("cost", False))
    print(f"\ncost policy, throttled tier vs no lmtier: {fmt_ratio(median(thr))} (goal <= 1.05x); vs the same "
          f"tier unthrottled: {fmt_ratio(median([a / b for a, b in zip(thr, unthr, strict=True)]))}; unthrottled, "
          f"cost vs always: {fmt_ratio(median(unthr))} vs {fmt_ratio(median(per_round(('always', False))))} of no "
          f"lmtier; 'always' when throttled: {fmt_ratio(median(per_round(('always', True))))}. Noise: the no-lmtier "
          f"TTFT's median per round and mode ranged {fmt_seconds(min(medians))} to {fmt_seconds(max(medians))}")
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--prompts", type=int, default=4, help="timed prompts per round and mode (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each a fresh lmtier engine running every mode (default 3)")
    p.add_argument("--teach", type=int, default=8, help="untimed requests before each cost mode (default 8)")
    p.add_argument("--rate", type=float, default=1.0, help="throttled read speed, MB/s (default 1.0)")
    p.add_argument("--preset", default="demo", help="tiny model preset of lmtier.demo (default demo)")
    args = p.parse_args(argv)
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    import logging
    import warnings

    logging.getLogger("lmtier").setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")
    with tempfile.TemporaryDirectory(prefix="lmtier-cost-cpu-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
