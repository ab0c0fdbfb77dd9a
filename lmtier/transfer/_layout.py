"""Page layouts: how one layer of a paged KV cache splits into per-block byte runs.

A *page* is everything one block holds for one layer. Per layer and block it is one or two
contiguous byte runs at a fixed block stride; the host keeps a page as those runs back to back.
This module describes a layer tensor that way and checks the arguments every transfer shares,
so the native and the torch path accept exactly the same calls and raise the same errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmtier.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = [
    "LAYOUT_KINDS",
    "PageLayout",
    "TransferPlan",
    "chunk_nbytes",
    "describe_layout",
    "plan_transfer",
]

#: Layout kinds and the tensor shape each describes (per layer).
LAYOUT_KINDS: dict[str, str] = {
    "vllm_kv_first": "(2, num_blocks, block_size, kv_heads, head_size): K and V are two runs",
    "vllm_blocks_first": "(num_blocks, ...) e.g. (N, kv_heads, block_size, 2*head_size): one run",
    "flashinfer": "(num_blocks, 2, block_size, kv_heads, head_size): one run (two if strided)",
    "mla": "(num_blocks, block_size, latent_dim) e.g. latent_dim 576: one run",
}


@dataclass(frozen=True)
class PageLayout:
    """One layer's paging, in bytes; every layer of a transfer must share it.

    ``run_offsets[r] + block_id * block_stride`` is where run ``r`` of a block starts, relative
    to the layer tensor's ``data_ptr()``; each run is ``run_bytes`` long. On the host a page is
    the runs in order, ``page_bytes`` in all.
    """

    kind: str
    num_blocks: int
    block_stride: int
    run_offsets: tuple[int, ...]
    run_bytes: int

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (all runs of one block of one layer)."""
        return len(self.run_offsets) * self.run_bytes


def chunk_nbytes(layout: PageLayout, num_layers: int, pages: int) -> int:
    """Bytes of a host chunk of ``pages`` pages over ``num_layers`` layers.

    The host chunk is laid out ``[layers x pages x page_bytes]``.
    """
    if num_layers < 0 or pages < 0:
        raise InvalidArgumentError(f"num_layers and pages must be >= 0, got {num_layers} and {pages}")
    return num_layers * pages * layout.page_bytes


def _inner_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """True when the dims form one dense row-major run (size-1 dims may have any stride)."""
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride), strict=True):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def describe_layout(kv_layer: torch.Tensor, kind: str) -> PageLayout:
    """Describe one layer of a paged KV cache as a :class:`PageLayout`.

    ``kind`` is a key of :data:`LAYOUT_KINDS`. The block dimension may have any stride (layers
    that are views of one big buffer are fine); the dims inside one block must be dense.
    Raises :class:`InvalidArgumentError` naming the expected shape when the tensor does not fit.
    """
    if kind not in LAYOUT_KINDS:
        raise InvalidArgumentError(f"unknown layout kind {kind!r}; use one of {sorted(LAYOUT_KINDS)}")
    shape = tuple(int(s) for s in kv_layer.shape)
    stride = tuple(int(s) for s in kv_layer.stride())
    esize = kv_layer.element_size()
    offsets: tuple[int, ...]
    want = LAYOUT_KINDS[kind]

    def bad(why: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"kv layer of shape {shape} strides {stride} does not fit layout {kind!r} {want}: {why}"
        )

    if kind == "vllm_kv_first":
        if len(shape) < 3 or shape[0] != 2:
            raise bad("expected at least 3 dims with a leading 2")
        num_blocks, bdim, inner = shape[1], 1, 2
        offsets = (0, stride[0] * esize)
    elif kind == "flashinfer":
        if len(shape) < 3 or shape[1] != 2:
            raise bad("expected at least 3 dims with 2 at dim 1")
        num_blocks, bdim = shape[0], 0
        # K and V side by side in a dense block are one run; a strided K/V dim makes two.
        if _inner_contiguous(shape[1:], stride[1:]):
            inner, offsets = 1, (0,)
        else:
            inner, offsets = 2, (0, stride[1] * esize)
    elif kind == "mla":
        if len(shape) != 3:
            raise bad("expected 3 dims")
        num_blocks, bdim, inner, offsets = shape[0], 0, 1, (0,)
    else:
        if len(shape) < 2:
            raise bad("expected at least 2 dims")
        num_blocks, bdim, inner, offsets = shape[0], 0, 1, (0,)

    if not _inner_contiguous(shape[inner:], stride[inner:]):
        raise bad(f"dims {inner}.. (one block) must be dense; make the cache contiguous")
    run_bytes = math.prod(shape[inner:]) * esize
    block_stride = stride[bdim] * esize if num_blocks > 1 else run_bytes
    if num_blocks < 1 or run_bytes < 1:
        raise bad("empty cache")
    layout = PageLayout(kind, num_blocks, block_stride, offsets, run_bytes)
    if not _runs_disjoint(layout):
        raise bad("blocks overlap one another")
    return layout


