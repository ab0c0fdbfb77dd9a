"""Quantize KV on the cache's device before it crosses to the host, dequantize after it crosses back.

A lossy value codec (:mod:`lmtier.codecs.quant`: fp8, int8) halves a chunk. Run on the host's
worker threads it saves the tiers' bytes; run on the GPU it also halves the PCIe bytes of every
offload and onload, and the host (the RAM tier included) holds twice the chunks. These two calls
are :func:`~lmtier.transfer.offload` and :func:`~lmtier.transfer.onload` with the codec in between:

- :func:`offload_coded` gathers a chunk's pages into a device buffer in the host chunk format
  (``[layers x pages x page_bytes]``, what :func:`~lmtier.transfer.offload` would write), encodes
  it there (:meth:`~lmtier.codecs.quant.Fp8Codec.encode_tensor`, the whole chunk at once) and
  copies the encoding to its host chunk;
- :func:`onload_coded` copies an encoding to the device, decodes it there and scatters the pages.

**The bytes are the CPU codec's.** The encoding is exactly what the codec's
:meth:`~lmtier.codecs.ValueCodec.encode` makes of the raw chunk on the host (the same torch ops:
test_coded_transfer.py checks it on CPU caches, where these functions run the same code), so
either side decodes what the other encoded. Its size depends only on the chunk's geometry
(:meth:`~lmtier.codecs.quant.Fp8Codec.encoded_nbytes`).

Streams as for the plain calls: on CUDA everything is enqueued on ``stream`` (default: the
current stream) and the call returns; the caller synchronises before reading an offloaded host
chunk or refilling an onloaded one. Device temporaries (one raw and one encoded chunk at a time)
come from torch's caching allocator on that stream. No check for inf/NaN on the device (it would
make every chunk wait for the GPU): such KV decodes to NaN where the CPU codec would refuse it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmtier.errors import InvalidArgumentError
from lmtier.transfer._layout import PageLayout, chunk_nbytes

if TYPE_CHECKING:
    import torch

    from lmtier.codecs.base import KVGeometry

__all__ = ["encoded_nbytes", "offload_coded", "onload_coded"]

_PREFIX_BYTES = 32  # the quantizing codecs' own header (lmtier.codecs.quant)


def encoded_nbytes(codec: Any, kv: KVGeometry, layout: PageLayout, num_layers: int, pages: int) -> int:
    """Bytes of the encoding of a chunk of ``pages`` pages of ``num_layers`` layers."""
    return int(codec.encoded_nbytes(chunk_nbytes(layout, num_layers, pages), kv))


def offload_coded(kv_layers: Sequence[torch.Tensor], layout: PageLayout, block_ids: Sequence[Sequence[int]],
                  host_chunks: Sequence[torch.Tensor], codec: Any, kv: KVGeometry, *,
                  stream: Any = None) -> list[int]:
    """Encode pages ``block_ids[c]`` of every layer into ``host_chunks[c]`` (flat uint8, at least
    :func:`encoded_nbytes` long; pinned for an asynchronous copy on CUDA); the bytes written each."""
    import torch

    # a gather into the cache's own device memory: the torch path (the native kernels move
    # pages between the device and pinned host memory)
    from lmtier.transfer._fallback import offload

    _check(kv_layers, block_ids, host_chunks)
    dev = kv_layers[0].device
    out: list[int] = []
    with _on(kv_layers[0], stream):
        for ids, host in zip(block_ids, host_chunks, strict=True):
            raw_nbytes = chunk_nbytes(layout, len(kv_layers), len(ids))
            n = codec.encoded_nbytes(raw_nbytes, kv)
            if host.numel() < n:
                raise InvalidArgumentError(f"a host chunk of {host.numel()} bytes cannot hold a {n}-byte encoding")
            if dev.type == "cpu":  # gather, then encode straight into the host chunk
                raw = torch.empty(raw_nbytes, dtype=torch.uint8)
                offload(kv_layers, layout, [ids], [raw])
                out.append(codec.encode_tensor(raw, host[:n], kv, check=True))
                continue
            raw = torch.empty(raw_nbytes, dtype=torch.uint8, device=dev)
            offload(kv_layers, layout, [ids], [raw], stream=stream)  # a gather on the device
            coded = torch.empty(n, dtype=torch.uint8, device=dev)
            out.append(codec.encode_tensor(raw, coded, kv, step=None, check=False))
            host[:n].copy_(coded, non_blocking=True)
    return out


def onload_coded(kv_layers: Sequence[torch.Tensor], layout: PageLayout, block_ids: Sequence[Sequence[int]],
                 host_chunks: Sequence[torch.Tensor], codec: Any, *,
                 pages: Sequence[tuple[int, int]] | None = None, stream: Any = None) -> None:
    """Decode ``host_chunks[c]`` (an encoding, exactly its bytes) into pages ``block_ids[c]`` of
    every layer. ``pages[c] = (first, stored)``: the encoding holds ``stored`` pages, of which
    those from ``first`` on go to ``block_ids[c]`` (default: all of them). ValueError when an
    encoding does not decode to its pages."""
    import torch

    from lmtier.transfer._fallback import onload  # a scatter from device memory (see offload_coded)

    _check(kv_layers, block_ids, host_chunks)
    dev = kv_layers[0].device
    layers = len(kv_layers)
    with _on(kv_layers[0], stream):
        for c, (ids, host) in enumerate(zip(block_ids, host_chunks, strict=True)):
            first, stored = pages[c] if pages is not None else (0, len(ids))
            if first < 0 or first + len(ids) > stored:
                raise InvalidArgumentError(f"pages {first}..{first + len(ids)} of a {stored}-page chunk")
            raw = torch.empty(chunk_nbytes(layout, layers, stored), dtype=torch.uint8, device=dev)
            prefix = bytes(host[:_PREFIX_BYTES].numpy())  # read on the host: no device round trip
            if dev.type == "cpu":
                codec.decode_tensor(host, raw, prefix=prefix)
            else:
                coded = torch.empty(host.numel(), dtype=torch.uint8, device=dev)
                coded.copy_(host, non_blocking=True)
                codec.decode_tensor(coded, raw, prefix=prefix, step=None)
            if (first, stored) != (0, len(ids)):  # the pages in play of a partly wanted chunk
                raw = raw.view(layers, stored, -1)[:, first: first + len(ids)].contiguous().view(-1)
            onload(kv_layers, layout, [ids], [raw], stream=stream)


def _check(kv_layers: Sequence[Any], block_ids: Sequence[Sequence[int]], host_chunks: Sequence[Any]) -> None:
    if not len(kv_layers):
        raise InvalidArgumentError("no KV layers given")
    if len(block_ids) != len(host_chunks):
        raise InvalidArgumentError(f"{len(block_ids)} block-id lists for {len(host_chunks)} host chunks")


def _on(kv_layer: torch.Tensor, stream: Any) -> Any:
    import contextlib

    import torch

    if not kv_layer.is_cuda:
        return contextlib.nullcontext()
    return torch.cuda.stream(stream) if stream is not None else torch.cuda.device(kv_layer.device)
