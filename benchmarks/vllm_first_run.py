"""What a storing (first) run costs against vLLM without lmtier, on `make demo`'s workload, and where.

`make demo`'s workload (the ``demo`` tiny Llama, 4 prompts of 3,000 tokens in one batch, 8 tokens
generated, in-process engines on CPU, the embedded default tiers cpu -> disk with the disk root in
a temporary directory) on fresh engines, rounds alternating:

* ``baseline``: vLLM without a connector;
* ``first``: vLLM with lmtier, every prompt new (a miss, prefilled, stored).

Each engine first runs one warm-up batch of the same shape (other text), untimed, as the demo
does. Reported, medians over ``--rounds``: the batch's wall time and the first/baseline ratio
(the demo's "first run" speedup; the goal of issue 12 is >= 0.97), the process CPU time of the
batch (both cores: compute threads plus lmtier's background writes), and the lmtier engine's
critical path: the time spent inside each connector hook on the engine's thread (bind: lookups
started; worker meta: lookup answers collected; wait_for_save: pages copied out and handed to the
tiers; start_load_kv), and the engine steps the batch took. Nothing is asserted.

    python benchmarks/vllm_first_run.py [--rounds 5] [--prompts 4] [--tokens 3000]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import fmt_ratio, machine_line, median, print_table

_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
}
_HOOKS = ("bind_connector_metadata", "start_load_kv", "wait_for_save", "build_connector_worker_meta")


class HookTimer:
    """Wall time spent inside the worker connector's hooks (the engine thread's critical path)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(_HOOKS, 0.0)
        self.calls = dict.fromkeys(_HOOKS, 0)
        self.on = False

    def install(self) -> None:
        from lmtier.integrations.vllm import LMTierConnector

        for name in _HOOKS:
            orig = getattr(LMTierConnector, name)
            setattr(LMTierConnector, name, self._wrap(name, orig))

    def _wrap(self, name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
        def timed(conn: Any, *args: Any, **kwargs: Any) -> Any:
            if not self.on or conn.role.name != "WORKER":
                return orig(conn, *args, **kwargs)
            t0 = time.perf_counter()
            try:
                return orig(conn, *args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(_HOOKS, 0.0)
        self.calls = dict.fromkeys(_HOOKS, 0)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _run(model: str, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int,
         lmtier: dict[str, Any] | None, hooks: HookTimer) -> tuple[float, float, int]:
    """(batch seconds, process CPU seconds, engine steps) of one fresh engine's timed batch."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kwargs: dict[str, Any] = {}
    if lmtier is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=lmtier)
    llm = LLM(model=model, dtype="bfloat16", max_model_len=max(len(p) for p in prompts) + max_tokens + 16,
              seed=0, enforce_eager=True, disable_log_stats=False, use_tqdm_on_load=False, **kwargs)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in warmup], params, use_tqdm=False)
        if lmtier is not None:
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            get_kv_transfer_group().engine.flush()
        core = llm.llm_engine.engine_core.engine_core
        steps = [0]
        orig_step = core.step_fn

        def counted() -> Any:
            steps[0] += 1
            return orig_step()

        core.step_fn = counted
        hooks.reset()
        hooks.on = True
        c0, t0 = _cpu(), time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
        hooks.on = False
        core.step_fn = orig_step
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return seconds, cpu, steps[0]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--preset", default="demo")
    args = p.parse_args(argv)
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    import logging
    import warnings

    logging.getLogger("lmtier").setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")
    from lmtier.config import load_config
    from lmtier.demo import TINY_PRESETS, build_tiny_llama, make_prompts

    model = str(build_tiny_llama(TINY_PRESETS[args.preset]))
    hooks = HookTimer()
    hooks.install()
    import vllm

    print(f"# vLLM {vllm.__version__} (CPU, in-process) + lmtier; {machine_line()}")
    print(f"# make demo's workload: preset {args.preset!r}, {args.prompts} prompts x {args.tokens} tokens, "
          f"{args.max_tokens} generated; embedded default tiers (cpu 2 GiB -> disk); {args.rounds} rounds, medians")
    rows: dict[str, list[tuple[float, float, int]]] = {"baseline": [], "first": []}
    crit: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="lmtier-first-run-") as tmp:
        for r in range(args.rounds):
            prompts = make_prompts(model, args.prompts, args.tokens, seed=5000 + 100 * r)
            warm = make_prompts(model, args.prompts, args.tokens, seed=7000 + 100 * r)
            cfg = load_config(None, env={}).model_dump(mode="json", exclude_none=True)
            for tier in cfg["tiers"]:
                if tier["backend"] == "disk":
                    tier["options"]["root"] = str(Path(tmp) / f"disk{r}")
            extra = {"chunk_tokens": cfg["chunk_tokens"], "tiers": [
                {"name": t["name"], "backend": t["backend"], "options": t["options"]} for t in cfg["tiers"]]}
            rows["baseline"].append(_run(model, prompts, warm, args.max_tokens, None, hooks))
            rows["first"].append(_run(model, prompts, warm, args.max_tokens, extra, hooks))
            crit.append(dict(hooks.seconds))
            b, f = rows["baseline"][-1], rows["first"][-1]
            print(f"-- round {r + 1}: baseline {b[0]:.2f} s, first {f[0]:.2f} s, first/baseline speedup "
                  f"{b[0] / f[0]:.3f}; hooks {sum(crit[-1].values()) * 1e3:.0f} ms", flush=True)
    speed = [b[0] / f[0] for b, f in zip(rows["baseline"], rows["first"], strict=True)]
    table = [[name, f"{median([x[0] for x in v]):.3f}", f"{median([x[1] for x in v]):.2f}",
              f"{median([float(x[2]) for x in v]):.0f}"] for name, v in rows.items()]
    print()
    print_table(["engine", "batch s", "process CPU s", "engine steps"], table, title="timed batch, medians")
    print(f"first-run speedup vs baseline (baseline time / first time), median of per-round ratios: "
          f"{fmt_ratio(median(speed))} (min {min(speed):.3f}, max {max(speed):.3f})")
    print()
    print_table(["worker hook (critical path)", "ms per batch"],
                [[name, f"{median([c[name] for c in crit]) * 1e3:.1f}"] for name in _HOOKS],
                title="lmtier engine: time inside the connector's worker hooks, medians")
    return 0


if __name__ == "__main__":
    sys.exit(main())
