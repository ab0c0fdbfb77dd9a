"""`lmtier demo`: a real vLLM engine on CPU, run twice over long shared prefixes, with and without lmtier.

:func:`run_demo` builds a tiny Llama locally (no network: a ``transformers`` config, a tokenizer
trained with ``tokenizers``, deterministic random weights saved as safetensors), then runs the
same batch of long prompts three ways:

1. baseline: vLLM without any connector (the reference outputs);
2. first run with lmtier (cold: every chunk is computed and stored in the default tiers);
3. second run with lmtier on a **fresh** engine (warm: the prefixes load from lmtier's tiers),

and prints a table of times (the whole batch, and the median time to first token), speedups and
hit tokens, plus whether the token ids (and the logprobs, within bf16 rounding) of both lmtier
runs equal the baseline. It returns 0 on success
and 1 when an output differs.

**Steady state, from the first run on.** What only a process's or a machine's first use pays is
kept out of the timings, so the very first ``make demo`` on a fresh machine shows what every
later one shows: each engine first runs, untimed, a warm-up batch of the same shape as the timed
one (as many prompts, as long, other text: the first prefill at a new batch shape builds CPU
kernels, and cold Python modules and files are read) — on the lmtier engines that batch also
goes through the store path (first run: stored, then flushed to every tier before timing) and the
load path (second run: the first run's warm-up batch, loaded from disk). Engine start-up (model
load, KV cache allocation, the tiers' opening) is not timed either; the table says so.

:func:`build_tiny_llama` is also what the vLLM tests use (through ``tests/support/tiny_model.py``).
Random weights give junk text; they are scaled so that the next token is decided by a clear
margin and attention matters, which makes "outputs equal the baseline" a meaningful check of the
loaded KV.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["TINY_PRESETS", "TinyLlamaSpec", "build_tiny_llama", "main", "make_prompts", "run_demo"]

_TINY_FORMAT = 2  # bump when the builder's output changes, so cached models are rebuilt


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of a locally built Llama (all small enough for a 2-core CPU)."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 2048
    max_position_embeddings: int = 8192
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def fingerprint(self) -> str:
        blob = json.dumps({"format": _TINY_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


#: ``test``: fastest to start and run. ``demo``: heavy enough that prefill dominates a KV load.
TINY_PRESETS: dict[str, TinyLlamaSpec] = {
    "test": TinyLlamaSpec(),
    "demo": TinyLlamaSpec(hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                          num_attention_heads=12, num_key_value_heads=2),
}


def default_model_cache() -> Path:
    return Path(os.environ.get("LMTIER_TINY_MODEL_DIR", Path.home() / ".cache" / "lmtier" / "tiny-models"))


def build_tiny_llama(spec: TinyLlamaSpec | str = "test", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build (once) and return the directory of a tiny random Llama that vLLM can load offline.

    The directory name carries the spec's fingerprint, so a cached model is reused only when it
    was built from the same spec by the same builder version. Building takes a few seconds.
    """
    if isinstance(spec, str):
        spec = TINY_PRESETS[spec]
    root = Path(cache_dir) if cache_dir is not None else default_model_cache()
    target = root / f"tiny-llama-{spec.fingerprint()}"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        _write_tokenizer(tmp, spec)
        _write_config(tmp, spec)
        _write_weights(tmp, spec)
        try:
            tmp.rename(target)  # atomic publish; a concurrent builder may have won the race
        except OSError:
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus(n_lines: int, seed: int) -> Iterator[str]:
    import random

    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "va", "chi", "zu", "ge", "fo", "ly", "an"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    for _ in range(n_lines):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) + "."


def _write_tokenizer(path: Path, spec: TinyLlamaSpec) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, spec.seed), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))


def _write_config(path: Path, spec: TinyLlamaSpec) -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    cfg.save_pretrained(str(path))


