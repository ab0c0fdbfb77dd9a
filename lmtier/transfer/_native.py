"""ctypes binding of ``liblmtier_transfer.so`` (see ``native/include/lmtier_transfer.h``).

The library is found, on first use, at ``$LMTIER_NATIVE_LIB``, then ``native/build/`` of the
source checkout, then next to this module. Loading it starts no CUDA context. Every C status
code maps to one :mod:`lmtier.errors` type in :func:`_raise`.

Two copy paths (``mode``):

- ``"mapped"``: one kernel reads/writes the pinned host chunks through their mapped addresses; no
  device memory, lowest latency, but SM accesses reach PCIe as 128-byte packets (~91-94% of the
  link one way, ~77% both ways on an H100).
- ``"staged"``: the copy engines carry the bytes (cudaMemcpy's speed) through a small device
  staging buffer per device and direction, which a gather/scatter kernel fills or empties.
  ``LMTIER_STAGING_D2H_BYTES`` / ``LMTIER_STAGING_H2D_BYTES`` size the buffers (default 24 and
  40 MiB: 64 MiB in all; ``LMTIER_STAGING_BYTES`` sets both),
  ``LMTIER_STAGING_SLOTS`` (default 2) and ``LMTIER_STAGING_STREAMS`` (default 1) its pipeline
  (the defaults measured fastest: few, large copies).
- ``"auto"`` (default; ``LMTIER_TRANSFER_MODE`` overrides): staged for calls moving at least
  ``LMTIER_STAGED_MIN_BYTES`` (default 4 MiB) in contiguous host ranges of at least
  ``LMTIER_STAGED_MIN_RUN_BYTES`` on average (default 256 KiB; one layer of a chunk is one
  range in a per-layer call), mapped otherwise, and mapped whenever a staging buffer cannot be
  allocated.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtier.errors import (
    InvalidArgumentError,
    LmtierError,
    NativeUnavailableError,
    NotSupportedError,
)
from lmtier.transfer._layout import PageLayout, plan_transfer

if TYPE_CHECKING:
    import torch

__all__ = [
    "ABI_VERSION",
    "FLAG_PLAIN_ACCESS",
    "FLAG_SINGLE_COPIES",
    "FLAG_TRUST_UVA",
    "MODES",
    "HostNotMappedError",
    "LaunchOptions",
    "StagingConfig",
    "library_info",
    "dequantize_runs",
    "offload",
    "onload",
    "quantize_runs",
    "staging_config",
    "staging_in_use",
    "unavailable_reason",
]

log = logging.getLogger("lmtier.transfer")

#: The C ABI this binding speaks (``lmt_abi_version()`` must return it).
ABI_VERSION = 3
#: Copy paths: see the module docstring.
MODES = ("auto", "mapped", "staged")
LIB_NAME = "liblmtier_transfer.so"

_D2H, _H2D = 0, 1
#: LaunchOptions.flags bits (lmtier_transfer.h): trust UVA host pointers; ordinary cache hints;
#: staged copies one cudaMemcpyAsync at a time instead of batched (the last two for comparison).
FLAG_TRUST_UVA, FLAG_PLAIN_ACCESS, FLAG_SINGLE_COPIES = 1, 2, 4


class _Layout(ctypes.Structure):
    _fields_ = [
        ("num_blocks", ctypes.c_uint64),
        ("block_stride", ctypes.c_uint64),
        ("run_offsets", ctypes.c_uint64 * 2),
        ("run_bytes", ctypes.c_uint64),
        ("num_runs", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class _Opts(ctypes.Structure):
    _fields_ = [
        ("threads", ctypes.c_uint32),
        ("max_ctas", ctypes.c_uint32),
        ("unroll", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


_u64p = ctypes.POINTER(ctypes.c_uint64)
_i32p = ctypes.POINTER(ctypes.c_int32)

# The one argtypes table: (restype, argtypes) per exported function.
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "lmt_abi_version": (ctypes.c_int, []),
    "lmt_version_string": (ctypes.c_char_p, []),
    "lmt_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "lmt_last_error": (ctypes.c_char_p, []),
    "lmt_device_count": (ctypes.c_int, [ctypes.POINTER(ctypes.c_int)]),
    "lmt_copy_pages": (
        ctypes.c_int,
        [
            ctypes.c_int,  # direction: 0 device->host, 1 host->device
            ctypes.POINTER(_Layout),
            _u64p,  # layer_ptrs[num_layers]
            ctypes.c_int32,  # num_layers (host chunk format)
            _i32p,  # layers[num_selected] or NULL
            ctypes.c_int32,  # num_selected
            _i32p,  # block_ids, concatenated
            _i32p,  # chunk_pages[num_chunks]
            _u64p,  # host_ptrs[num_chunks]
            ctypes.c_int32,  # num_chunks
            ctypes.c_int32,  # device
            ctypes.c_void_p,  # cudaStream_t
            ctypes.POINTER(_Opts),  # or NULL
        ],
    ),
    "lmt_staging_create": (
        ctypes.c_int,
        [ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_void_p)],
    ),
    "lmt_staging_destroy": (ctypes.c_int, [ctypes.c_void_p]),
    # format, dtype, values, runs, run_elems, scales, codes, device, stream
    "lmt_quantize_runs": (
        ctypes.c_int,
        [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p,
         ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p],
    ),
    # format, dtype, codes, scales, runs, run_elems, values, device, stream
    "lmt_dequantize_runs": (
        ctypes.c_int,
        [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32,
         ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p],
    ),
    "lmt_staging_slot_bytes": (ctypes.c_uint64, [ctypes.c_void_p]),
}
# lmt_copy_pages_staged: lmt_copy_pages's arguments plus the staging handle.
_SIGNATURES["lmt_copy_pages_staged"] = (ctypes.c_int, [*_SIGNATURES["lmt_copy_pages"][1], ctypes.c_void_p])


class HostNotMappedError(InvalidArgumentError):
    """A host chunk is not pinned memory the GPU can map (the torch path can still copy it)."""


_ERRORS: dict[int, type[LmtierError]] = {
    1: InvalidArgumentError,  # LMT_ERR_INVALID_ARGUMENT
    2: HostNotMappedError,  # LMT_ERR_HOST_NOT_MAPPED
    3: NativeUnavailableError,  # LMT_ERR_NO_DEVICE
    4: NativeUnavailableError,  # LMT_ERR_UNSUPPORTED_DEVICE
    5: LmtierError,  # LMT_ERR_CUDA
    6: NotSupportedError,  # LMT_ERR_NOT_SUPPORTED
    7: LmtierError,  # LMT_ERR_OUT_OF_MEMORY
}


@dataclass(frozen=True)
class LaunchOptions:
    """Kernel tuning (0 = the library's default): threads per CTA, CTA cap, loads in flight."""

    threads: int = 0
    max_ctas: int = 0
    unroll: int = 0
    flags: int = 0


@dataclass(frozen=True)
class _Loaded:
    lib: ctypes.CDLL | None
    path: str | None
    version: str | None
    error: str | None
    searched: tuple[str, ...]


def _candidates(env: str | None) -> list[Path]:
    here = Path(__file__).resolve().parent
    paths = [Path(env)] if env else []
    paths.append(here.parents[1] / "native" / "build" / LIB_NAME)  # source checkout
    paths.append(here / LIB_NAME)  # installed next to the package
    return paths


@functools.cache
def _load(env: str | None) -> _Loaded:
    # Cached per LMTIER_NATIVE_LIB value: dlopen once, and a failure is not retried per call.
    searched = tuple(str(p) for p in _candidates(env))
    errors = []
    for path in _candidates(env):
        if not path.is_file():
            errors.append(f"{path}: not found")
            continue
        try:
            lib = ctypes.CDLL(str(path))
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except (OSError, AttributeError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        abi = lib.lmt_abi_version()
        if abi != ABI_VERSION:
            errors.append(f"{path}: ABI {abi}, expected {ABI_VERSION} (rebuild: make native)")
            continue
        version = lib.lmt_version_string().decode()
        return _Loaded(lib, str(path), version, None, searched)
    why = "; ".join(errors) + " — build it with `make native` or set LMTIER_NATIVE_LIB"
    return _Loaded(None, None, None, why, searched)


def _loaded() -> _Loaded:
    return _load(os.environ.get("LMTIER_NATIVE_LIB") or None)


def unavailable_reason() -> str | None:
    """Why the native library cannot be used (None when it loads)."""
    return _loaded().error


def library_info() -> dict[str, Any]:
    """Path, version, search order and load error of the native library (loads it)."""
    got = _loaded()
    return {
        "library": got.path,
        "library_version": got.version,
        "searched": list(got.searched),
        "error": got.error,
    }


def _library() -> ctypes.CDLL:
    got = _loaded()
    if got.lib is None:
        raise NativeUnavailableError(f"native transfer library unavailable: {got.error}")
    return got.lib


def _raise(lib: ctypes.CDLL, status: int) -> None:
    detail = (lib.lmt_last_error() or b"").decode(errors="replace")
    name = (lib.lmt_status_string(status) or b"?").decode()
    raise _ERRORS.get(status, LmtierError)(f"native transfer failed ({name}): {detail}")


@dataclass(frozen=True)
class StagingConfig:
    """Sizes of the staged path, read from the environment (see the module docstring)."""

    # 64 MiB in all; host->device gains more from longer copies (measured: benchmarks/transfer.py)
    d2h_bytes: int = 24 << 20
    h2d_bytes: int = 40 << 20
    slots: int = 2
    streams: int = 1
    min_bytes: int = 4 << 20
    min_run_bytes: int = 512 << 10
    mode: str = "auto"

    def bytes_for(self, direction: int) -> int:
        """Staging bytes of one direction (0: device to host, 1: host to device)."""
        return self.d2h_bytes if direction == _D2H else self.h2d_bytes


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgumentError(f"{name}={raw!r} is not an integer") from None


def staging_config() -> StagingConfig:
    """The staged path's settings from ``LMTIER_STAGING_*`` / ``LMTIER_TRANSFER_MODE``."""
    mode = os.environ.get("LMTIER_TRANSFER_MODE", "").strip().lower() or "auto"
    if mode not in MODES:
        raise InvalidArgumentError(f"LMTIER_TRANSFER_MODE={mode!r}; use one of {', '.join(MODES)}")
    d = StagingConfig()
    both = _env_int("LMTIER_STAGING_BYTES", -1)
    return StagingConfig(
        d2h_bytes=_env_int("LMTIER_STAGING_D2H_BYTES", both if both >= 0 else d.d2h_bytes),
        h2d_bytes=_env_int("LMTIER_STAGING_H2D_BYTES", both if both >= 0 else d.h2d_bytes),
        slots=_env_int("LMTIER_STAGING_SLOTS", d.slots),
        streams=_env_int("LMTIER_STAGING_STREAMS", d.streams),
        min_bytes=_env_int("LMTIER_STAGED_MIN_BYTES", d.min_bytes),
        min_run_bytes=_env_int("LMTIER_STAGED_MIN_RUN_BYTES", d.min_run_bytes),
        mode=mode,
    )


class _Stagings:
    """Staging buffers of the loaded library, one per (device, direction, size, slots, streams),
    made on first use.

    A buffer that cannot be made is remembered as ``None`` (logged once): its calls go mapped.
    Buffers live as long as the process (freeing device memory at interpreter exit races the
    CUDA context's own teardown).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # keyed by what shapes a buffer: a new mode or threshold must not allocate another one
        self._handles: dict[tuple[str, int, int, int, int, int], int | None] = {}

    def get(self, lib: ctypes.CDLL, path: str, device: int, direction: int, cfg: StagingConfig) -> int | None:
        nbytes = cfg.bytes_for(direction)
        key = (path, device, direction, nbytes, cfg.slots, cfg.streams)
        with self._lock:
            if key in self._handles:
                return self._handles[key]
            out = ctypes.c_void_p()
            status = lib.lmt_staging_create(device, nbytes, cfg.slots, cfg.streams, ctypes.byref(out))
            handle: int | None = out.value if status == 0 else None
            if handle is None:
                detail = (lib.lmt_last_error() or b"").decode(errors="replace")
                log.warning("lmtier transfer: no %d-byte staging buffer on cuda:%d (%s); copies there "
                            "take the mapped path", nbytes, device, detail)
            self._handles[key] = handle
            return handle

    def in_use(self) -> int:
        with self._lock:
            return sum(k[3] for k, h in self._handles.items() if h is not None)


@functools.cache
def _stagings() -> _Stagings:
    return _Stagings()


def staging_in_use() -> int:
    """Bytes of device staging memory this process has allocated for staged copies."""
    return _stagings().in_use()


def _worth_staging(pages: Sequence[int], layers: Sequence[int], page_bytes: int, cfg: StagingConfig) -> bool:
    """Auto mode: stage calls that are large and whose host ranges are long enough for the copy
    engines (each chunk's run of consecutive selected layers is one contiguous copy)."""
    total = sum(pages) * len(layers) * page_bytes
    if total < cfg.min_bytes:
        return False
    ordered = sorted(layers)
    groups = 1 + sum(1 for a, b in itertools.pairwise(ordered) if b != a + 1)
    runs = sum(1 for p in pages if p) * groups
    return total >= cfg.min_run_bytes * runs


def _copy(
    direction: int,
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    layers: Sequence[int] | None,
    stream: Any,
    options: LaunchOptions | None,
    mode: str | None,
) -> None:
    import torch

    plan = plan_transfer(kv_layers, layout, block_ids, host_chunks, layers, distinct=direction == _H2D)
    cfg = staging_config()
    mode = (mode or cfg.mode).lower()
    if mode not in MODES:
        raise InvalidArgumentError(f"mode {mode!r}; use one of {', '.join(MODES)}")
    lib = _library()
    kv = list(kv_layers)
    if not kv[0].is_cuda:
        raise InvalidArgumentError("the native path needs a CUDA KV cache; use the fallback")
    device = kv[0].device.index
    if device is None:
        device = torch.cuda.current_device()
    if stream is None:
        handle = torch.cuda.current_stream(device).cuda_stream
    else:
        handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
    desc = _Layout(
        layout.num_blocks,
        layout.block_stride,
        (ctypes.c_uint64 * 2)(*layout.run_offsets, *([0] * (2 - len(layout.run_offsets)))),
        layout.run_bytes,
        len(layout.run_offsets),
        0,
    )
    n, c = len(kv), len(plan.pages)
    layer_ptrs = (ctypes.c_uint64 * n)(*(t.data_ptr() for t in kv))
    all_layers = len(plan.layers) == n and plan.layers == tuple(range(n))
    sel = None if all_layers else (ctypes.c_int32 * len(plan.layers))(*plan.layers)
    ids = (ctypes.c_int32 * len(plan.flat_ids))(*plan.flat_ids)
    pages = (ctypes.c_int32 * c)(*plan.pages)
    hosts = (ctypes.c_uint64 * c)(*(h.data_ptr() for h in host_chunks))
    opts = None
    if options is not None:
        opts = ctypes.byref(_Opts(options.threads, options.max_ctas, options.unroll, options.flags))
    args = (direction, ctypes.byref(desc), layer_ptrs, n, sel, len(plan.layers), ids, pages, hosts, c,
            device, handle, opts)
    staging = None
    if mode == "staged" or (mode == "auto" and _worth_staging(plan.pages, plan.layers, layout.page_bytes, cfg)):
        path = _loaded().path
        assert path is not None
        staging = _stagings().get(lib, path, device, direction, cfg)
        if staging is not None and layout.page_bytes > lib.lmt_staging_slot_bytes(staging):
            staging = None  # a page must fit one slot; such layouts take the kernel alone
    status = lib.lmt_copy_pages_staged(*args, staging) if staging is not None else lib.lmt_copy_pages(*args)
    if status:
        _raise(lib, status)


def offload(
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    stream: Any = None,
    options: LaunchOptions | None = None,
    mode: str | None = None,
) -> None:
    """Native cache → pinned host copy enqueued on ``stream`` (``mode``: see the module docstring)."""
    _copy(_D2H, kv_layers, layout, block_ids, host_chunks, layers, stream, options, mode)


def onload(
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    stream: Any = None,
    options: LaunchOptions | None = None,
    mode: str | None = None,
) -> None:
    """Native pinned host → cache copy enqueued on ``stream`` (``mode``: see the module docstring)."""
    _copy(_H2D, kv_layers, layout, block_ids, host_chunks, layers, stream, options, mode)


# -- the lossy codecs' kernels (lmtier.codecs.quant, scales: vector) --------------------------------
_CODE_FORMATS = {"fp8": 0, "int8": 1}  # LMT_CODE_FP8_E4M3, LMT_CODE_INT8
_CODE_DTYPES = {"bfloat16": 1, "float16": 2, "float32": 3}  # LMT_DTYPE_*


def runs_fit(values: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether :func:`quantize_runs` / :func:`dequantize_runs` take these tensors: CUDA,
    contiguous, ``values`` a ``(runs, run_elems)`` float tensor of a head vector per row
    (``run_elems`` at most 4096: a warp reduces a run), ``scales`` one float32 per run."""
    import torch

    return (values.is_cuda and values.dim() == 2 and 0 < values.shape[1] <= 4096
            and str(values.dtype).removeprefix("torch.") in _CODE_DTYPES
            and values.is_contiguous() and codes.is_contiguous() and scales.is_contiguous()
            and scales.dtype == torch.float32 and scales.numel() == values.shape[0]
            and codes.numel() == values.numel() and codes.device == values.device == scales.device)


def quantize_runs(fmt: str, values: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> None:
    """The codec's quantize of each row of ``values`` (see :func:`runs_fit`) into one scale per row
    and one code byte per element, enqueued on the current stream: the bytes of the torch ops."""
    _run_codes("lmt_quantize_runs", fmt, values, values.data_ptr(), scales.data_ptr(), codes.data_ptr())


def dequantize_runs(fmt: str, codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor) -> None:
    """The inverse of :func:`quantize_runs`, into ``values`` (enqueued on the current stream)."""
    _run_codes("lmt_dequantize_runs", fmt, values, codes.data_ptr(), scales.data_ptr(), values.data_ptr())


def _run_codes(name: str, fmt: str, values: torch.Tensor, first: int, second: int, third: int) -> None:
    import torch

    runs, n = values.shape
    device = values.device.index if values.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    dtype = _CODE_DTYPES[str(values.dtype).removeprefix("torch.")]
    lib = _library()
    if name == "lmt_quantize_runs":  # values, runs, n, scales, codes
        status = lib.lmt_quantize_runs(_CODE_FORMATS[fmt], dtype, first, runs, n, second, third, device, stream)
    else:  # codes, scales, runs, n, values
        status = lib.lmt_dequantize_runs(_CODE_FORMATS[fmt], dtype, first, second, runs, n, third, device, stream)
    if status:
        _raise(lib, status)
