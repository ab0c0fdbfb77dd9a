"""CPU kernels (numba) for the fp8 codec's two hot loops: bf16 x scale -> e4m3 codes, and back.

torch rounds float32 to float8 e4m3 one element at a time on CPU (~0.5-0.7 ns per element per
core: the fp8 codec's bound, 0.7-1.3 GB/s of bf16 per core) and its fp8 decode takes six
elementwise passes. These kernels do each in one pass over the value, vectorized by LLVM, with
the GIL released (the codec pool's threads run in parallel), writing **the same bytes** as the
torch ops they replace (:meth:`lmtier.codecs.quant.Fp8Codec.quantize` / ``dequantize``), which
the GPU path still runs: the codes are float32 ``x * (1 / scale)`` rounded to nearest-even e4m3
(the rounding torch's ``float -> float8_e4m3fn`` does; values never exceed 448 here), the decoded
values ``code * scale`` in float32 rounded to nearest-even bfloat16 (torch's ``float ->
bfloat16``, NaN to 0x7FC0). ``tests/unit/test_codec_kernels.py`` checks every bf16 value and
every code against torch.

numba is optional (``pip install lmtier[codecs]``; vLLM depends on it). :func:`fp8_kernels` is
``None`` without it, when ``LMTIER_CODEC_KERNELS=torch`` is set (to compare), or when compiling
fails (logged once); the codec then runs the torch ops. Compiled on first use (~0.7 s, holding
the GIL) and cached on disk by numba (``__pycache__``, else its user cache directory), so later
processes load them in milliseconds.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Fp8Kernels", "fp8_kernels"]

log = logging.getLogger(__name__)


@dataclass
class Fp8Kernels:
    """The compiled kernels; arrays are 1-D, C-contiguous numpy views of the tensors' memory.

    ``scale_bf16(bits, scales, inverse, rows, tokens, heads, width)``: ``bits`` (uint16, the bf16
    values as ``rows x tokens x heads x width``); writes each group's scale and its reciprocal
    (float32, ``rows x heads``: a group is ``[row, :, head, :]``); False (nothing usable written)
    if a group holds inf or NaN.
    ``encode_bf16(bits, inverse, codes, rows, tokens, heads, width)``: ``codes`` (uint8, ``bits``'
    length) from the values and the reciprocal scales.
    ``decode_bf16(codes, scales, bits, rows, tokens, heads, width)``: the values back.
    """

    scale_bf16: Any
    encode_bf16: Any
    decode_bf16: Any


def fp8_kernels() -> Fp8Kernels | None:
    """The fp8 kernels, or ``None`` where the torch ops run (no numba, ``LMTIER_CODEC_KERNELS=torch``,
    or compiling failed)."""
    if os.environ.get("LMTIER_CODEC_KERNELS", "").lower() == "torch":
        return None
    return _compiled()


@functools.cache  # once per process, like the native library (lmtier.transfer._native)
def _compiled() -> Fp8Kernels | None:
    try:
        return _compile()
    except ImportError:
        log.debug("lmtier codecs: numba is not installed; fp8 runs torch's ops on CPU")
    except Exception as exc:  # a broken numba/llvmlite: the torch ops still work
        log.warning("lmtier codecs: compiling the fp8 CPU kernels failed (%s: %s); using torch's ops (slower)",
                    type(exc).__name__, exc)
    return None


def _compile() -> Fp8Kernels:
    import numba
    import numpy as np

    def jit(fn: Any) -> Any:
        try:
            return numba.njit(nogil=True, cache=True, boundscheck=False)(fn)
        except RuntimeError:  # "cannot cache ...: no locator available": a read-only install
            return numba.njit(nogil=True, boundscheck=False)(fn)

    u32, f32, u8, u16 = np.uint32, np.float32, np.uint8, np.uint16

    # Each loop walks one row of ``width`` elements (one group's scale) through a row view:
    # LLVM vectorizes that inner loop; a single running index over the flat arrays ran 7x slower.
    def encode_bf16(bits: Any, inverse: Any, codes: Any, rows: int, tokens: int, heads: int, width: int) -> None:
        lines = rows * tokens * heads
        x2, q2 = bits.reshape(lines, width), codes.reshape(lines, width)
        for g in range(lines):
            s = inverse[(g // (tokens * heads)) * heads + g % heads]
            x, q = x2[g], q2[g]
            for d in range(width):
                y = f32(u32(u32(x[d]) << u32(16)).view(f32) * s)
                u = y.view(u32)
                sign = u32((u >> u32(24)) & u32(0x80))
                a = u32(u & u32(0x7FFFFFFF))
                if a < u32(0x3C800000):
                    # below e4m3's smallest normal (2**-6): adding 2**14 rounds |y| to float32's
                    # grid there, 2**-9, which is e4m3's subnormal step (nearest-even)
                    m = u32(f32(a.view(f32) + f32(16384.0)).view(u32) - u32(0x46800000))
                else:
                    # drop 20 mantissa bits rounding to nearest-even (a carry bumps the exponent),
                    # then rebias the exponent from 127 to 7
                    m = u32(((a + u32(0x7FFFF) + ((a >> u32(20)) & u32(1))) >> u32(20)) - u32(960))
                q[d] = u8(m | sign)

    tiny = f32(np.finfo(np.float32).tiny)

    def scale_bf16(bits: Any, scales: Any, inverse: Any, rows: int, tokens: int, heads: int, width: int) -> bool:
        # torch's ops: amax of the magnitude bits, then where(amax > 0, max(amax * f32(1 / 448),
        # tiny), 1) and its reciprocal, each one float32 operation
        lines = rows * tokens * heads
        x2 = bits.reshape(lines, width)
        amax = np.zeros(rows * heads, np.uint16)
        for g in range(lines):
            x = x2[g]
            m = u16(0)
            for d in range(width):
                m = max(m, u16(x[d] & u16(0x7FFF)))
            j = (g // (tokens * heads)) * heads + g % heads
            amax[j] = max(amax[j], m)
        for j in range(rows * heads):
            if amax[j] >= u16(0x7F80):  # inf or NaN: the torch path raises (or, unchecked, writes it)
                return False
            a = u32(u32(amax[j]) << u32(16)).view(f32)
            s = max(f32(a * f32(1.0 / 448.0)), tiny) if a > f32(0.0) else f32(1.0)
            scales[j] = s
            inverse[j] = f32(f32(1.0) / s)
        return True

    def decode_bf16(codes: Any, scales: Any, bits: Any, rows: int, tokens: int, heads: int, width: int) -> None:
        lines = rows * tokens * heads
        q2, y2 = codes.reshape(lines, width), bits.reshape(lines, width)
        for g in range(lines):
            s = scales[(g // (tokens * heads)) * heads + g % heads]
            q, y = q2[g], y2[g]
            for d in range(width):
                # the code's value in float32, exactly: subnormal m * 2**-9, else the bits moved
                # into float32's (exponent rebiased from 7 to 127); arithmetic, not a table, so
                # the loop vectorizes
                c = u32(q[d])
                e, m = u32((c >> u32(3)) & u32(15)), u32(c & u32(7))
                if e == 0:
                    v = f32(f32(m) * f32(1.0 / 512))
                else:
                    v = u32(((e + u32(120)) << u32(23)) | (m << u32(20))).view(f32)
                if c & u32(0x80):
                    v = -v
                u = f32(v * s).view(u32)
                if (c & u32(0x7F)) == u32(0x7F):  # NaN codes (0x7F, 0xFF): NaN, as torch writes it
                    y[d] = u16(0x7FC0)
                else:  # float32 -> bfloat16, nearest-even
                    y[d] = u16((u + u32(0x7FFF) + ((u >> u32(16)) & u32(1))) >> u32(16))

    scale, enc, dec = jit(scale_bf16), jit(encode_bf16), jit(decode_bf16)
    # compile now (one signature each), not in the middle of someone's first put
    z16, z32, z8 = np.zeros(1, np.uint16), np.ones(1, np.float32), np.zeros(1, np.uint8)
    scale(z16, z32, np.ones(1, np.float32), 1, 1, 1, 1)
    enc(z16, z32, z8, 1, 1, 1, 1)
    dec(z8, z32, z16, 1, 1, 1, 1)
    return Fp8Kernels(scale, enc, dec)