def _write_weights(path: Path, spec: TinyLlamaSpec) -> None:
    """Deterministic random weights, scaled so attention matters and the argmax has a margin."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(spec.seed)
    h, inter, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_out, kv_out = spec.num_attention_heads * hd, spec.num_key_value_heads * hd

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(spec.vocab_size, h, std=1.0)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        # q/k larger than 1/sqrt(h): sharper attention, so wrong or missing KV changes the output
        tensors[p + "self_attn.q_proj.weight"] = rand(q_out, h, std=2.0 / h**0.5)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_out, h, std=2.0 / h**0.5)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_out, h, std=1.0 / h**0.5)
        tensors[p + "self_attn.o_proj.weight"] = rand(h, q_out, std=1.0 / q_out**0.5)
        tensors[p + "mlp.gate_proj.weight"] = rand(inter, h, std=1.0 / h**0.5)
        tensors[p + "mlp.up_proj.weight"] = rand(inter, h, std=1.0 / h**0.5)
        tensors[p + "mlp.down_proj.weight"] = rand(h, inter, std=1.0 / inter**0.5)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = rand(spec.vocab_size, h, std=5.0 / h**0.5)  # logits ~ N(0, 25)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------
# the demo itself

#: Environment of the demo's engines (setdefault: the caller's values win).
_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # scheduler and worker in this process: ~3 s per engine
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache (vLLM's CPU default is far larger)
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
# Logits are bf16: at |logit| 16-32 one ulp is 0.125, so a prefill over loaded KV (another attention
# path than one full prefill) may move a logprob by about that much. Wrong KV changes the token ids.
_LOGPROB_ATOL = 0.25


@dataclass
class _Run:
    label: str
    seconds: float
    prompt_tokens: int
    cached_tokens: int  # vLLM's num_cached_tokens: what this run did not prefill
    ttft: float  # median time to first token over the prompts (vLLM's per-request stats)
    stored_tokens: int  # lmtier: newly written to the tiers
    token_ids: list[list[int]]
    logprobs: list[list[float]]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmtier demo",
        description="vLLM (CPU) with and without lmtier on a tiny locally built Llama: a baseline run "
                    "without lmtier, a first run that stores the prompts' KV in the default tiers "
                    "(cpu + disk), and a second run on a fresh engine that loads it back from disk.")
    p.add_argument("--prompts", type=int, default=4, help="number of prompts (default 4)")
    p.add_argument("--tokens", type=int, default=3000, help="tokens per prompt (default 3000)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt (default 8)")
    p.add_argument("--preset", choices=sorted(TINY_PRESETS), default="demo",
                   help="model size (default demo: 4 layers, hidden 768; test: 2 layers, hidden 256)")
    p.add_argument("--dir", metavar="PATH", help="disk tier root to use and keep (default: a temporary "
                   "directory, removed at the end)")
    p.add_argument("--model-dir", metavar="PATH", help="where the tiny model is built and cached (default "
                   "$LMTIER_TINY_MODEL_DIR or ~/.cache/lmtier/tiny-models)")
    p.add_argument("--verbose", action="store_true", help="show vLLM's own log lines too")
    p.add_argument("--storage", action="store_true", help=argparse.SUPPRESS)  # the CLI's storage-only demo
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m lmtier.demo`` (the CLI's ``lmtier demo`` calls :func:`run_demo`)."""
    return run_demo(argv)


