"""TTFT of a real vLLM engine (CPU) when the tier holding the hit is slower than recomputing it.

The tiny Llama of ``lmtier demo`` (preset ``demo``), vLLM in this process with its own prefix
cache off. lmtier's tiers: a RAM tier over a **slow** tier (a disk tier wrapped by the test
throttle, ``tests/support/throttle.py``: reads answer at ``--rate`` MB/s, changeable mid-run).
Each timed request asks for a prompt whose chunks are only in the slow tier (the RAM tier is
cleared before it), so the request either loads from the slow tier or recomputes. Four modes, all
in one lmtier engine, against one engine without lmtier measured in the same run:

* ``baseline``: vLLM without lmtier (a prefill of the whole prompt);
* ``cost, throttled``: ``load_policy: cost`` (the default) with the slow tier throttled: lmtier
  sees that loading would be slower than recomputing and loads nothing (goal: TTFT <= 1.05x the
  baseline); the chunks are promoted to RAM in the background;
* ``always, throttled``: ``load_policy: always``, today's behaviour before the decision: every
  hit is loaded, whatever it costs;
* ``cost, unthrottled`` and ``always, unthrottled``: the throttle lifted: loading wins again.

Before each mode, untimed requests teach the estimates the tier's current speed (the cold start
loads everything to learn; later a skipped request's promotion is a sample). TTFT is the wall
time of ``LLM.generate`` of one prompt with ``max_tokens=1``; medians over the prompts and
``--rounds``. Nothing is asserted.

    python benchmarks/cost_cpu.py [--tokens 2048] [--prompts 4] [--rounds 2] [--rate 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
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
MODES = (("cost", True), ("always", True), ("cost", False), ("always", False))


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

        return get_kv_transfer_group().engine

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

    prompts = [prompt() for _ in range(args.prompts * args.rounds)]
    teach = {mode: [prompt() for _ in range(args.teach)] for mode in MODES}
    warm = [prompt() for _ in range(2)]
    kv_per_token = spec.num_hidden_layers * 2 * spec.num_key_value_heads * spec.head_dim * 2
    rate = args.rate * 1e6
    import vllm

    print(f"# vLLM {vllm.__version__} (CPU, in-process) + lmtier; {machine_line()}")
    print(f"# model: tiny Llama {args.preset!r} ({spec.num_hidden_layers} layers, hidden {spec.hidden_size}; "
          f"{kv_per_token} KV bytes/token: {n * kv_per_token / 1e6:.2f} MB per {n}-token prompt); slow tier "
          f"read at {args.rate:g} MB/s when throttled; {args.prompts} prompts x {args.rounds} rounds, medians")

    print("-- baseline: vLLM without lmtier", flush=True)
    eng = _Engine(model, n + 16, None)
    base: list[float] = []
    try:
        for p in warm:
            eng.ttft(p)
        for p in prompts:
            base.append(eng.ttft(p)[0])
    finally:
        eng.close()

    tiers = {"chunk_tokens": 256, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "2GiB"}},
        {"name": "slow", "backend": "throttled", "timeout_s": {"get": 600},
         "options": {"inner": {"backend": "disk", "options": {"root": str(root / "disk")}}}}]}
    print("-- lmtier: storing every prompt (misses), then each mode", flush=True)
    eng = _Engine(model, n + 16, tiers)
    ttft: dict[tuple[str, bool], list[float]] = {m: [] for m in MODES}
    loaded: dict[tuple[str, bool], list[int]] = {m: [] for m in MODES}
    learned: dict[tuple[str, bool], str] = {}
    try:
        for p in warm:
            eng.ttft(p)
        for p in prompts + [t for ts in teach.values() for t in ts]:
            eng.ttft(p)
        knob = eng.kv.manager.tier("slow").backend.throttle
        for mode in MODES:
            policy, throttled = mode
            knob.set(bytes_per_s=rate if throttled else None)
            eng.kv.load_policy = "cost"  # the teaching requests learn the same way in every mode
            for t in teach[mode]:
                eng.clear_ram()
                eng.ttft(t)
            eng.kv.load_policy = policy
            for p in prompts:
                eng.clear_ram()
                dt, cached = eng.ttft(p)
                ttft[mode].append(dt)
                loaded[mode].append(cached)
            cost = eng.kv.manager.read_costs()["slow"]
            learned[mode] = "-" if cost is None else f"{cost.bytes_per_s / 1e6:.3g} MB/s"
            print(f"   {policy}, {'throttled' if throttled else 'unthrottled'}: "
                  f"{fmt_seconds(median(ttft[mode]))}, loaded {median(loaded[mode]):.0f} tokens", flush=True)
        rc = eng.kv.recompute.cost()
        speed = "-" if rc is None else f"{rc.tokens_per_s(n):,.0f} tokens/s"
    finally:
        eng.close()

    b = median(base)
    rows = [["baseline (no lmtier)", fmt_seconds(b), "1.00x", "-", "-"]]
    for mode in MODES:
        policy, throttled = mode
        t = median(ttft[mode])
        rows.append([f"{policy}, {'throttled' if throttled else 'unthrottled'}", fmt_seconds(t), fmt_ratio(t / b),
                     f"{median(loaded[mode]):.0f}", learned[mode]])
    print()
    print_table(["mode", "TTFT", "TTFT / baseline", "tokens loaded", "learned slow-tier speed"], rows,
                title=f"TTFT of {n}-token prompts held only by the slow tier (median); learned prefill: {speed}")
    thr = median(ttft[("cost", True)])
    print(f"\ncost policy, throttled tier vs no cache: {fmt_ratio(thr / b)} (goal <= 1.05x); vs the same tier "
          f"unthrottled: {fmt_ratio(thr / median(ttft[('cost', False)]))}; what 'always' costs when throttled: "
          f"{fmt_ratio(median(ttft[('always', True)]) / b)} of the baseline")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="prompt length (default 2048)")
    p.add_argument("--prompts", type=int, default=4, help="timed prompts per round and mode (default 4)")
    p.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    p.add_argument("--teach", type=int, default=2, help="untimed requests before each mode (default 2)")
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
