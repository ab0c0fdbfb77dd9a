"""TTFT of a real vLLM engine (CPU) with the lmtier connector: first run vs second run, per prompt length.

The model is the tiny Llama of ``lmtier demo`` (preset ``demo``: 4 layers, hidden 768, 2 KV heads,
built locally with random weights; heavy enough on 2 cores that prefill dominates). vLLM runs in
this process (scheduler and worker roles together) with its own prefix cache off, so a repeat can
only be served by lmtier. For each prompt length and repeat a fresh random prompt is

* ``baseline``: prefilled by vLLM without any connector (an engine of its own: engines with and
  without a connector cannot share a process, so each round runs one of each, one after the other);
* ``first``: prefilled by vLLM with lmtier (a lookup miss, the full prefill, the store of its
  chunks to the cpu + disk tiers);
* ``second``: the same prompt again, once the store has landed: loaded from the cpu tier, only the
  last block(s) computed;
* ``disk``: the same prompt on a fresh lmtier engine over the same disk root (its cpu tier is
  empty): loaded from the disk tier (files just written, so from the page cache).

TTFT is the wall time of ``LLM.generate`` of one prompt with ``max_tokens=1`` (offline, the call
returns with the first token), median over ``--repeats`` rounds; every engine is warmed up untimed
on each length first. The hit ratio is vLLM's cached tokens of the second run / prompt tokens.
Ratios printed: first/second (what a repeat saves), baseline/second (the speed-up against vLLM
without lmtier), first/baseline (what storing costs the first run). Nothing is asserted.

    python benchmarks/vllm_ttft.py [--lengths 512,1024,2048,4096] [--repeats 3] [--preset demo]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import fmt_ratio, fmt_seconds, machine_line, median, print_table

_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
}


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


class _Engine:
    """One vLLM engine (with or without lmtier) that times single-prompt TTFTs."""

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
        self.lmtier = lmtier is not None

    def ttft(self, prompt: list[int]) -> tuple[float, int]:
        """Seconds to the first token, and the prompt tokens vLLM did not prefill."""
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        (out,) = self.llm.generate([TokensPrompt(prompt_token_ids=prompt)], self.params, use_tqdm=False)
        return time.perf_counter() - t0, int(out.num_cached_tokens or 0)

    def flush(self) -> None:
        """Wait until lmtier's stores are in every tier (so they do not compete with the next run)."""
        if self.lmtier:
            from vllm.distributed.kv_transfer import get_kv_transfer_group

            engine = get_kv_transfer_group().engine
            if engine is not None:
                engine.flush()

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()  # closes the connector (and flushes lmtier)
        del self.llm
        gc.collect()


def _phase(label: str, make: Callable[[], _Engine], warm: list[list[int]],
           body: Callable[[_Engine], None]) -> None:
    t0 = time.perf_counter()
    print(f"-- {label}: starting the engine ...", flush=True)
    engine = make()
    try:
        for p in warm:  # untimed: first calls at a new shape create kernels
            engine.ttft(p)
            engine.flush()
        print(f"   ready and warm in {time.perf_counter() - t0:.1f} s; measuring ...", flush=True)
        body(engine)
    finally:
        engine.close()