def run_demo(argv_or_options: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Run the demo; ``argv_or_options`` is an argv list (``--help`` lists the options) or parsed options.

    Returns 0 when both lmtier runs produced the baseline's token ids (logprobs within bf16 noise)
    and the second run loaded the prompts from lmtier; 1 otherwise.
    """
    opts = (argv_or_options if isinstance(argv_or_options, argparse.Namespace)
            else _parser().parse_args(list(argv_or_options or [])))
    if opts.prompts < 1 or opts.tokens < 2 or opts.max_tokens < 1:
        _say("lmtier demo: --prompts, --max-tokens must be >= 1 and --tokens >= 2")
        return 2
    for key, value in _ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if opts.verbose else "ERROR")
    _route_lmtier_logs()
    import warnings

    for category in (DeprecationWarning, FutureWarning):  # vLLM's own, about torch APIs: not ours
        warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        _say(f"lmtier demo needs vLLM ({exc}): `make setup`, or `pip install 'lmtier[vllm]'` and then "
             "`pip uninstall -y torchvision torchaudio torchcodec` on CPU hosts")
        return 2

    total_steps = 5
    _step(1, total_steps, f"building the tiny model (preset {opts.preset!r}; cached after the first time)")
    t0 = time.perf_counter()
    model = str(build_tiny_llama(opts.preset, opts.model_dir))
    prompts = make_prompts(model, opts.prompts, opts.tokens)
    warmup = make_prompts(model, opts.prompts, opts.tokens, seed=2000)
    _say(f"      model {model} ({time.perf_counter() - t0:.1f} s); {len(prompts)} prompts of "
         f"{opts.tokens} tokens, {opts.max_tokens} generated each")

    from lmtier.cli import demo_dir

    with demo_dir(opts.dir) as root:
        extra = _tier_config(root)
        tiers = ", ".join(f"{t['name']}({t['backend']}: {_describe(t['options'])})" for t in extra["tiers"])
        _say(f"      lmtier tiers (the embedded default, disk root moved to the demo directory): {tiers}")
        _step(2, total_steps, "baseline: vLLM without lmtier")
        base = _run_engine("baseline (no lmtier)", model, prompts, warmup, opts.max_tokens, None)
        _step(3, total_steps, "first run with lmtier: prefill everything, store the KV in cpu + disk")
        first = _run_engine("lmtier, first run", model, prompts, warmup, opts.max_tokens, extra)
        _step(4, total_steps, "second run with lmtier on a fresh engine (empty RAM tier): load the KV from disk")
        second = _run_engine("lmtier, second run", model, prompts, warmup, opts.max_tokens, extra)
    _step(5, total_steps, "results")
    _say(f"      timed: the {opts.prompts}-prompt batch only; not timed: engine start-up and one warm-up "
         f"batch per engine ({opts.prompts} other prompts of {opts.tokens} tokens)")
    return _report(base, [first, second], opts)


def _say(text: str) -> None:
    print(text, flush=True)


def _step(i: int, n: int, text: str) -> None:
    _say(f"[{i}/{n}] {text}")


def _describe(options: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _route_lmtier_logs() -> None:
    """lmtier's INFO lines (``Request R: ...``, ``Stored N of M ...``) on stdout, compact and grep-able."""
    import logging

    logger = logging.getLogger("lmtier")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("      %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # never twice, whatever the root logger has
    logger.setLevel(logging.INFO)




def _tier_config(root: Path) -> dict[str, Any]:
    """The embedded default configuration (cpu + disk) with the disk tier rooted at ``root``.

    A fresh root per demo keeps an earlier demo's chunks from turning the "first run" into hits.
    """
    from lmtier.config import load_config

    cfg = load_config(None, env={}).model_dump(mode="json", exclude_none=True)
    for tier in cfg["tiers"]:
        if tier["backend"] == "disk":
            tier["options"]["root"] = str(root)
    return {"chunk_tokens": cfg["chunk_tokens"], "tiers": [
        {"name": t["name"], "backend": t["backend"], "options": t["options"]} for t in cfg["tiers"]]}


def make_prompts(model: str, n: int, tokens: int, seed: int = 1000) -> list[list[int]]:
    """``n`` distinct documents of exactly ``tokens`` token ids (text in the model's own vocabulary)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = []
    for i in range(n):
        lines = _corpus(tokens // 6 + 64, seed=seed + i)  # ~15 words a line: more than enough
        ids: list[int] = tok(" ".join(lines), add_special_tokens=False)["input_ids"]
        prompts.append([tok.bos_token_id, *ids[: tokens - 1]])
    return prompts


def _run_engine(label: str, model: str, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int,
                lmtier: dict[str, Any] | None) -> _Run:
    """One fresh vLLM engine: warm up untimed, generate every prompt in one batch (timed), shut down."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from lmtier.metrics import default_metrics

    kwargs: dict[str, Any] = {}
    if lmtier is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=lmtier)
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="bfloat16", max_model_len=max(len(p) for p in prompts) + max_tokens + 16,
              seed=0, enforce_eager=True, disable_log_stats=False, use_tqdm_on_load=False, **kwargs)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
        # untimed warm-up: a batch of the timed batch's shape and sampling (the first logprobs
        # request compiles a kernel for seconds; every new prefill shape builds kernels), which on
        # an lmtier engine also runs the store or load path once; its stores land before timing
        t1 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in warmup], params, use_tqdm=False)
        _flush_lmtier(lmtier is not None)
        _say(f"      engine ready in {t1 - t0:.1f} s, warmed up in {time.perf_counter() - t1:.1f} s; generating ...")
        stored0 = default_metrics().stored_tokens._value.get()
        t1 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                            use_tqdm=sys.stderr.isatty())
        seconds = time.perf_counter() - t1
    finally:
        llm.llm_engine.engine_core.shutdown()  # closes the connector: stores are flushed to the tiers
        del llm
        import gc

        gc.collect()
    stored = int(default_metrics().stored_tokens._value.get() - stored0)
    ids = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[float(step[t].logprob) if step else float("nan")
            for step, t in zip(o.outputs[0].logprobs or [], i, strict=True)]
           for o, i in zip(outs, ids, strict=True)]
    cached = sum(int(o.num_cached_tokens or 0) for o in outs)
    import statistics

    firsts = [float(o.metrics.first_token_latency) for o in outs if o.metrics is not None]
    ttft = statistics.median(firsts) if firsts else float("nan")
    run = _Run(label, seconds, sum(len(p) for p in prompts), cached, ttft, stored, ids, lps)
    _say(f"      {label}: {seconds:.2f} s (TTFT median {ttft:.2f} s), {cached} prompt tokens from cache"
         + (f", {stored} stored by lmtier" if lmtier is not None else ""))
    return run


