"""Lossy KV codecs: ``fp8`` (e4m3) and ``int8``, one byte per element and a float32 scale per group.

A group's scale is its largest magnitude over the format's largest value (448 for e4m3, 127 for
int8); each element is stored as ``x / scale`` rounded to the format. Which elements share a
scale (``scales:``):

* ``vector`` (default): each run of ``head_size`` elements, i.e. one token's K or V of one head.
  Needs nothing but the head size, so it fits every page layout. Overhead: 4 bytes per
  ``head_size`` elements (3% at head size 128).
* ``block_head``: one page (a block of tokens) of one head, K and V apart. Needs the page's
  element order, known for the ``(2, block_size, heads, head_size)`` pages of
  ``vllm_kv_first``, ``flashinfer`` and the transformers integration's ``hf_vllm_kv_first``.
  Overhead: 4 bytes per ``block_size x head_size`` elements.
* ``layer``: one scale per layer of the chunk (K and V together): no overhead to speak of, the
  coarsest (an outlier channel costs the whole layer its precision).

``docs/codecs.md`` has the measured error and quality of each.

Encoded value: a 32-byte prefix (format, dtype, scales kind, the geometry used), the float32
scales, then one byte per element. Decoding needs nothing else.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmtier.codecs.base import FLOAT_DTYPES, KVGeometry
from lmtier.codecs.kernels import Fp8Kernels, fp8_kernels

if TYPE_CHECKING:
    import torch

__all__ = ["Fp8Codec", "Int8Codec", "QuantOptions", "make_fp8", "make_int8"]

Scales = Literal["vector", "block_head", "layer"]
#: Page layouts whose pages are ``(2, block_size, heads, head_size)`` (``block_head`` scales).
KV_FIRST_PAGES = frozenset({"vllm_kv_first", "flashinfer", "hf_vllm_kv_first"})
_PREFIX = struct.Struct("<BBBBIIIIIQ")  # version, dtype, scales, pad, layers, pages, block, heads, head, elems
_VERSION = 1
_DTYPES = {"bfloat16": 1, "float16": 2, "float32": 3}
_SCALES = {"vector": 1, "block_head": 2, "layer": 3}
#: elements quantized per step: the float32 temporaries of a step stay in a core's L2 cache
_STEP = 1 << 17


class QuantOptions(BaseModel):
    """Options of ``codec: {name: fp8 | int8, ...}``."""

    model_config = ConfigDict(extra="forbid")
    scales: Scales = Field("vector", description="elements sharing a scale: vector (per token and head), "
                                                 "block_head (per page and head), layer (per layer)")


class _Quant:
    name: str
    codec_id: int
    lossy = True
    _qmax: float
    _decode_factor = 1.0

    def __init__(self, options: QuantOptions | None = None) -> None:
        self.scales: Scales = (options or QuantOptions()).scales

    def tag(self) -> str:
        return f"{self.name}/{self.scales}"

    def check_kv(self, kv: KVGeometry) -> str | None:
        if kv.dtype not in FLOAT_DTYPES:
            return (f"codec {self.name} quantizes float KV ({', '.join(sorted(FLOAT_DTYPES))}); this KV is "
                    f"{kv.dtype!r}: use a lossless codec (zstd, lz4) or none for this tier")
        esize = kv.element_bytes
        if kv.head_size <= 0 or kv.page_bytes % (esize * kv.head_size):
            return (f"codec {self.name} needs pages made of head_size vectors; page_bytes {kv.page_bytes} is not a "
                    f"multiple of head_size {kv.head_size} x {esize} bytes")
        if self.scales == "block_head":
            if kv.kv_layout not in KV_FIRST_PAGES:
                return (f"scales: block_head needs pages of (2, block_size, heads, head_size); layout "
                        f"{kv.kv_layout!r} does not say its page order: use scales: vector or layer")
            if kv.page_bytes != 2 * kv.block_size * kv.num_kv_heads * kv.head_size * esize:
                return (f"scales: block_head: page_bytes {kv.page_bytes} is not 2 x block_size x heads x "
                        f"head_size x {esize}; use scales: vector or layer")
        return None

    def max_encoded_bytes(self, raw_nbytes: int, kv: KVGeometry | None) -> int:
        if kv is None:
            raise ValueError(f"codec {self.name} needs the KV's geometry (a registered namespace)")
        elems = raw_nbytes // kv.element_bytes
        return _PREFIX.size + 4 * self._groups(elems, kv, self._pages(raw_nbytes, kv)) + elems

    # -- encode / decode -----------------------------------------------------------------------
    def encode(self, src: memoryview, dst: memoryview, kv: KVGeometry | None) -> int:
        import torch

        if kv is None or self.check_kv(kv) is not None:
            raise ValueError(f"codec {self.name} cannot encode this value: {kv and self.check_kv(kv)}")
        return self.encode_tensor(_tensor_over(src, torch.uint8), torch.frombuffer(dst, dtype=torch.uint8), kv)

    def encoded_nbytes(self, raw_nbytes: int, kv: KVGeometry) -> int:
        """The exact size of the encoding of a ``raw_nbytes``-byte value of ``kv`` (a quantized
        chunk's size depends only on its geometry)."""
        return self.max_encoded_bytes(raw_nbytes, kv)

    def encode_tensor(self, src: torch.Tensor, dst: torch.Tensor, kv: KVGeometry, *, step: int | None = _STEP,
                      check: bool = True) -> int:
        """:meth:`encode` on tensors of any device: ``src`` a flat uint8 tensor of the raw value,
        ``dst`` a flat uint8 tensor on the same device, at least :meth:`encoded_nbytes` long;
        returns the bytes written. The bytes are :meth:`encode`'s, wherever it runs (the engine
        quantizes on the GPU before copying chunks to the host, ``step=None``, ``check=False``:
        see :meth:`quantize`)."""
        import torch

        nbytes = src.numel()
        esize = kv.element_bytes
        if not esize or nbytes % (esize * kv.head_size) or nbytes % kv.num_layers:
            raise ValueError(f"a {nbytes}-byte value is not whole {kv.dtype} head vectors of {kv.num_layers} layers")
        pages = self._pages(nbytes, kv)
        elems = nbytes // esize
        groups = self._groups(elems, kv, pages)
        prefix = bytearray(_PREFIX.size)
        _PREFIX.pack_into(prefix, 0, _VERSION, _DTYPES[kv.dtype], _SCALES[self.scales], 0, kv.num_layers, pages,
                          kv.block_size, kv.num_kv_heads, kv.head_size, elems)
        head = torch.frombuffer(prefix, dtype=torch.uint8)
        # to a device through pinned memory: a pageable copy would make the host wait for the
        # device's queue once per chunk (the caching host allocator keeps it until the copy ran)
        dst[: _PREFIX.size].copy_(head if dst.device.type == "cpu" else head.pin_memory().to(dst.device, non_blocking=True))
        scales = dst[_PREFIX.size: _PREFIX.size + 4 * groups].view(torch.float32)
        q = dst[_PREFIX.size + 4 * groups: _PREFIX.size + 4 * groups + elems]
        x = src.view(getattr(torch, kv.dtype))
        self.quantize(*self._grouped(x, scales, q, kv.num_layers, pages, kv), step=step, check=check)
        return _PREFIX.size + 4 * groups + elems

    def quantize(self, x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor, *, step: int | None = _STEP,
                 check: bool = True) -> None:
        """Quantize ``x`` (float, groups along dim 0) into ``q`` (uint8, ``x``'s shape) and each
        group's scale into ``scales`` (float32, ``x``'s shape reduced over the group's dims).

        Plain torch ops on any device: the CPU codec runs it on a value's bytes in steps of
        ``step`` elements (whose temporaries stay in a core's cache); the engine's GPU path runs
        it on device tensors at once (``step=None``); both write the same bytes. fp8 of bf16 on
        the CPU runs :mod:`lmtier.codecs.kernels` instead where numba is installed (the same
        bytes again, 3-4x faster); head vectors on a CUDA device run the native library's kernel
        (:func:`lmtier.transfer._native.quantize_runs`, one launch, the same bytes) where it loads. Raises
        ``ValueError`` if ``x`` holds inf or NaN, unless ``check`` is off (the check waits for the
        device; unchecked, such values decode to NaN).
        """
        import torch

        if self._cpu_quantize(x, scales, q) or (not check and _device_runs("quantize", self.name, x, scales, q)):
            return
        dims = _reduce_dims(x)
        amax = torch.empty(scales.shape, dtype=x.dtype, device=x.device)
        for xs, ms in _steps(step, x, amax):
            # on the integer view: a float's magnitude bits (sign cleared) order like the floats
            # they encode, and integer ops are the fastest pass
            torch.amax(_magnitude_bits(xs), dim=dims, keepdim=True, out=ms.view(_int_of(ms)))
        amax32 = amax.float()
        if check and not bool(torch.isfinite(amax32).all()):
            raise ValueError("the value holds inf or NaN; stored raw")
        # amax * (1 / qmax), not amax / qmax: CUDA divides a tensor by a scalar as a product with
        # the scalar's float32 reciprocal while the CPU divides (their scales differed in the last
        # bit on an H100); the product is one float32 operation on both, so a GPU and a CPU
        # encoding of the same chunk are byte for byte equal. A scale below float32's smallest
        # normal would make 1 / scale infinite (KV that small is all zeros to the format anyway).
        scales.copy_(torch.where(amax32 > 0, (amax32 * (1.0 / self._qmax)).clamp_min_(torch.finfo(torch.float32).tiny),
                                 1.0))
        inverse = scales.reciprocal()
        for xs, inv, qs in _steps(step, x, inverse, q):
            self._quantize(xs, inv, qs)

    def decode(self, src: memoryview, dst: memoryview) -> None:
        import torch

        if src.nbytes < _PREFIX.size:
            raise ValueError("encoded value shorter than its prefix")
        self.decode_tensor(_tensor_over(src, torch.uint8), torch.frombuffer(dst, dtype=torch.uint8),
                           prefix=bytes(src[: _PREFIX.size]))

    def decode_tensor(self, src: torch.Tensor, dst: torch.Tensor, *, prefix: bytes | None = None,
                      step: int | None = _STEP) -> None:
        """:meth:`decode` on tensors of any device: ``src`` the flat uint8 encoding, ``dst`` a
        flat uint8 tensor of the raw length on the same device. ``prefix``: the encoding's first
        32 bytes as the host has them (else read from ``src``: a device-to-host copy)."""
        import torch

        nbytes = src.numel()
        if nbytes < _PREFIX.size:
            raise ValueError("encoded value shorter than its prefix")
        if prefix is None:
            prefix = bytes(src[: _PREFIX.size].cpu().numpy())
        version, dtype_code, scales_code, _, layers, pages, block, heads, head, elems = _PREFIX.unpack_from(prefix)
        dtype = {v: k for k, v in _DTYPES.items()}.get(dtype_code)
        scales_kind = {v: k for k, v in _SCALES.items()}.get(scales_code)
        if version != _VERSION or dtype is None or scales_kind is None:
            raise ValueError(f"unknown {self.name} format (version {version}, dtype {dtype_code}, scales {scales_code})")
        kv = KVGeometry(dtype, "hf_vllm_kv_first" if scales_kind == "block_head" else "", layers, block, heads,
                        head, 0)
        if elems * kv.element_bytes != dst.numel():
            raise ValueError(f"encoded {elems} elements of {dtype}, the header says {dst.numel()} bytes")
        if not head or elems % head or (layers and elems % layers):
            raise ValueError(f"encoded {elems} elements are not whole head vectors ({head}) of {layers} layers")
        groups = _groups_of(scales_kind, elems, kv, pages)
        if nbytes != _PREFIX.size + 4 * groups + elems:
            raise ValueError(f"encoded value is {nbytes} bytes, its prefix says {_PREFIX.size + 4 * groups + elems}")
        if not elems:
            return
        scales = src[_PREFIX.size: _PREFIX.size + 4 * groups].view(torch.float32)
        q = src[_PREFIX.size + 4 * groups:]
        y = dst.view(getattr(torch, dtype))
        self.dequantize(*_grouped_as(scales_kind, q, scales, y, layers, pages, kv), step=step)

    def dequantize(self, q: torch.Tensor, scales: torch.Tensor, y: torch.Tensor, *,
                   step: int | None = _STEP) -> None:
        """The inverse of :meth:`quantize`: ``y`` (float, ``q``'s shape) from codes and scales,
        on any device, in steps of ``step`` elements (None: at once)."""
        import torch

        if self._cpu_dequantize(q, scales, y) or _device_runs("dequantize", self.name, y, scales, q):
            return
        factored = scales * self._decode_factor
        for qs, ss, ys in _steps(step, q, factored, y):
            torch.mul(self._dequantize(qs), ss, out=ys)

    # -- machinery -----------------------------------------------------------------------------
    def _pages(self, nbytes: int, kv: KVGeometry) -> int:
        per_layer = nbytes // kv.num_layers
        return per_layer // kv.page_bytes if kv.page_bytes and per_layer % kv.page_bytes == 0 else 0

    def _groups(self, elems: int, kv: KVGeometry, pages: int) -> int:
        return _groups_of(self.scales, elems, kv, pages)

    def _grouped(self, x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor, layers: int, pages: int,
                 kv: KVGeometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _grouped_as(self.scales, x, scales, q, layers, pages, kv)

    def _quantize(self, x: torch.Tensor, inverse_scale: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _cpu_quantize(self, x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor) -> bool:
        """:meth:`quantize` by CPU kernels writing the same bytes, if they fit; False: the torch ops run."""
        return False

    def _cpu_dequantize(self, q: torch.Tensor, scales: torch.Tensor, y: torch.Tensor) -> bool:
        """:meth:`dequantize` by a CPU kernel writing the same bytes, if one fits; False: none."""
        return False

    def _dequantize(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _device_runs(op: str, fmt: str, values: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> bool:
    """:meth:`_Quant.quantize` / ``dequantize`` of head vectors on a CUDA device by the native
    library's kernel (one launch, the torch ops' bytes; ~0.4 ms of host launch time less per
    chunk); False where it does not apply (CPU, scales other than vector, no library)."""
    if not values.is_cuda:
        return False
    from lmtier.transfer import _native, native_ready

    if not (_native.runs_fit(values, scales.view(-1), codes) and native_ready()):
        return False
    if op == "quantize":
        _native.quantize_runs(fmt, values, scales.view(-1), codes)
    else:
        _native.dequantize_runs(fmt, codes, scales.view(-1), values)
    return True


def _groups_of(kind: str, elems: int, kv: KVGeometry, pages: int) -> int:
    if kind == "vector":
        return elems // kv.head_size
    if kind == "layer":
        return kv.num_layers
    if pages <= 0:
        raise ValueError("scales: block_head needs whole pages")
    return kv.num_layers * pages * 2 * kv.num_kv_heads


def _grouped_as(kind: str, x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor, layers: int, pages: int,
                kv: KVGeometry) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the values, their scales and their codes with the group as dim 0 (steps cut dim 0)."""
    if kind == "vector":
        return x.view(-1, kv.head_size), scales.view(-1, 1), q.view(-1, kv.head_size)
    if kind == "layer":
        return x.view(layers, -1), scales.view(layers, 1), q.view(layers, -1)
    shape = (layers * pages * 2, kv.block_size, kv.num_kv_heads, kv.head_size)
    return x.view(shape), scales.view(shape[0], 1, kv.num_kv_heads, 1), q.view(shape)


def _tensor_over(view: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``view``'s bytes without a copy, read-only memory included.

    ``torch.frombuffer`` of read-only memory (a tier's lease view, ``bytes``) warns once per
    process, which ``filterwarnings = error`` turns into a failure; a writable ctypes alias of the
    same bytes does not. Nothing writes through it: it is only read (``view`` stays referenced by
    the caller for the duration of the call).
    """
    import ctypes

    import numpy as np
    import torch

    if not view.nbytes:
        return torch.empty(0, dtype=dtype)
    if view.readonly:
        address = np.frombuffer(view, np.uint8).ctypes.data
        return torch.frombuffer((ctypes.c_uint8 * view.nbytes).from_address(address), dtype=dtype)
    return torch.frombuffer(view, dtype=dtype)


def _kernels_for(values: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> Fp8Kernels | None:
    """The fp8 CPU kernels if they take these tensors: bf16 values on the CPU, every tensor
    contiguous (what a value's codec call hands over); else None (torch's ops)."""
    import torch

    if values.device.type != "cpu" or values.dtype != torch.bfloat16 or not values.numel():
        return None
    if not (values.is_contiguous() and scales.is_contiguous() and codes.is_contiguous()):
        return None
    return fp8_kernels()


def _flat(t: torch.Tensor) -> Any:
    """A 1-D numpy view of contiguous CPU tensor ``t``'s memory."""
    return t.numpy().reshape(-1)


def _kernel_dims(x: torch.Tensor) -> tuple[int, int, int, int]:
    """``x`` (grouped as :func:`_grouped_as` makes it) as the kernels' rows x tokens x heads x width:
    a group's scale is ``[row, head]``."""
    if x.dim() == 4:  # block_head: (pages x 2, block, heads, head), scales (pages x 2, 1, heads, 1)
        return int(x.shape[0]), int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    return int(x.shape[0]), 1, 1, int(x.shape[1])  # vector, layer: (groups, elements), scales (groups, 1)


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """``|x|``'s bits as integers of ``x``'s width (sign bit cleared), a new tensor."""

    return x.view(_int_of(x)) & (0x7FFF if x.element_size() == 2 else 0x7FFFFFFF)


def _reduce_dims(xs: torch.Tensor) -> tuple[int, ...]:
    return (1, 3) if xs.dim() == 4 else (1,)


def _int_of(x: torch.Tensor) -> torch.dtype:
    import torch

    return torch.int16 if x.element_size() == 2 else torch.int32


def _steps(step: int | None, first: torch.Tensor, *more: torch.Tensor) -> Any:
    """Slices of dim 0 of ``first`` and ``more`` (same first dim) of about ``step`` elements of
    ``first`` each, at least one group; all at once for ``step=None``."""
    n = first.shape[0]
    if n == 0:
        return
    per = n if step is None else max(1, step // max(1, first[0].numel()))
    for lo in range(0, n, per):
        yield (first[lo: lo + per], *(t[lo: lo + per] for t in more))


class Fp8Codec(_Quant):
    """float8 e4m3 (max 448, 3 mantissa bits): relative precision everywhere in a group's range."""

    name = "fp8"
    codec_id = 3
    _qmax = 448.0
    _decode_factor = 256.0  # see _dequantize

    def _quantize(self, x: torch.Tensor, inverse_scale: torch.Tensor, out: torch.Tensor) -> None:
        import torch

        # one pass: the product in float32, rounded to e4m3 as it is written. |x| / scale is at
        # most 448 up to float32 rounding, which rounds back to 448 (not past it): no clamp
        torch.mul(x, inverse_scale, out=out.view(torch.float8_e4m3fn))

    def check_kv(self, kv: KVGeometry) -> str | None:
        reason = super().check_kv(kv)
        if reason is None and kv.dtype == "bfloat16":
            # the engine/manager asks this when it registers its KV (at open): build the CPU
            # kernels now (import numba, load or compile them: ~0.2-1 s holding the GIL) rather
            # than inside the first put
            fp8_kernels()
        return reason

    def _cpu_quantize(self, x: torch.Tensor, scales: torch.Tensor, q: torch.Tensor) -> bool:
        import numpy as np
        import torch

        kernels = _kernels_for(x, scales, q)
        if kernels is None:
            return False
        bits, dims = _flat(x.view(torch.int16)).view("uint16"), _kernel_dims(x)
        inverse = np.empty(scales.numel(), np.float32)
        if not kernels.scale_bf16(bits, _flat(scales), inverse, *dims):
            return False  # inf or NaN: the torch ops raise (or, unchecked, encode it as they do)
        kernels.encode_bf16(bits, inverse, _flat(q), *dims)
        return True

    def _cpu_dequantize(self, q: torch.Tensor, scales: torch.Tensor, y: torch.Tensor) -> bool:
        import torch

        kernels = _kernels_for(y, scales, q)
        if kernels is None:
            return False
        kernels.decode_bf16(_flat(q), _flat(scales), _flat(y.view(torch.int16)).view("uint16"), *_kernel_dims(q))
        return True

    def _dequantize(self, q: torch.Tensor) -> torch.Tensor:
        # torch's own fp8 -> float conversion runs at ~0.3 G elements/s per core on CPU. The bits
        # of e4m3 (s eeee mmm, bias 7) moved into float16's (s eeeee mmmmmmmmmm, bias 15) give
        # exactly the value / 256 for every finite code, subnormals included; the scales carry
        # the 256 (_decode_factor). In place on two temporaries: the codes sign-extended to
        # int16 keep the sign in bit 15, and shifted left by 7 put exponent and mantissa in place.
        import torch

        t = q.view(torch.int8).to(torch.int16)
        bits = (t << 7).bitwise_and_(0x3F80)
        return bits.bitwise_or_(t.bitwise_and_(-0x8000)).view(torch.float16)


class Int8Codec(_Quant):
    """int8 (-127..127, uniform steps of scale): exact steps near a group's maximum, coarse near 0."""

    name = "int8"
    codec_id = 4
    _qmax = 127.0

    def _quantize(self, x: torch.Tensor, inverse_scale: torch.Tensor, out: torch.Tensor) -> None:
        import torch

        # |x| / scale is at most 127 up to float32 rounding, which rounds to 127: no clamp
        out.view(torch.int8).copy_(torch.mul(x, inverse_scale).round_())

    def _dequantize(self, q: torch.Tensor) -> torch.Tensor:
        import torch

        return q.view(torch.int8).float()


def make_fp8(options: QuantOptions) -> Fp8Codec:
    return Fp8Codec(options)


def make_int8(options: QuantOptions) -> Int8Codec:
    return Int8Codec(options)
