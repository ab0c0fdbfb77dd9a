"""Paged KV caches for the transfer tests, and an independent reference for the host format.

The reference reads one page the obvious way (index the block, flatten, view bytes) so it checks
the torch fallback, which in turn is the oracle for the native path.
"""

from __future__ import annotations

import torch

from lmtier.transfer import PageLayout, chunk_nbytes, describe_layout

__all__ = ["CASES", "POISON", "layout_of", "make_cache", "poisoned_chunks", "random_tables", "ref_page"]

POISON = 0xA5

#: (kind, strided): strided caches are per-layer views of one buffer with the layers interleaved
#: per block (a block stride larger than a block), as engines that allocate one region do.
CASES = [
    ("vllm_kv_first", False),
    ("vllm_kv_first", True),
    ("vllm_blocks_first", False),
    ("vllm_blocks_first", True),
    ("flashinfer", False),
    ("flashinfer", True),
    ("mla", False),
    ("mla", True),
]


def _block_shape(kind: str, blk: int, heads: int, head: int) -> tuple[int, ...]:
    if kind == "vllm_kv_first":
        return (blk, heads, head)
    if kind == "vllm_blocks_first":
        return (heads, blk, 2 * head)
    if kind == "flashinfer":
        return (2, blk, heads, head)
    return (blk, 9 * head)  # mla: latent 576 for head 64


def make_cache(
    kind: str,
    *,
    layers: int,
    blocks: int,
    blk: int = 4,
    heads: int = 2,
    head: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    strided: bool = False,
    device: str | torch.device = "cpu",
    gen: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """One tensor per layer of the given kind, filled with random bytes."""
    inner = _block_shape(kind, blk, heads, head)
    nbytes = torch.Size(inner).numel() * torch.empty((), dtype=dtype).element_size()
    kv_dim = 2 if kind == "vllm_kv_first" else 1
    total = layers * kv_dim * blocks * nbytes
    raw = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=gen).to(device)
    buf = raw.view(dtype)
    if kind == "vllm_kv_first":
        full = (2, blocks, *inner)
        if strided:  # (blocks, layers, 2, *inner) -> per layer (2, blocks, *inner)
            big = buf.view(blocks, layers, 2, *inner)
            return [big[:, i].transpose(0, 1) for i in range(layers)]
        big = buf.view(layers, *full)
        return [big[i] for i in range(layers)]
    if strided:  # (blocks, layers, *inner) -> per layer (blocks, *inner)
        big = buf.view(blocks, layers, *inner)
        return [big[:, i] for i in range(layers)]
    big = buf.view(layers, blocks, *inner)
    return [big[i] for i in range(layers)]


def ref_page(kv_layer: torch.Tensor, kind: str, block: int) -> torch.Tensor:
    """The host bytes of one page: the block's runs back to back."""
    runs = [kv_layer[0, block], kv_layer[1, block]] if kind == "vllm_kv_first" else [kv_layer[block]]
    return torch.cat([r.contiguous().reshape(-1).view(torch.uint8).cpu() for r in runs])


def random_tables(num_blocks: int, pages: list[int], gen: torch.Generator) -> list[list[int]]:
    """Distinct random block ids, ``pages[c]`` of them for chunk c."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    out, at = [], 0
    for p in pages:
        out.append(perm[at : at + p])
        at += p
    return out


def poisoned_chunks(
    layout: PageLayout, layers: int, tables: list[list[int]], *, pin: bool = False, extra: int = 0
) -> list[torch.Tensor]:
    """Host chunks of the right size (plus ``extra`` bytes) filled with POISON."""
    return [
        torch.full((chunk_nbytes(layout, layers, len(t)) + extra,), POISON, dtype=torch.uint8, pin_memory=pin)
        for t in tables
    ]


def layout_of(kv: list[torch.Tensor], kind: str) -> PageLayout:
    return describe_layout(kv[0], kind)
