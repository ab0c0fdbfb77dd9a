"""Drive a real vLLM engine (CPU) over token prompts in this process: make, generate, shut down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import LLM

__all__ = ["ENGINE_ENV", "Result", "generate", "lmtier_transfer_config", "main", "make_llm", "same_outputs", "shutdown"]

#: Environment every test engine runs with (the server test overrides VLLM_ENABLE_V1_MULTIPROCESSING).
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
MAX_TOKENS = 6
LOGPROB_ATOL = 0.02  # bf16 noise between a full prefill and one over loaded KV; wrong KV moves ids
#: Where part of the reused KV was computed by decode steps (a chat reply's) or recomputed after a
#: preemption, and the reference computed it in one prefill: different kernels and summation orders
#: in bf16. Why one bf16 ulp of a logit in [16, 32): on an AVX2-only host (AMD EPYC, no AVX-512;
#: vLLM's CPU kernels are chosen by instruction set) these cases moved logprobs by up to 0.079,
#: with equal token ids; wrong KV moves the ids (and logprobs by far more), which stay exact.
RECOMPUTED_KV_LOGPROB_ATOL = 0.125


@dataclass
class Result:
    token_ids: list[int]
    logprobs: list[float]
    num_cached_tokens: int


def lmtier_transfer_config(extra: dict[str, Any], role: str = "kv_both") -> Any:
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
                            kv_role=role, kv_load_failure_policy="recompute",
                            kv_connector_extra_config=extra)


def make_llm(model: str, lmtier: dict[str, Any] | None = None, *, role: str = "kv_both", **engine: Any) -> LLM:
    """An engine over the tiny model; ``lmtier`` is the connector's extra config (None: no connector).

    ``engine`` adds ``LLM`` arguments (``kv_events_config``, ``enable_lora``, ...).
    """
    from vllm import LLM

    kwargs: dict[str, Any] = dict(engine)
    if lmtier is not None:
        kwargs["kv_transfer_config"] = lmtier_transfer_config(lmtier, role)
    # no local prefix cache (unless asked): every reuse must come through lmtier; eager: no compile time
    kwargs.setdefault("max_model_len", 4096)
    kwargs.setdefault("enable_prefix_caching", False)
    _let_vllm_scan_llvmlite()
    return LLM(model=model, dtype="bfloat16", seed=0, enforce_eager=True, disable_log_stats=True, **kwargs)


def _let_vllm_scan_llvmlite() -> None:
    """vLLM 0.32's CPU worker init reads ``vars(x).get("kernel")`` of every module attribute that
    has a ``__dict__``; llvmlite's lazy library wrapper (``llvmlite.binding.ffi.lib``, loaded with
    numba by the fp8 kernel tests) answers ``__dict__`` with a wrapped function, and engine
    creation fails (AttributeError: '_lib_fn_wrapper' object has no attribute 'get'). Giving the
    wrapper a plain ``__dict__`` entry in its function table lets the scan pass it by; nothing
    calls it. Only where llvmlite is loaded already: these tests build engines in one process."""
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict):
        table.setdefault("__dict__", {})


def generate(llm: LLM, prompts: list[list[int]], *, max_tokens: int = MAX_TOKENS, cache_salt: str | None = None,
             lora_request: Any = None) -> list[Result]:
    """Greedy outputs of ``prompts`` in one batch, all with the same salt and LoRA adapter (or none)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
    inputs = []
    for p in prompts:
        prompt = TokensPrompt(prompt_token_ids=p)
        if cache_salt is not None:
            prompt["cache_salt"] = cache_salt
        inputs.append(prompt)
    outs = llm.generate(inputs, params, use_tqdm=False, lora_request=lora_request)
    results = []
    for out in outs:
        comp = out.outputs[0]
        ids = list(comp.token_ids)
        lps = [float(step[tok].logprob) for step, tok in zip(comp.logprobs or [], ids, strict=True)]
        results.append(Result(ids, lps, int(out.num_cached_tokens or 0)))
    return results


def shutdown(llm: LLM) -> None:
    """Stop the engine (and the worker's connector, which closes lmtier's tiers)."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def same_outputs(got: Result, want: Result, atol: float = LOGPROB_ATOL) -> str | None:
    """None when ``got`` matches the baseline ``want`` (token ids equal, logprobs within ``atol``);
    else what differs."""
    if got.token_ids != want.token_ids:
        return f"token ids {got.token_ids} != baseline {want.token_ids}"
    worst = max((abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)), default=0.0)
    if worst > atol:
        return f"logprobs differ by {worst:.4f} > {atol}: {got.logprobs} vs {want.logprobs}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one engine in this process over prompts from a JSON file, write the results as JSON.

    ``python -m tests.integration.vllm_runner --model M --extra '{...}' --role kv_producer
    --prompts in.json --out out.json``: the other process of a prefill/decode test. The engine is
    shut down before the results are written, so its stores have reached the tiers by then.
    """
    import argparse
    import json
    import os
    from dataclasses import asdict

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--extra", required=True, help="the connector's kv_connector_extra_config, JSON")
    p.add_argument("--role", default="kv_both")
    p.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    with open(args.prompts) as f:
        prompts = json.load(f)
    llm = make_llm(args.model, json.loads(args.extra), role=args.role)
    try:
        results = generate(llm, prompts, max_tokens=args.max_tokens)
    finally:
        shutdown(llm)
    with open(args.out, "w") as f:
        json.dump([asdict(r) for r in results], f)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