def run(lengths: Sequence[int], repeats: int, preset: str, root: Path) -> None:
    from lmtier.demo import TINY_PRESETS, build_tiny_llama

    spec = TINY_PRESETS[preset]
    model = str(build_tiny_llama(spec))
    max_len = max(lengths) + 16
    rng = random.Random(20240611)
    prompts = {n: [_prompt(rng, n, spec.vocab_size) for _ in range(repeats)] for n in lengths}
    tiers = {"chunk_tokens": 256, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "2GiB"}},
        {"name": "local", "backend": "disk", "options": {"root": str(root)}},
    ]}
    kv_per_token = spec.num_hidden_layers * 2 * spec.num_key_value_heads * spec.head_dim * 2
    import vllm

    print(f"# vLLM {vllm.__version__} (CPU, in-process) + lmtier; {machine_line()}")
    print(f"# model: tiny Llama preset {preset!r} ({spec.num_hidden_layers} layers, hidden {spec.hidden_size}, "
          f"{spec.num_key_value_heads} KV heads x {spec.head_dim}; {kv_per_token} KV bytes per token), "
          f"vLLM prefix cache off; tiers cpu -> disk, 256-token chunks; {repeats} repeats, medians")

    base: dict[int, list[float]] = {n: [] for n in lengths}
    first: dict[int, list[float]] = {n: [] for n in lengths}
    second: dict[int, list[float]] = {n: [] for n in lengths}
    disk: dict[int, list[float]] = {n: [] for n in lengths}
    hits: dict[int, list[int]] = {n: [] for n in lengths}
    disk_hits: dict[int, list[int]] = {n: [] for n in lengths}

    def measure_base(r: int) -> Callable[[_Engine], None]:
        def body(e: _Engine) -> None:
            for n in lengths:
                base[n].append(e.ttft(prompts[n][r])[0])
        return body

    def measure_lmtier(r: int) -> Callable[[_Engine], None]:
        def body(e: _Engine) -> None:
            for n in lengths:
                p = prompts[n][r]
                first[n].append(e.ttft(p)[0])
                e.flush()
                dt, cached = e.ttft(p)
                second[n].append(dt)
                hits[n].append(cached)
        return body

    def measure_disk(e: _Engine) -> None:
        for n in lengths:
            for p in prompts[n]:
                dt, cached = e.ttft(p)
                disk[n].append(dt)
                disk_hits[n].append(cached)

    # Rounds alternate a no-connector engine and an lmtier engine (they cannot share the process),
    # so slow drifts of a shared machine hit both sides of a ratio alike.
    for r in range(repeats):
        warm = [[_prompt(rng, n, spec.vocab_size) for n in lengths] for _ in range(2)]
        _phase(f"round {r + 1}/{repeats}: baseline (no connector)", lambda: _Engine(model, max_len, None),
               warm[0], measure_base(r))
        _phase(f"round {r + 1}/{repeats}: lmtier, first and second run", lambda: _Engine(model, max_len, tiers),
               warm[1], measure_lmtier(r))
    _phase("lmtier: fresh engine, loads from disk", lambda: _Engine(model, max_len, tiers),
           [_prompt(rng, n, spec.vocab_size) for n in lengths], measure_disk)

    rows = []
    for n in lengths:
        b, f, s, d = median(base[n]), median(first[n]), median(second[n]), median(disk[n])
        ratio = median([h / n for h in hits[n]])
        disk_ratio = median([h / n for h in disk_hits[n]])
        rows.append([n, fmt_seconds(b), fmt_seconds(f), fmt_seconds(s), fmt_seconds(d),
                     f"{ratio:.1%}" + ("" if disk_ratio == ratio else f" (disk {disk_ratio:.1%})"),
                     fmt_ratio(f / s), fmt_ratio(b / s), fmt_ratio(b / d), fmt_ratio(f / b)])
    print()
    print_table(["prompt tokens", "baseline", "first", "second", "disk", "hit ratio", "first/second",
                 "baseline/second", "baseline/disk", "first/baseline"], rows,
                title="TTFT, median of repeats (second: from the cpu tier; disk: fresh engine, disk tier)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,1024,2048,4096", help="prompt lengths in tokens (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="rounds, one prompt per length each (default 3)")
    p.add_argument("--preset", default="demo", help="tiny model preset of lmtier.demo (default demo)")
    p.add_argument("--dir", help="disk tier root (default: a temporary directory)")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    import logging
    import warnings

    logging.getLogger("lmtier").setLevel(logging.WARNING)  # no per-request lines in the figures
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")
    if args.dir:
        run(lengths, args.repeats, args.preset, Path(args.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="lmtier-vllm-ttft-") as tmp:
            run(lengths, args.repeats, args.preset, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
