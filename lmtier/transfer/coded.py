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
chunk or refilling an onloaded one; the PCIe copies run on a side stream that ``stream`` waits
for (see the note above ``_offload_on_device``). Device temporaries (two raw and two encoded
chunks) come from torch's caching allocator on that stream. No check for inf/NaN on the device (it would
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

    from lmtier.transfer._fallback import offload

    _check(kv_layers, block_ids, host_chunks)
    sizes = []
    for ids, host in zip(block_ids, host_chunks, strict=True):
        n = codec.encoded_nbytes(chunk_nbytes(layout, len(kv_layers), len(ids)), kv)
        if host.numel() < n:
            raise InvalidArgumentError(f"a host chunk of {host.numel()} bytes cannot hold a {n}-byte encoding")
        sizes.append(n)
    if kv_layers[0].device.type != "cpu":
        return _offload_on_device(kv_layers, layout, block_ids, host_chunks, codec, kv, sizes, stream)
    out: list[int] = []
    for ids, host, n in zip(block_ids, host_chunks, sizes, strict=True):  # gather, then encode into the host chunk
        raw = torch.empty(chunk_nbytes(layout, len(kv_layers), len(ids)), dtype=torch.uint8)
        offload(kv_layers, layout, [ids], [raw])
        out.append(codec.encode_tensor(raw, host[:n], kv, check=True))
    return out


def onload_coded(kv_layers: Sequence[torch.Tensor], layout: PageLayout, block_ids: Sequence[Sequence[int]],
                 host_chunks: Sequence[torch.Tensor], codec: Any, *,
                 pages: Sequence[tuple[int, int]] | None = None, stream: Any = None) -> None:
    """Decode ``host_chunks[c]`` (an encoding, exactly its bytes) into pages ``block_ids[c]`` of
    every layer. ``pages[c] = (first, stored)``: the encoding holds ``stored`` pages, of which
    those from ``first`` on go to ``block_ids[c]`` (default: all of them). ValueError when an
    encoding does not decode to its pages."""
    import torch

    from lmtier.transfer._fallback import onload

    _check(kv_layers, block_ids, host_chunks)
    spans = [pages[c] if pages is not None else (0, len(ids)) for c, ids in enumerate(block_ids)]
    for ids, (first, stored) in zip(block_ids, spans, strict=True):
        if first < 0 or first + len(ids) > stored:
            raise InvalidArgumentError(f"pages {first}..{first + len(ids)} of a {stored}-page chunk")
    if kv_layers[0].device.type != "cpu":
        _onload_on_device(kv_layers, layout, block_ids, host_chunks, codec, spans, stream)
        return
    for ids, host, span in zip(block_ids, host_chunks, spans, strict=True):
        raw = torch.empty(chunk_nbytes(layout, len(kv_layers), span[1]), dtype=torch.uint8)
        codec.decode_tensor(host, raw, prefix=bytes(host[:_PREFIX_BYTES].numpy()))
        onload(kv_layers, layout, [ids], [_pages_in_play(raw, len(kv_layers), span, len(ids))])


# -- CUDA: two streams, two buffer slots ------------------------------------------------------------
# The device work of a chunk (gather + encode, or decode + scatter) and its PCIe copy take about
# the same time (H100, a 37.7 MB chunk: encode 0.27 ms, the halved copy 0.36 ms), so one stream
# running them in turn moved chunks slower than the raw path copies them (0.52x). Here the copies
# run on a side stream, one chunk behind the device work on the caller's stream, through two
# slots of device buffers that events hand back and forth: a call costs about its copies alone.
# Every buffer is allocated on the caller's stream, which waits for the side stream's last copy
# before returning: the caching allocator reuses nothing the side stream still touches, and
# synchronising the caller's stream covers the whole call (the contract of the plain calls).

