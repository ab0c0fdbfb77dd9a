"""lmtier: a tiered KV-cache storage engine for LLM serving.

The public names (DESIGN.md §3) are exported lazily so that ``import lmtier`` stays cheap: no
torch, no client libraries, no CUDA probing at import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtier.config import load_config
    from lmtier.errors import LmtierError
    from lmtier.keys import ChunkKey
    from lmtier.manager import StorageManager
    from lmtier.protocol import Capabilities, StorageBackend
    from lmtier.registry import BackendSpec, hookimpl

__all__ = [
    "BackendSpec",
    "Capabilities",
    "ChunkKey",
    "LmtierError",
    "StorageBackend",
    "StorageManager",
    "hookimpl",
    "load_config",
]
__version__ = "0.1.0"

_WHERE = {
    "BackendSpec": "lmtier.registry",
    "hookimpl": "lmtier.registry",
    "Capabilities": "lmtier.protocol",
    "StorageBackend": "lmtier.protocol",
    "ChunkKey": "lmtier.keys",
    "LmtierError": "lmtier.errors",
    "StorageManager": "lmtier.manager",
    "load_config": "lmtier.config",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lmtier' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
