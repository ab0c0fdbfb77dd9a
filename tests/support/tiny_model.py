"""A tiny random Llama built locally (no network) for the vLLM tests: see :func:`lmtier.demo.build_tiny_llama`.

The model is cached (by spec fingerprint) under ``LMTIER_TINY_MODEL_DIR`` or
``~/.cache/lmtier/tiny-models``; building it takes a few seconds the first time.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmtier.demo import TINY_PRESETS, TinyLlamaSpec, build_tiny_llama

__all__ = ["TINY_PRESETS", "TinyLlamaSpec", "tiny_llama", "tiny_lora"]


def tiny_llama(preset: str = "test", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the tiny model ``preset`` (``test``: 2 layers, hidden 256, 2048 tokens)."""
    return build_tiny_llama(TINY_PRESETS[preset], cache_dir)


def tiny_lora(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, seed: int = 1,
              rank: int = 8) -> Path:
    """A LoRA adapter (PEFT's file format) for the tiny model: random low-rank q/v updates.

    Written directly (``adapter_config.json`` + ``adapter_model.safetensors``), which is what vLLM
    reads; ``lora_B`` is not zero (as PEFT initialises it) so the adapter changes the outputs.
    """
    import json

    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    out = {"q_proj": heads * head_dim, "v_proj": kv_heads * head_dim}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, width in out.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, h, generator=g) / h**0.5).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(width, rank, generator=g) / rank**0.5).to(torch.bfloat16)
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": sorted(out), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": str(model_dir)}))
    return target
