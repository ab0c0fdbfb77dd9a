"""ctypes binding of ``liblmtier_transfer.so`` (see ``native/include/lmtier_transfer.h``).

The library is found, on first use, at ``$LMTIER_NATIVE_LIB``, then ``native/build/`` of the
source checkout, then next to this module. Loading it starts no CUDA context. Every C status
code maps to one :mod:`lmtier.errors` type in :func:`_raise`.
"""

from __future__ import annotations

import ctypes
import functools
import os
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
    "FLAG_TRUST_UVA",
    "HostNotMappedError",
    "LaunchOptions",
    "library_info",
    "offload",
    "onload",
    "unavailable_reason",
]

#: The C ABI this binding speaks (``lmt_abi_version()`` must return it).
ABI_VERSION = 1
LIB_NAME = "liblmtier_transfer.so"

_D2H, _H2D = 0, 1
#: LaunchOptions.flags bits (lmtier_transfer.h): trust UVA host pointers; ordinary cache hints.
FLAG_TRUST_UVA, FLAG_PLAIN_ACCESS = 1, 2


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
}


class HostNotMappedError(InvalidArgumentError):
    """A host chunk is not pinned memory the GPU can map (the torch path can still copy it)."""


_ERRORS: dict[int, type[LmtierError]] = {
    1: InvalidArgumentError,  # LMT_ERR_INVALID_ARGUMENT
    2: HostNotMappedError,  # LMT_ERR_HOST_NOT_MAPPED
    3: NativeUnavailableError,  # LMT_ERR_NO_DEVICE
    4: NativeUnavailableError,  # LMT_ERR_UNSUPPORTED_DEVICE
    5: LmtierError,  # LMT_ERR_CUDA
    6: NotSupportedError,  # LMT_ERR_NOT_SUPPORTED
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


def _copy(
    direction: int,
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    layers: Sequence[int] | None,
    stream: Any,
    options: LaunchOptions | None,
) -> None:
    import torch

    plan = plan_transfer(kv_layers, layout, block_ids, host_chunks, layers, distinct=direction == _H2D)
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
    status = lib.lmt_copy_pages(
        direction,
        ctypes.byref(desc),
        layer_ptrs,
        n,
        sel,
        len(plan.layers),
        ids,
        pages,
        hosts,
        c,
        device,
        handle,
        opts,
    )
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
) -> None:
    """Native cache → pinned host copy; one kernel launch enqueued on ``stream``."""
    _copy(_D2H, kv_layers, layout, block_ids, host_chunks, layers, stream, options)


def onload(
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    stream: Any = None,
    options: LaunchOptions | None = None,
) -> None:
    """Native pinned host → cache copy; one kernel launch enqueued on ``stream``."""
    _copy(_H2D, kv_layers, layout, block_ids, host_chunks, layers, stream, options)
