"""A tiny random Llama built locally (no network) for the vLLM tests: see :func:`lmtier.demo.build_tiny_llama`.

The model is cached (by spec fingerprint) under ``LMTIER_TINY_MODEL_DIR`` or
``~/.cache/lmtier/tiny-models``; building it takes a few seconds the first time.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmtier.demo import TINY_PRESETS, TinyLlamaSpec, build_tiny_llama

__all__ = ["TINY_PRESETS", "TinyLlamaSpec", "tiny_llama"]


def tiny_llama(preset: str = "test", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the tiny model ``preset`` (``test``: 2 layers, hidden 256, 2048 tokens)."""
    return build_tiny_llama(TINY_PRESETS[preset], cache_dir)
