"""Drive a real vLLM engine (CPU) over token prompts in this process: make, generate, shut down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm import LLM

__all__ = ["ENGINE_ENV", "Result", "generate", "lmtier_transfer_config", "make_llm", "same_outputs", "shutdown"]

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


@dataclass
class Result:
    token_ids: list[int]
    logprobs: list[float]
    num_cached_tokens: int


def lmtier_transfer_config(extra: dict[str, Any]) -> Any:
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
                            kv_role="kv_both", kv_load_failure_policy="recompute",
                            kv_connector_extra_config=extra)


def make_llm(model: str, lmtier: dict[str, Any] | None = None) -> LLM:
    """An engine over the tiny model; ``lmtier`` is the connector's extra config (None: no connector)."""
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if lmtier is not None:
        kwargs["kv_transfer_config"] = lmtier_transfer_config(lmtier)
    # no local prefix cache: every reuse must come through lmtier; eager: no compile time
    return LLM(model=model, dtype="bfloat16", max_model_len=4096, enable_prefix_caching=False, seed=0,
               enforce_eager=True, disable_log_stats=True, **kwargs)


def generate(llm: LLM, prompts: list[list[int]]) -> list[Result]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
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


def same_outputs(got: Result, want: Result) -> str | None:
    """None when ``got`` matches the baseline ``want``; else what differs."""
    if got.token_ids != want.token_ids:
        return f"token ids {got.token_ids} != baseline {want.token_ids}"
    worst = max((abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)), default=0.0)
    if worst > LOGPROB_ATOL:
        return f"logprobs differ by {worst:.4f} > {LOGPROB_ATOL}: {got.logprobs} vs {want.logprobs}"
    return None
