"""Lossless codecs: ``lz4`` (block format) and ``zstd``, both through cramjam (compress and
decompress *into* buffers, GIL released), with an optional byte shuffle.

Why a shuffle: a bf16 value's high byte (sign, exponent, one mantissa bit) is very repetitive in
KV and its low byte is nearly random; interleaved, a byte-oriented compressor sees mostly noise.
``shuffle: true`` stores all high bytes, then all low bytes (byte planes of the element size, 2
for 16-bit KV), which compresses better and costs a pass. Measured on the tiny model's bf16 KV
(``benchmarks/codecs.py``): see ``docs/codecs.md`` for ratios and speeds.

Encoded value: one byte (the shuffle's element size, 0 for none) and the compressed bytes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmtier.codecs.base import KVGeometry

__all__ = ["Lz4Codec", "Lz4Options", "ZstdCodec", "ZstdOptions", "make_lz4", "make_zstd"]

_PREFIX = 1


class Lz4Options(BaseModel):
    """Options of ``codec: {name: lz4, ...}``."""

    model_config = ConfigDict(extra="forbid")
    shuffle: bool = Field(False, description="store byte planes of the KV's element size (better ratio, slower)")


class ZstdOptions(BaseModel):
    """Options of ``codec: {name: zstd, ...}``."""

    model_config = ConfigDict(extra="forbid")
    level: int = Field(1, ge=-7, le=22, description="zstd level: negative = faster, 1-3 usual, up to 22")
    shuffle: bool = Field(False, description="store byte planes of the KV's element size (better ratio, slower)")


class _Lossless:
    """Shared machinery: the shuffle prefix and the byte-plane transposes (numpy, one pass)."""

    name: str
    codec_id: int
    lossy = False
    shuffle: bool

    def tag(self) -> str:
        return ""

    def check_kv(self, kv: KVGeometry) -> str | None:
        return None

    def max_encoded_bytes(self, raw_nbytes: int, kv: KVGeometry | None) -> int:
        return _PREFIX + self._bound(raw_nbytes)

    def encode(self, src: memoryview, dst: memoryview, kv: KVGeometry | None) -> int:
        width = self._width(src.nbytes, kv)
        dst[0] = width
        data: object = src
        if width > 1:
            import numpy as np

            data = np.ascontiguousarray(np.frombuffer(src, np.uint8).reshape(-1, width).T)
        return _PREFIX + self._compress(data, dst[_PREFIX:])

    def decode(self, src: memoryview, dst: memoryview) -> None:
        if src.nbytes < _PREFIX:
            raise ValueError("encoded value is empty")
        width = src[0]
        if width > 1:
            import numpy as np

            if dst.nbytes % width:
                raise ValueError(f"raw length {dst.nbytes} is not a multiple of the shuffle width {width}")
            planes = np.empty((width, dst.nbytes // width), np.uint8)
            got = self._decompress(src[_PREFIX:], memoryview(planes).cast("B"))  # type: ignore[arg-type]
            if got != dst.nbytes:
                raise ValueError(f"decoded {got} bytes, the header says {dst.nbytes}")
            np.frombuffer(dst, np.uint8).reshape(-1, width)[:] = planes.T
            return
        got = self._decompress(src[_PREFIX:], dst)
        if got != dst.nbytes:
            raise ValueError(f"decoded {got} bytes, the header says {dst.nbytes}")

    def _width(self, nbytes: int, kv: KVGeometry | None) -> int:
        if not self.shuffle:
            return 0
        width = kv.element_bytes if kv is not None and kv.element_bytes else 2
        return width if nbytes % width == 0 else 0

    # -- per library ---------------------------------------------------------------------------
    def _bound(self, nbytes: int) -> int:
        raise NotImplementedError

    def _compress(self, src: Any, dst: memoryview) -> int:
        raise NotImplementedError

    def _decompress(self, src: memoryview, dst: memoryview) -> int:
        raise NotImplementedError


class Lz4Codec(_Lossless):
    """LZ4 block format: fast both ways, a small ratio on KV (it has no entropy coder)."""

    name = "lz4"
    codec_id = 1

    def __init__(self, options: Lz4Options | None = None) -> None:
        import cramjam

        self._lz4 = cramjam.lz4
        self.shuffle = (options or Lz4Options()).shuffle

    def _bound(self, nbytes: int) -> int:
        return nbytes + nbytes // 255 + 16  # LZ4_COMPRESSBOUND

    def _compress(self, src: Any, dst: memoryview) -> int:
        return int(self._lz4.compress_block_into(src, dst, store_size=False))

    def _decompress(self, src: memoryview, dst: memoryview) -> int:
        # block format without a stored size: decompress_block_into bounds output by dst
        try:
            return int(self._lz4.decompress_block_into(src, dst))
        except Exception as exc:  # cramjam.DecompressionError: the contract says ValueError
            raise ValueError(f"lz4: {exc}") from exc


class ZstdCodec(_Lossless):
    """Zstandard: a better ratio than lz4 on KV (entropy-codes the exponent bytes), slower."""

    name = "zstd"
    codec_id = 2

    def __init__(self, options: ZstdOptions | None = None) -> None:
        import cramjam

        opts = options or ZstdOptions()
        self._zstd = cramjam.zstd
        self.level = opts.level
        self.shuffle = opts.shuffle

    def _bound(self, nbytes: int) -> int:
        # zstd's documented bound (ZSTD_COMPRESSBOUND)
        return nbytes + (nbytes >> 8) + ((128 << 10) - nbytes >> 11 if nbytes < (128 << 10) else 0) + 64

    def _compress(self, src: Any, dst: memoryview) -> int:
        return int(self._zstd.compress_into(src, dst, level=self.level))

    def _decompress(self, src: memoryview, dst: memoryview) -> int:
        try:
            return int(self._zstd.decompress_into(src, dst))
        except Exception as exc:  # cramjam.DecompressionError: the contract says ValueError
            raise ValueError(f"zstd: {exc}") from exc


def make_lz4(options: Lz4Options) -> Lz4Codec:
    return Lz4Codec(options)


def make_zstd(options: ZstdOptions) -> ZstdCodec:
    return ZstdCodec(options)