def _runs_disjoint(layout: PageLayout) -> bool:
    """True when no two runs of any two blocks share a byte (so onload is well defined)."""
    n, bs, rb = layout.num_blocks, layout.block_stride, layout.run_bytes
    if n > 1 and bs < rb:
        return False
    if len(layout.run_offsets) == 1:
        return True
    off = layout.run_offsets[1]
    span = (n - 1) * bs + rb
    if off >= span:  # the second run set starts after the first ends
        return True
    if n == 1:
        return False
    # Interleaved: each second run must sit in the gap between two first runs.
    return rb <= off % bs <= bs - rb


@dataclass(frozen=True)
class TransferPlan:
    """Checked, normalised arguments of one transfer (shared by both implementations)."""

    layers: tuple[int, ...]  # selected layer indices, in call order
    num_layers: int  # all layers: the host chunk format's first dimension
    pages: tuple[int, ...]  # pages per chunk
    flat_ids: list[int]  # block ids of all chunks, concatenated


def plan_transfer(
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    layers: Sequence[int] | None,
    *,
    distinct: bool,
) -> TransferPlan:
    """Validate a transfer's arguments; raise :class:`InvalidArgumentError` on any misuse.

    ``distinct`` asks that no block id repeat (an onload writing one block twice is a bug).
    """
    import torch

    if not isinstance(layout, PageLayout):
        raise InvalidArgumentError(f"layout must be a PageLayout, got {type(layout).__name__}")
    kv = list(kv_layers)
    if not kv:
        raise InvalidArgumentError("kv_layers is empty; pass one tensor per layer")
    first = kv[0]
    if not isinstance(first, torch.Tensor):
        raise InvalidArgumentError(f"kv_layers must hold tensors, got {type(first).__name__}")
    got = describe_layout(first, layout.kind)
    if got != layout:
        raise InvalidArgumentError(
            f"layer 0 is described by {got}, not the given {layout}; "
            "describe the cache you pass with describe_layout()"
        )
    shape, stride, dtype, device = first.shape, first.stride(), first.dtype, first.device
    for i, t in enumerate(kv[1:], 1):
        if not (
            isinstance(t, torch.Tensor)
            and t.shape == shape
            and t.stride() == stride
            and t.dtype == dtype
            and t.device == device
        ):
            raise InvalidArgumentError(
                f"layer {i} differs from layer 0 in shape, stride, dtype or device; "
                "all layers of one transfer share one layout"
            )
    num_layers = len(kv)
    if layers is None:
        sel = tuple(range(num_layers))
    else:
        sel = tuple(int(x) for x in layers)
        if any(not 0 <= x < num_layers for x in sel) or len(set(sel)) != len(sel):
            raise InvalidArgumentError(f"layers {list(sel)} must be distinct indices in [0, {num_layers})")
    if isinstance(block_ids, torch.Tensor) or len(block_ids) != len(host_chunks):
        raise InvalidArgumentError(
            "block_ids must be a sequence with one block-id list per host chunk "
            f"({len(host_chunks)} host chunks)"
        )
    per_chunk = [ids.tolist() if isinstance(ids, torch.Tensor) else list(ids) for ids in block_ids]
    pages = tuple(len(ids) for ids in per_chunk)
    flat = [int(x) for ids in per_chunk for x in ids]
    if flat and (min(flat) < 0 or max(flat) >= layout.num_blocks):
        raise InvalidArgumentError(
            f"block ids must lie in [0, {layout.num_blocks}); got {min(flat)}..{max(flat)}"
        )
    if distinct and len(set(flat)) != len(flat):
        raise InvalidArgumentError("block ids repeat; an onload writes each block at most once")
    for c, (host, p) in enumerate(zip(host_chunks, pages, strict=True)):
        if not isinstance(host, torch.Tensor) or host.dtype != torch.uint8:
            raise InvalidArgumentError(f"host_chunks[{c}] must be a uint8 tensor")
        if not host.is_contiguous():
            raise InvalidArgumentError(f"host_chunks[{c}] must be contiguous")
        need = num_layers * p * layout.page_bytes
        if host.numel() < need:
            raise InvalidArgumentError(
                f"host_chunks[{c}] holds {host.numel()} bytes; {p} pages of {num_layers} layers "
                f"need {need} (use chunk_nbytes())"
            )
    return TransferPlan(sel, num_layers, pages, flat)
