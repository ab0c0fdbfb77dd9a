"""Torch implementation of the transfer API: works on CPU and CUDA; the oracle for the native path.

Each layer is viewed as a ``(num_blocks, runs, run_bytes)`` tensor whose rows are exactly the
host pages, so a gather is one ``index_select`` per layer and chunk and a scatter one
``index_copy_``. On CUDA the pages go through a device staging buffer of one chunk (all selected
layers) and a ``non_blocking`` copy to or from the host chunk.

The views use the widest integer type (8, 4, 2 or 1 bytes) that every offset, stride and size
allows: torch copies an indexed row element by element, and byte elements made CPU gathers
30-100x slower than 8-byte ones (0.1-0.4 GB/s against ~11 GB/s).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmtier.transfer._layout import PageLayout, TransferPlan, plan_transfer

if TYPE_CHECKING:
    import torch

__all__ = ["offload", "onload"]


_WORDS = {8: "int64", 4: "int32", 2: "int16", 1: "uint8"}


def _word(kv_layers: Sequence[torch.Tensor], layout: PageLayout, host_chunks: Sequence[torch.Tensor],
          chunk_ids: Sequence[int]) -> int:
    """Widest element size (8, 4, 2, 1) dividing every byte offset, stride and size of the call."""
    runs = len(layout.run_offsets)
    run_step = layout.run_offsets[-1] if runs > 1 else layout.run_bytes
    align = layout.run_bytes | layout.block_stride | run_step
    for t in kv_layers:
        align |= int(t.storage_offset()) * t.element_size()
    for c in chunk_ids:
        align |= int(host_chunks[c].storage_offset()) * host_chunks[c].element_size()
    return next(w for w in (8, 4, 2, 1) if align % w == 0)


def _pages_view(kv_layer: torch.Tensor, layout: PageLayout, word: int) -> torch.Tensor:
    """A ``(num_blocks, runs, run_bytes / word)`` view of one layer (shares its storage)."""
    import torch

    base = torch.empty(0, dtype=torch.uint8, device=kv_layer.device)
    base.set_(kv_layer.untyped_storage())
    runs = len(layout.run_offsets)
    run_step = layout.run_offsets[-1] if runs > 1 else layout.run_bytes
    pages = base.as_strided(
        (layout.num_blocks, runs, layout.run_bytes),
        (layout.block_stride, run_step, 1),
        kv_layer.storage_offset() * kv_layer.element_size(),
    )
    return pages if word == 1 else pages.view(getattr(torch, _WORDS[word]))


def _host_view(host: torch.Tensor, plan: TransferPlan, pages: int, layout: PageLayout, word: int) -> torch.Tensor:
    """The ``[layers x pages x runs x run_bytes / word]`` view of one host chunk."""
    import torch

    n = plan.num_layers * pages * layout.page_bytes
    runs = len(layout.run_offsets)
    flat = host.reshape(-1)[:n]
    if word > 1:
        flat = flat.view(getattr(torch, _WORDS[word]))
    return flat.view(plan.num_layers, pages, runs, layout.run_bytes // word)


def _chunks(plan: TransferPlan) -> list[tuple[int, int, int]]:
    """(chunk index, first flat id, pages) of every non-empty chunk."""
    out, start = [], 0
    for c, p in enumerate(plan.pages):
        if p:
            out.append((c, start, p))
        start += p
    return out


def _stream_ctx(kv_layer: torch.Tensor, stream: Any) -> Any:
    import contextlib

    import torch

    if kv_layer.is_cuda:
        return torch.cuda.stream(stream) if stream is not None else torch.cuda.device(kv_layer.device)
    return contextlib.nullcontext()


def offload(
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    stream: Any = None,
) -> None:
    """Copy pages ``block_ids[c]`` of every (selected) layer into ``host_chunks[c]``."""
    import torch

    plan = plan_transfer(kv_layers, layout, block_ids, host_chunks, layers, distinct=False)
    kv = list(kv_layers)
    dev = kv[0].device
    chunks = _chunks(plan)
    word = _word(kv, layout, host_chunks, [c for c, _, _ in chunks])
    views = {li: _pages_view(kv[li], layout, word) for li in plan.layers}
    with _stream_ctx(kv[0], stream):
        ids = torch.tensor(plan.flat_ids, dtype=torch.int64, device=dev)
        stage = _staging(plan, layout, dev, word) if kv[0].is_cuda else None
        for c, start, p in chunks:
            host = _host_view(host_chunks[c], plan, p, layout, word)
            idx = ids[start : start + p]
            if stage is None:  # CPU: gather straight into the host chunk
                for li in plan.layers:
                    torch.index_select(views[li], 0, idx, out=host[li])
                continue
            tmp = stage[: len(plan.layers) * p * layout.page_bytes // word].view(len(plan.layers), p, *host.shape[2:])
            for i, li in enumerate(plan.layers):
                torch.index_select(views[li], 0, idx, out=tmp[i])
            if len(plan.layers) == plan.num_layers:
                host.copy_(tmp, non_blocking=True)
            else:
                for i, li in enumerate(plan.layers):
                    host[li].copy_(tmp[i], non_blocking=True)


def onload(
    kv_layers: Sequence[torch.Tensor],
    layout: PageLayout,
    block_ids: Sequence[Sequence[int]],
    host_chunks: Sequence[torch.Tensor],
    *,
    layers: Sequence[int] | None = None,
    stream: Any = None,
) -> None:
    """Copy ``host_chunks[c]`` into pages ``block_ids[c]`` of every (selected) layer."""
    import torch

    plan = plan_transfer(kv_layers, layout, block_ids, host_chunks, layers, distinct=True)
    kv = list(kv_layers)
    dev = kv[0].device
    chunks = _chunks(plan)
    word = _word(kv, layout, host_chunks, [c for c, _, _ in chunks])
    views = {li: _pages_view(kv[li], layout, word) for li in plan.layers}
    with _stream_ctx(kv[0], stream):
        ids = torch.tensor(plan.flat_ids, dtype=torch.int64, device=dev)
        stage = _staging(plan, layout, dev, word) if kv[0].is_cuda else None
        for c, start, p in chunks:
            host = _host_view(host_chunks[c], plan, p, layout, word)
            idx = ids[start : start + p]
            if stage is None:  # CPU: scatter straight from the host chunk
                for li in plan.layers:
                    views[li].index_copy_(0, idx, host[li])
                continue
            tmp = stage[: len(plan.layers) * p * layout.page_bytes // word].view(len(plan.layers), p, *host.shape[2:])
            if len(plan.layers) == plan.num_layers:
                tmp.copy_(host, non_blocking=True)
            else:
                for i, li in enumerate(plan.layers):
                    tmp[i].copy_(host[li], non_blocking=True)
            for i, li in enumerate(plan.layers):
                views[li].index_copy_(0, idx, tmp[i])


def _staging(plan: TransferPlan, layout: PageLayout, device: torch.device, word: int) -> torch.Tensor:
    """Device buffer for the largest chunk; reused chunk after chunk (stream order keeps it safe)."""
    import torch

    most = max(plan.pages, default=0)
    return torch.empty(len(plan.layers) * most * layout.page_bytes // word, dtype=getattr(torch, _WORDS[word]),
                       device=device)
