"""Move whole KV pages between a paged cache and host chunks, natively on CUDA or through torch.

The contract (both implementations):

- A layer of the cache is described by a :class:`PageLayout` (:func:`describe_layout`); all layers
  passed to one call share it. A page is one block of one layer: one or two contiguous byte runs.
- A host chunk is a contiguous ``uint8`` tensor laid out ``[layers x pages x page_bytes]``, where
  ``layers`` is ``len(kv_layers)`` (always all layers, also when ``layers=`` selects a few) and
  ``pages`` is ``len(block_ids[c])`` (a last chunk may have fewer pages). Its size is
  :func:`chunk_nbytes`; a larger tensor is fine (only the leading bytes are used).
- :func:`offload` copies cache → host, :func:`onload` host → cache; ``layers=`` restricts either
  to some layers (layer-wise pipelining). An onload's block ids must be distinct.
- CUDA caches: the call only *enqueues* work on ``stream`` (default: the current stream) and
  returns; the caller synchronises (event or stream) before reading an offloaded host chunk,
  refilling an onloaded one, or using onloaded pages from another stream. CPU caches: the call
  completes before it returns.
- The native path runs when the cache is on CUDA and every host chunk is pinned. It copies in
  one of two ways (``mode``, default ``LMTIER_TRANSFER_MODE`` or ``"auto"``): ``"mapped"``, one
  kernel reading/writing the pinned host memory directly (no device memory, lowest latency), or
  ``"staged"``, the copy engines at ``cudaMemcpy`` speed through a small device staging buffer
  (64 MiB per device for both directions by default) that a gather/scatter kernel fills and empties.
  ``"auto"`` stages large calls with long host ranges. See :mod:`lmtier.transfer._native`.
- Otherwise the torch path runs. ``LMTIER_REQUIRE_NATIVE=1`` makes a fallback raise
  :class:`~lmtier.errors.NativeUnavailableError` instead; ``LMTIER_DISABLE_NATIVE=1`` forces
  the torch path; ``LMTIER_NATIVE_LIB`` names the shared library.

Bad arguments raise :class:`~lmtier.errors.InvalidArgumentError`. Nothing is loaded or probed at
import; :func:`transfer_status` reports which path is active and why (``lmtier doctor``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmtier.errors import InvalidArgumentError, NativeUnavailableError
from lmtier.transfer._layout import LAYOUT_KINDS, PageLayout, chunk_nbytes, describe_layout

if TYPE_CHECKING:
    import torch

__all__ = [
    "LAYOUT_KINDS",
    "PageLayout",
    "chunk_nbytes",
    "describe_layout",
    "native_ready",
    "offload",
    "onload",
    "transfer_status",
]

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _fallback_reason(kv_layers: Sequence[Any], host_chunks: Sequence[Any]) -> str | None:
    """Why this call cannot take the native path, or None when it may (pinning is checked later)."""
    import torch

    if _flag("LMTIER_DISABLE_NATIVE"):
        return "LMTIER_DISABLE_NATIVE is set"
    first = kv_layers[0] if len(kv_layers) else None
    if not isinstance(first, torch.Tensor) or not first.is_cuda:
        return "the KV cache is not on a CUDA device"
    for c, host in enumerate(host_chunks):
        if isinstance(host, torch.Tensor) and host.device.type != "cpu":
            return f"host_chunks[{c}] is not a CPU tensor"
    from lmtier.transfer import _native

    return _native.unavailable_reason()


def native_ready() -> bool:
    """Whether the native library loads here and LMTIER_DISABLE_NATIVE is not set (device-side
    helpers such as the coded path's gathers and codec kernels take it then, else torch)."""
    from lmtier.transfer import _native

    return not _flag("LMTIER_DISABLE_NATIVE") and _native.unavailable_reason() is None


def _run(op: str, kv_layers: Sequence[Any], host_chunks: Sequence[Any], *args: Any, **kwargs: Any) -> None:
    reason = _fallback_reason(kv_layers, host_chunks)
    if reason is None:
        from lmtier.transfer import _native

        try:
            # The library checks that every host chunk is pinned and mapped before it launches
            # anything (one driver query per pinned allocation), so a refusal has no effect.
            getattr(_native, op)(kv_layers, *args, host_chunks, **kwargs)
            return
        except _native.HostNotMappedError as exc:
            reason = f"a host chunk is not pinned (allocate it with pin_memory=True): {exc}"
    if _flag("LMTIER_REQUIRE_NATIVE"):
        raise NativeUnavailableError(
            f"native transfer required (LMTIER_REQUIRE_NATIVE) but not usable: {reason}; "
            "fix that or unset LMTIER_REQUIRE_NATIVE to use the torch fallback"
        )
    from lmtier.transfer import _fallback

    kwargs.pop("mode", None)  # the torch path has one way of copying
    getattr(_fallback, op)(kv_layers, *args, host_chunks, **kwargs)


def offload(
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    stream: torch.cuda.Stream | None = None,
    mode: str | None = None,
) -> None:
    """Copy pages ``block_ids[c]`` of the cache into ``host_chunks[c]`` (cache → host).

    ``host_chunks[c]`` receives ``[layers x len(block_ids[c]) x page_bytes]``. With ``layers``,
    only those layers' slices of each host chunk are written. Enqueued on ``stream`` for CUDA
    caches (the caller synchronises before reading the host chunks); synchronous on CPU.
    ``mode`` picks the native copy path ("auto", "mapped", "staged"; ignored by the torch path).
    """
    _run("offload", kv_layers, host_chunks, layout, block_ids, layers=layers, stream=stream, mode=mode)


def onload(
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    stream: torch.cuda.Stream | None = None,
    mode: str | None = None,
) -> None:
    """Copy ``host_chunks[c]`` into pages ``block_ids[c]`` of the cache (host → cache).

    With ``layers``, only those layers are written (the host chunk keeps its full
    ``[layers x pages x page_bytes]`` format). Block ids must be distinct across the call.
    Enqueued on ``stream`` for CUDA caches (the caller keeps the host chunks unchanged and
    synchronises before using the pages elsewhere); synchronous on CPU.
    ``mode`` picks the native copy path ("auto", "mapped", "staged"; ignored by the torch path).
    """
    _run("onload", kv_layers, host_chunks, layout, block_ids, layers=layers, stream=stream, mode=mode)


def transfer_status() -> dict[str, Any]:
    """Which transfer path CUDA caches with pinned host chunks take here, and why.

    Keys: ``active`` ("native" or "fallback"), ``reason`` (why not native, or None),
    ``library`` (path loaded or None), ``library_version``, ``searched`` (paths tried in order),
    ``cuda_available``, ``require_native``, ``disable_native``, ``mode`` (the native copy path
    default) with ``staging_bytes_d2h``, ``staging_bytes_h2d`` and ``staged_min_bytes``. CPU
    caches always use the fallback. Loads the native library (but starts no CUDA context).
    """
    from lmtier.transfer import _native

    info: dict[str, Any] = dict(_native.library_info())
    cuda = False
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    try:
        cfg = _native.staging_config()
        info.update(mode=cfg.mode, staging_bytes_d2h=cfg.d2h_bytes, staging_bytes_h2d=cfg.h2d_bytes,
                    staged_min_bytes=cfg.min_bytes)
    except InvalidArgumentError as exc:
        info.update(mode=None, mode_error=str(exc))
    reason = info.pop("error")
    if _flag("LMTIER_DISABLE_NATIVE"):
        reason = "LMTIER_DISABLE_NATIVE is set"
    elif reason is None and not cuda:
        reason = "torch sees no CUDA device"
    info.update(
        active="native" if reason is None else "fallback",
        reason=reason,
        cuda_available=cuda,
        require_native=_flag("LMTIER_REQUIRE_NATIVE"),
        disable_native=_flag("LMTIER_DISABLE_NATIVE"),
    )
    return info
