"""lmtier's own value codecs, registered through the ``lmtier`` entry-point group like a third
party's (cheap: names only; the codecs are imported when a tier uses one)."""

from __future__ import annotations

from lmtier.codecs.base import CodecSpec
from lmtier.registry import hookimpl

__all__ = ["lmtier_value_codecs"]

_HINT = "pip install lmtier  (cramjam is a core dependency)"


@hookimpl
def lmtier_value_codecs() -> list[CodecSpec]:
    return [
        CodecSpec("lz4", 1, "lmtier.codecs.lossless:make_lz4", "lmtier.codecs.lossless:Lz4Options",
                  install_hint=_HINT, description="lossless LZ4 block: fast, small ratio on KV"),
        CodecSpec("zstd", 2, "lmtier.codecs.lossless:make_zstd", "lmtier.codecs.lossless:ZstdOptions",
                  install_hint=_HINT, description="lossless Zstandard (level, shuffle): better ratio, slower"),
        CodecSpec("fp8", 3, "lmtier.codecs.quant:make_fp8", "lmtier.codecs.quant:QuantOptions", lossy=True,
                  description="lossy: float8 e4m3 + float32 scales (scales: vector | block_head | layer)"),
        CodecSpec("int8", 4, "lmtier.codecs.quant:make_int8", "lmtier.codecs.quant:QuantOptions", lossy=True,
                  description="lossy: int8 + float32 scales (scales: vector | block_head | layer)"),
    ]