def _offload_on_device(kv_layers: Sequence[torch.Tensor], layout: PageLayout, block_ids: Sequence[Sequence[int]],
                       host_chunks: Sequence[torch.Tensor], codec: Any, kv: KVGeometry, sizes: list[int],
                       stream: Any) -> list[int]:
    import torch

    dev = kv_layers[0].device
    main = stream if stream is not None else torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(device=dev)
    raw_sizes = [chunk_nbytes(layout, len(kv_layers), len(ids)) for ids in block_ids]
    with torch.cuda.stream(main):
        raw = [torch.empty(max(raw_sizes), dtype=torch.uint8, device=dev) for _ in range(2)]
        coded = [torch.empty(max(sizes), dtype=torch.uint8, device=dev) for _ in range(2)]
        copied: list[Any] = [None, None]  # per slot: the side stream is done copying it out
        out: list[int] = []
        for c, (ids, host) in enumerate(zip(block_ids, host_chunks, strict=True)):
            slot, n = c % 2, sizes[c]
            if copied[slot] is not None:
                main.wait_event(copied[slot])
            chunk = raw[slot][: raw_sizes[c]]
            _device_copy("offload", kv_layers, layout, ids, chunk, main)
            out.append(codec.encode_tensor(chunk, coded[slot][:n], kv, step=None, check=False))
            encoded = torch.cuda.Event()
            encoded.record(main)
            side.wait_event(encoded)
            with torch.cuda.stream(side):
                host[:n].copy_(coded[slot][:n], non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record(side)
        for event in copied:
            if event is not None:
                main.wait_event(event)
    return out


def _onload_on_device(kv_layers: Sequence[torch.Tensor], layout: PageLayout, block_ids: Sequence[Sequence[int]],
                      host_chunks: Sequence[torch.Tensor], codec: Any, spans: list[tuple[int, int]],
                      stream: Any) -> None:
    import torch

    dev = kv_layers[0].device
    layers = len(kv_layers)
    main = stream if stream is not None else torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(main):
        coded = [torch.empty(max(h.numel() for h in host_chunks), dtype=torch.uint8, device=dev) for _ in range(2)]
        raw = [torch.empty(max(chunk_nbytes(layout, layers, stored) for _, stored in spans), dtype=torch.uint8,
                           device=dev) for _ in range(2)]
        allocated = torch.cuda.Event()  # the buffers' memory may still be in use by earlier work on main
        allocated.record(main)
        side.wait_event(allocated)
        decoded: list[Any] = [None, None]  # per slot: main is done decoding it
        for c, (ids, host) in enumerate(zip(block_ids, host_chunks, strict=True)):
            slot = c % 2
            if decoded[slot] is not None:
                side.wait_event(decoded[slot])
            prefix = bytes(host[:_PREFIX_BYTES].numpy())  # read on the host: no device round trip
            with torch.cuda.stream(side):
                coded[slot][: host.numel()].copy_(host, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(side)
            main.wait_event(arrived)
            chunk = raw[slot][: chunk_nbytes(layout, layers, spans[c][1])]
            codec.decode_tensor(coded[slot][: host.numel()], chunk, prefix=prefix, step=None)
            _device_copy("onload", kv_layers, layout, ids, _pages_in_play(chunk, layers, spans[c], len(ids)), main)
            decoded[slot] = torch.cuda.Event()
            decoded[slot].record(main)


def _pages_in_play(raw: torch.Tensor, layers: int, span: tuple[int, int], wanted: int) -> torch.Tensor:
    """The pages of a decoded ``span = (first, stored)`` chunk that go to the cache."""
    first, stored = span
    if (first, stored) == (0, wanted):
        return raw
    return raw.view(layers, stored, -1)[:, first: first + wanted].contiguous().view(-1)


def _device_copy(op: str, kv_layers: Sequence[torch.Tensor], layout: PageLayout, ids: Sequence[int],
                 buffer: torch.Tensor, stream: Any) -> None:
    """Pages <-> a device buffer in the host-chunk format. The native kernel addresses device
    memory as it addresses mapped host memory (one launch, ~25 us for a 37.7 MB chunk on an
    H100); torch's gather is one index_select per layer (~1 ms). The torch path when the library
    does not load or is disabled (LMTIER_DISABLE_NATIVE), as for the plain calls."""
    from lmtier.transfer import _fallback, _native, native_ready

    if native_ready():
        getattr(_native, op)(kv_layers, layout, [ids], [buffer], stream=stream, mode="mapped")
        return
    getattr(_fallback, op)(kv_layers, layout, [ids], [buffer], stream=stream)


def _check(kv_layers: Sequence[Any], block_ids: Sequence[Sequence[int]], host_chunks: Sequence[Any]) -> None:
    if not len(kv_layers):
        raise InvalidArgumentError("no KV layers given")
    if len(block_ids) != len(host_chunks):
        raise InvalidArgumentError(f"{len(block_ids)} block-id lists for {len(host_chunks)} host chunks")