def _flush_lmtier(active: bool) -> None:
    """Wait until the in-process worker's lmtier stores have reached every tier."""
    if not active:
        return
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    engine = getattr(get_kv_transfer_group(), "engine", None)
    if engine is not None:
        engine.flush()


def _report(base: _Run, runs: list[_Run], opts: argparse.Namespace) -> int:
    rows = [("run", "time", "speedup", "TTFT p50", "TTFT speedup", "prompt tokens", "hit tokens", "stored",
             "outputs vs baseline")]
    ok = True
    rows.append((base.label, f"{base.seconds:.2f} s", "1.00x", f"{base.ttft:.2f} s", "1.00x",
                 str(base.prompt_tokens), "-", "-", "reference"))
    for run in runs:
        same_ids = run.token_ids == base.token_ids
        worst = max((abs(a - b) for x, y in zip(run.logprobs, base.logprobs, strict=True)
                     for a, b in zip(x, y, strict=True)), default=0.0) if same_ids else float("inf")
        verdict = f"identical (max |dlogprob| {worst:.4f})" if same_ids and worst <= _LOGPROB_ATOL else (
            "DIFFERENT token ids" if not same_ids else f"logprobs differ by {worst:.4f}")
        ok = ok and same_ids and worst <= _LOGPROB_ATOL
        speedup = base.seconds / run.seconds if run.seconds > 0 else float("inf")
        ttft_speedup = base.ttft / run.ttft if run.ttft > 0 else float("inf")
        rows.append((run.label, f"{run.seconds:.2f} s", f"{speedup:.2f}x", f"{run.ttft:.2f} s",
                     f"{ttft_speedup:.2f}x", str(run.prompt_tokens), str(run.cached_tokens),
                     str(run.stored_tokens), verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        _say("  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if j == 0:
            _say("  ".join("-" * w for w in widths))
    second = runs[-1]
    loaded = second.cached_tokens > 0
    _say(f"second run: {second.cached_tokens} of {second.prompt_tokens} prompt tokens "
         f"({second.cached_tokens / second.prompt_tokens:.1%}) loaded from lmtier instead of prefilled; "
         f"{base.seconds / second.seconds:.2f}x faster (TTFT {base.ttft / second.ttft:.2f}x) than vLLM "
         "without lmtier")
    if not loaded:
        _say("lmtier demo: FAILED: the second run loaded nothing from lmtier")
    elif not ok:
        _say("lmtier demo: FAILED: outputs differ from vLLM without lmtier")
    else:
        _say("lmtier demo: OK: outputs identical to vLLM without lmtier")
    return 0 if ok and loaded else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
