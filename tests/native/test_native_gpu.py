"""The native CUDA path against the torch fallback, byte for byte (needs a GPU and the library)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from lmtier import transfer
from lmtier.errors import InvalidArgumentError, NativeUnavailableError
from lmtier.transfer import PageLayout, _fallback, _native, chunk_nbytes, describe_layout
from tests.native.kvcases import (
    CASES,
    POISON,
    layout_of,
    make_cache,
    poisoned_chunks,
    random_tables,
)
from tests.support.native import skip_unless_native

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = "cuda"
ODD_PAGES = [3, 5, 1, 4, 4, 4, 2]  # 7 chunks, uneven, partial last


@pytest.fixture(scope="module", autouse=True)
def native_library() -> None:
    skip_unless_native()


#: Every test runs on each native copy path. "staged-small" makes slots of 32 KiB, so chunks
#: split into many fills, layers into page ranges, and fills wrap around the slots.
MODES = {
    "mapped": {"LMTIER_TRANSFER_MODE": "mapped"},
    "staged": {"LMTIER_TRANSFER_MODE": "staged"},
    "staged-small": {"LMTIER_TRANSFER_MODE": "staged", "LMTIER_STAGING_BYTES": str(128 << 10)},
}


@pytest.fixture(autouse=True, params=list(MODES))
def copy_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    for k, v in MODES[request.param].items():
        monkeypatch.setenv(k, v)
    return str(request.param)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(99)


def _bytes(kv: list[torch.Tensor]) -> list[torch.Tensor]:
    # Compare as bytes: random bit patterns hold NaNs, which never compare equal as floats.
    return [t.view(torch.uint8) for t in kv]


def _check_offload(
    kv: list[torch.Tensor], layout: PageLayout, tables: list[list[int]], *, layers: list[int] | None = None
) -> None:
    n = len(kv)
    ours = poisoned_chunks(layout, n, tables, pin=True, extra=64)
    want = poisoned_chunks(layout, n, tables, pin=True, extra=64)
    _native.offload(kv, layout, tables, ours, layers=layers)
    _fallback.offload(kv, layout, tables, want, layers=layers)
    torch.cuda.synchronize()
    for c, (a, b) in enumerate(zip(ours, want, strict=True)):
        assert torch.equal(a, b), f"chunk {c} differs"
        assert bool((a[-64:] == POISON).all()), f"chunk {c}: bytes past its end were written"


def _check_onload(
    make: Callable[[], list[torch.Tensor]],
    layout: PageLayout,
    tables: list[list[int]],
    *,
    layers: list[int] | None = None,
) -> None:
    src = make()
    hosts = poisoned_chunks(layout, len(src), tables, pin=True)
    _fallback.offload(src, layout, tables, hosts)
    torch.cuda.synchronize()
    ours, want = make(), make()  # identical random caches: untouched blocks must stay so
    gen = torch.Generator().manual_seed(7)
    targets = random_tables(layout.num_blocks, [len(t) for t in tables], gen)
    _native.onload(ours, layout, targets, hosts, layers=layers)
    _fallback.onload(want, layout, targets, hosts, layers=layers)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(_bytes(ours), _bytes(want), strict=True)):
        assert torch.equal(a, b), f"layer {i} differs"


@pytest.mark.parametrize(("kind", "strided"), CASES)
def test_native_offload_matches_fallback_on_every_layout(
    kind: str, strided: bool, gen: torch.Generator
) -> None:
    kv = make_cache(
        kind, layers=5, blocks=64, blk=16, heads=2, head=64, strided=strided, device=CUDA, gen=gen
    )
    layout = layout_of(kv, kind)
    _check_offload(kv, layout, random_tables(64, ODD_PAGES, gen))


@pytest.mark.parametrize(("kind", "strided"), CASES)
def test_native_onload_matches_fallback_on_every_layout(kind: str, strided: bool) -> None:
    def make() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        return make_cache(
            kind, layers=5, blocks=64, blk=16, heads=2, head=64, strided=strided, device=CUDA, gen=g
        )

    layout = layout_of(make(), kind)
    _check_onload(make, layout, random_tables(64, ODD_PAGES, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("kind", ["vllm_kv_first", "flashinfer", "mla"])
def test_native_per_layer_transfers_match_fallback(kind: str, gen: torch.Generator) -> None:
    def make() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        return make_cache(kind, layers=6, blocks=40, device=CUDA, gen=g)

    kv = make()
    layout = layout_of(kv, kind)
    tables = random_tables(40, [4, 4, 1], gen)
    for layers in ([3], [5, 0]):
        _check_offload(kv, layout, tables, layers=layers)
        _check_onload(make, layout, tables, layers=layers)


@pytest.mark.parametrize(
    ("dtype", "inner"), [(torch.bfloat16, (3, 5)), (torch.uint8, (3, 7)), (torch.float32, (1, 3))]
)
def test_native_handles_sizes_that_forbid_wide_accesses(
    dtype: torch.dtype, inner: tuple[int, int], gen: torch.Generator
) -> None:
    # Runs of 30, 21 and 12 bytes: the kernel must narrow its accesses (2, 1, 4 bytes).
    def make() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(8)
        raw = torch.randint(
            0,
            256,
            (3 * 50 * inner[0] * inner[1] * torch.empty((), dtype=dtype).element_size(),),
            generator=g,
            dtype=torch.uint8,
        )
        big = raw.to(CUDA).view(dtype).view(3, 50, *inner)
        return [big[i] for i in range(3)]

    kv = make()
    layout = describe_layout(kv[0], "mla")
    tables = random_tables(50, ODD_PAGES, gen)
    _check_offload(kv, layout, tables)
    _check_onload(make, layout, tables)


@pytest.mark.parametrize("shift", [1, 2, 4, 8])
def test_native_handles_host_chunks_at_unaligned_addresses(shift: int, gen: torch.Generator) -> None:
    kv = make_cache("flashinfer", layers=3, blocks=32, blk=16, device=CUDA, gen=gen)
    layout = layout_of(kv, "flashinfer")
    tables = random_tables(32, [3, 2], gen)
    sizes = [chunk_nbytes(layout, 3, len(t)) for t in tables]
    ours_buf = torch.full((sum(sizes) + 64,), POISON, dtype=torch.uint8, pin_memory=True)
    want_buf = ours_buf.clone()
    ours = [ours_buf[shift : shift + sizes[0]], ours_buf[shift + sizes[0] : shift + sum(sizes)]]
    want = [want_buf[shift : shift + sizes[0]], want_buf[shift + sizes[0] : shift + sum(sizes)]]
    _native.offload(kv, layout, tables, ours)
    _fallback.offload(kv, layout, tables, want)
    torch.cuda.synchronize()
    assert torch.equal(ours_buf, want_buf)
    dst = [torch.zeros_like(t) for t in kv]
    _native.onload(dst, layout, tables, ours)
    torch.cuda.synchronize()
    for layer in range(3):
        for table in tables:
            for block in table:
                assert torch.equal(dst[layer][block].view(torch.uint8), kv[layer][block].view(torch.uint8))


def test_native_splits_batches_beyond_one_launch(gen: torch.Generator) -> None:
    # 460 chunks / 4600 pages exceed one launch's parameter space (448 chunks, 4096 pages).
    pages = [10] * 459 + [10]
    raw = torch.randint(0, 256, (2 * 5000 * 64,), generator=gen, dtype=torch.uint8).to(CUDA)
    kv = [raw.view(2, 5000, 4, 16)[i] for i in range(2)]
    layout = describe_layout(kv[0], "mla")
    tables = random_tables(5000, pages, gen)
    _check_offload(kv, layout, tables)

    def make() -> list[torch.Tensor]:
        return [t.clone() for t in kv]

    _check_onload(make, layout, tables)


def test_native_splits_layers_beyond_one_launch(gen: torch.Generator) -> None:
    raw = torch.randint(0, 256, (300 * 16 * 256,), generator=gen, dtype=torch.uint8).to(CUDA)
    kv = [raw.view(300, 16, 2, 128)[i] for i in range(300)]
    layout = describe_layout(kv[0], "vllm_blocks_first")
    tables = random_tables(16, [3, 2], gen)
    _check_offload(kv, layout, tables)
    _check_onload(lambda: [t.clone() for t in kv], layout, tables)


def test_native_enqueues_on_the_given_stream(gen: torch.Generator) -> None:
    kv = make_cache("vllm_kv_first", layers=4, blocks=64, blk=16, device=CUDA, gen=gen)
    layout = layout_of(kv, "vllm_kv_first")
    tables = random_tables(64, [4, 4], gen)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    ours = poisoned_chunks(layout, 4, tables, pin=True)
    want = poisoned_chunks(layout, 4, tables, pin=True)
    transfer.offload(kv, layout, tables, ours, stream=side)
    side.synchronize()
    _fallback.offload(kv, layout, tables, want)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(ours, want, strict=True))


def test_public_api_takes_the_native_path_for_pinned_chunks(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = make_cache("flashinfer", layers=2, blocks=16, device=CUDA, gen=gen)
    layout = layout_of(kv, "flashinfer")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("fallback used")

    monkeypatch.setattr(_fallback, "offload", forbidden)
    monkeypatch.setattr(_fallback, "onload", forbidden)
    hosts = poisoned_chunks(layout, 2, [[1, 2]], pin=True)
    transfer.offload(kv, layout, [[1, 2]], hosts)
    transfer.onload(kv, layout, [[3, 4]], hosts)
    torch.cuda.synchronize()
    assert transfer.transfer_status()["active"] == "native"


def test_pageable_host_chunks_fall_back_or_raise_when_native_is_required(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = make_cache("flashinfer", layers=2, blocks=16, device=CUDA, gen=gen)
    layout = layout_of(kv, "flashinfer")
    pageable = poisoned_chunks(layout, 2, [[1, 2]])
    want = poisoned_chunks(layout, 2, [[1, 2]], pin=True)
    monkeypatch.delenv("LMTIER_REQUIRE_NATIVE", raising=False)
    transfer.offload(kv, layout, [[1, 2]], pageable)
    _native.offload(kv, layout, [[1, 2]], want)
    torch.cuda.synchronize()
    assert torch.equal(pageable[0], want[0])
    with pytest.raises(InvalidArgumentError, match="LMT_ERR_HOST_NOT_MAPPED"):
        _native.offload(kv, layout, [[1, 2]], pageable)
    monkeypatch.setenv("LMTIER_REQUIRE_NATIVE", "1")
    with pytest.raises(NativeUnavailableError, match="not pinned"):
        transfer.offload(kv, layout, [[1, 2]], pageable)


def test_native_rejects_host_chunks_shorter_than_their_pages(gen: torch.Generator) -> None:
    kv = make_cache("flashinfer", layers=2, blocks=16, device=CUDA, gen=gen)
    layout = layout_of(kv, "flashinfer")
    short = torch.empty(chunk_nbytes(layout, 2, 2) - 1, dtype=torch.uint8, pin_memory=True)
    with pytest.raises(InvalidArgumentError, match="need"):
        _native.offload(kv, layout, [[1, 2]], [short])


def test_staged_onload_waits_for_earlier_work_on_its_stream(gen: torch.Generator, copy_mode: str) -> None:
    # An offload fills the host chunks and an onload reads them, both only enqueued on one
    # stream: the onload's copy engine must not read the chunks before the offload wrote them.
    kv = make_cache("flashinfer", layers=4, blocks=96, blk=16, heads=8, head=128, device=CUDA, gen=gen)
    layout = layout_of(kv, "flashinfer")
    src, dst = random_tables(96, [8, 8], gen), random_tables(96, [8, 8], gen)
    hosts = poisoned_chunks(layout, 4, src, pin=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    out = [torch.zeros_like(t) for t in kv]
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # keep the stream busy so a premature read would see poison
        transfer.offload(kv, layout, src, hosts, stream=side)
        transfer.onload(out, layout, dst, hosts, stream=side)
    side.synchronize()
    for layer in range(4):
        for a, b in zip([x for t in src for x in t], [x for t in dst for x in t], strict=True):
            assert torch.equal(out[layer][b].view(torch.uint8), kv[layer][a].view(torch.uint8))


def test_both_directions_at_once_on_two_streams(gen: torch.Generator, copy_mode: str) -> None:
    kv = make_cache("vllm_kv_first", layers=6, blocks=80, blk=16, heads=4, head=64, device=CUDA, gen=gen)
    layout = layout_of(kv, "vllm_kv_first")
    tables = random_tables(80, [16] * 4, gen)
    out_ids, in_ids = tables[:2], tables[2:]  # disjoint: the offload reads what the onload leaves
    outs = poisoned_chunks(layout, 6, out_ids, pin=True)
    ins = poisoned_chunks(layout, 6, in_ids, pin=True)
    other = make_cache("vllm_kv_first", layers=6, blocks=80, blk=16, heads=4, head=64, device=CUDA, gen=gen)
    _fallback.offload(other, layout, in_ids, ins)
    want = poisoned_chunks(layout, 6, out_ids, pin=True)
    _fallback.offload(kv, layout, out_ids, want)
    torch.cuda.synchronize()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (s1, s2):
        s.wait_stream(torch.cuda.current_stream())
    transfer.offload(kv, layout, out_ids, outs, stream=s1)
    transfer.onload(kv, layout, in_ids, ins, stream=s2)
    torch.cuda.synchronize()
    landed = poisoned_chunks(layout, 6, in_ids, pin=True)
    _fallback.offload(kv, layout, in_ids, landed)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(outs, want, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(landed, ins, strict=True))


def test_staged_copies_use_a_bounded_staging_buffer_per_direction(gen: torch.Generator, copy_mode: str) -> None:
    if copy_mode != "staged":
        pytest.skip("checks the default staging size")
    kv = make_cache("flashinfer", layers=8, blocks=200, blk=16, heads=8, head=128, device=CUDA, gen=gen)
    layout = layout_of(kv, "flashinfer")
    tables = random_tables(200, [16] * 10, gen)  # 10 chunks of 8 MiB: more than the buffer holds
    before = _native.staging_in_use()
    _check_offload(kv, layout, tables)
    _check_onload(lambda: [t.clone() for t in kv], layout, tables)
    cfg = _native.staging_config()
    assert cfg.d2h_bytes + cfg.h2d_bytes <= 64 << 20
    # at most one buffer per direction, made on first use
    assert _native.staging_in_use() - before in (0, cfg.d2h_bytes, cfg.h2d_bytes, cfg.d2h_bytes + cfg.h2d_bytes)


def test_pages_larger_than_a_slot_take_the_kernel(gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTIER_TRANSFER_MODE", "staged")
    monkeypatch.setenv("LMTIER_STAGING_BYTES", str(8 << 10))  # 4 KiB slots, 18 KiB pages
    kv = make_cache("mla", layers=3, blocks=32, blk=16, head=64, device=CUDA, gen=gen)
    layout = layout_of(kv, "mla")
    assert layout.page_bytes > 4 << 10
    tables = random_tables(32, [3, 2], gen)
    _check_offload(kv, layout, tables)
    _check_onload(lambda: [t.clone() for t in kv], layout, tables)


def test_bad_copy_mode_is_a_clear_error(gen: torch.Generator) -> None:
    kv = make_cache("flashinfer", layers=2, blocks=16, device=CUDA, gen=gen)
    layout = layout_of(kv, "flashinfer")
    hosts = poisoned_chunks(layout, 2, [[1, 2]], pin=True)
    with pytest.raises(InvalidArgumentError, match="mode 'fastest'"):
        _native.offload(kv, layout, [[1, 2]], hosts, mode="fastest")
