"""Value codecs: fewer bytes per chunk in a tier, exactly (lz4, zstd) or measured-lossy (fp8, int8).

=====================  ==============================================================
:class:`ValueCodec`    the protocol a codec implements (encode / decode into buffers)
:class:`CodecSpec`     how a plugin registers one (hook ``lmtier_value_codecs``)
:class:`KVGeometry`    what a lossy codec knows of the KV (from the engine's namespace)
=====================  ==============================================================

Configure per tier in YAML (``codec: zstd`` or ``codec: {name: fp8, scales: vector}``); the
:class:`~lmtier.manager.StorageManager` encodes what it writes to that tier and decodes whatever
carries a known codec id. ``docs/codecs.md`` has the measured ratios, speeds and quality.
Importing this package is cheap: each name loads its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtier.codecs.base import (
        FLOAT_DTYPES,
        LOSSY_FIELD,
        PLUGIN_CODEC_IDS,
        CodecSpec,
        KVGeometry,
        ValueCodec,
        declare_lossy,
    )

__all__ = ["FLOAT_DTYPES", "LOSSY_FIELD", "PLUGIN_CODEC_IDS", "CodecSpec", "KVGeometry", "ValueCodec",
           "declare_lossy"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'lmtier.codecs' has no attribute {name!r}")
    return getattr(importlib.import_module("lmtier.codecs.base"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
