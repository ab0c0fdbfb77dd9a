"""The transfer API on CPU tensors (the torch fallback): layouts, host format, errors, dispatch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmtier.errors import InvalidArgumentError, NativeUnavailableError
from lmtier.transfer import (
    LAYOUT_KINDS,
    PageLayout,
    chunk_nbytes,
    describe_layout,
    offload,
    onload,
    transfer_status,
)
from tests.native.kvcases import (
    CASES,
    POISON,
    layout_of,
    make_cache,
    poisoned_chunks,
    random_tables,
    ref_page,
)

LAYERS, BLOCKS = 3, 23


@pytest.fixture(autouse=True)
def plain_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests choose the path themselves: ignore the caller's LMTIER_* transfer settings."""
    for name in ("LMTIER_REQUIRE_NATIVE", "LMTIER_DISABLE_NATIVE", "LMTIER_NATIVE_LIB"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def test_describe_layout_gives_runs_and_strides_of_each_kind() -> None:
    bf = 2
    kv = torch.empty(2, 10, 16, 8, 128, dtype=torch.bfloat16)
    run = 16 * 8 * 128 * bf
    assert describe_layout(kv, "vllm_kv_first") == PageLayout("vllm_kv_first", 10, run, (0, 10 * run), run)
    kv = torch.empty(10, 8, 16, 256, dtype=torch.bfloat16)
    assert describe_layout(kv, "vllm_blocks_first") == PageLayout(
        "vllm_blocks_first", 10, 2 * run, (0,), 2 * run
    )
    kv = torch.empty(10, 2, 16, 8, 128, dtype=torch.bfloat16)
    lay = describe_layout(kv, "flashinfer")
    assert lay == PageLayout("flashinfer", 10, 2 * run, (0,), 2 * run)
    assert lay.page_bytes == 2 * run
    kv = torch.empty(10, 16, 576, dtype=torch.bfloat16)
    assert describe_layout(kv, "mla") == PageLayout("mla", 10, 16 * 576 * bf, (0,), 16 * 576 * bf)
    assert chunk_nbytes(lay, 36, 16) == 36 * 16 * 2 * run
    assert set(LAYOUT_KINDS) == {"vllm_kv_first", "vllm_blocks_first", "flashinfer", "mla"}


def test_describe_layout_of_strided_views_keeps_block_stride() -> None:
    big = torch.empty(10, 4, 2, 16, 8, 128, dtype=torch.bfloat16)  # blocks, layers, K/V, ...
    run = 16 * 8 * 128 * 2
    flash = describe_layout(big[:, 1], "flashinfer")
    assert flash == PageLayout("flashinfer", 10, 4 * 2 * run, (0,), 2 * run)
    kv_first = describe_layout(big[:, 1].transpose(0, 1), "vllm_kv_first")
    assert kv_first == PageLayout("vllm_kv_first", 10, 4 * 2 * run, (0, run), run)
    # K and V not adjacent inside a flashinfer block: two runs.
    split = torch.empty(2, 10, 16, 8, 128, dtype=torch.bfloat16).transpose(0, 1)
    assert describe_layout(split, "flashinfer") == PageLayout("flashinfer", 10, run, (0, 10 * run), run)


@pytest.mark.parametrize(
    ("shape", "kind", "match"),
    [
        ((3, 10, 16, 8, 128), "vllm_kv_first", "leading 2"),
        ((10, 3, 16, 8, 128), "flashinfer", "2 at dim 1"),
        ((10, 16, 8, 64), "mla", "3 dims"),
        ((10,), "vllm_blocks_first", "at least 2"),
        ((10, 16, 576), "paged", "unknown layout kind"),
    ],
)
def test_describe_layout_rejects_shapes_that_do_not_fit(
    shape: tuple[int, ...], kind: str, match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        describe_layout(torch.empty(shape), kind)


def test_describe_layout_rejects_blocks_that_are_not_dense() -> None:
    kv = torch.empty(10, 16, 8, 256)[..., :128]  # (N, blk, H, D) cut from a wider tensor
    with pytest.raises(InvalidArgumentError, match="must be dense"):
        describe_layout(kv, "vllm_blocks_first")


def test_describe_layout_rejects_overlapping_blocks() -> None:
    base = torch.empty(128)
    kv = base.as_strided((10, 4, 4), (8, 4, 1))  # blocks of 16 elements, 8 apart
    with pytest.raises(InvalidArgumentError, match="overlap"):
        describe_layout(kv, "mla")


@pytest.mark.parametrize(("kind", "strided"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_offload_writes_every_byte_of_every_page(
    kind: str, strided: bool, dtype: torch.dtype, gen: torch.Generator
) -> None:
    kv = make_cache(kind, layers=LAYERS, blocks=BLOCKS, dtype=dtype, strided=strided, gen=gen)
    layout = layout_of(kv, kind)
    tables = random_tables(BLOCKS, [4, 4, 4, 3], gen)  # partial last chunk
    hosts = poisoned_chunks(layout, LAYERS, tables, extra=7)
    offload(kv, layout, tables, hosts)
    for host, table in zip(hosts, tables, strict=True):
        body = host[: chunk_nbytes(layout, LAYERS, len(table))].view(LAYERS, len(table), -1)
        for layer in range(LAYERS):
            for page, block in enumerate(table):
                assert torch.equal(body[layer, page], ref_page(kv[layer], kind, block))
        assert bool((host[-7:] == POISON).all()), "bytes past the chunk were written"


@pytest.mark.parametrize("shift", [0, 1, 2, 4, 8])
def test_host_chunks_at_any_byte_offset_round_trip(shift: int, gen: torch.Generator) -> None:
    # The copies use the widest element the offsets allow (8/4/2/1 bytes): every width must
    # land each byte where the format says.
    kv = make_cache("flashinfer", layers=LAYERS, blocks=BLOCKS, gen=gen)
    layout = layout_of(kv, "flashinfer")
    tables = random_tables(BLOCKS, [3, 2], gen)
    sizes = [chunk_nbytes(layout, LAYERS, len(t)) for t in tables]
    buf = torch.full((shift + sum(sizes) + 8,), POISON, dtype=torch.uint8)
    hosts = [buf[shift : shift + sizes[0]], buf[shift + sizes[0] : shift + sum(sizes)]]
    offload(kv, layout, tables, hosts)
    for host, table in zip(hosts, tables, strict=True):
        body = host.view(LAYERS, len(table), -1)
        for layer in range(LAYERS):
            for page, block in enumerate(table):
                assert torch.equal(body[layer, page], ref_page(kv[layer], "flashinfer", block))
    assert bool((buf[:shift] == POISON).all()) and bool((buf[shift + sum(sizes):] == POISON).all())
    back = [torch.zeros_like(t) for t in kv]
    onload(back, layout, tables, hosts)
    for layer in range(LAYERS):
        for block in (b for t in tables for b in t):
            assert torch.equal(back[layer][block].view(torch.uint8), kv[layer][block].view(torch.uint8))


@pytest.mark.parametrize(("kind", "strided"), CASES)
def test_onload_restores_pages_and_leaves_other_blocks_alone(
    kind: str, strided: bool, gen: torch.Generator
) -> None:
    src = make_cache(kind, layers=LAYERS, blocks=BLOCKS, strided=strided, gen=gen)
    layout = layout_of(src, kind)
    tables = random_tables(BLOCKS, [5, 5, 2], gen)
    hosts = poisoned_chunks(layout, LAYERS, tables)
    offload(src, layout, tables, hosts)

    dst = make_cache(kind, layers=LAYERS, blocks=BLOCKS, strided=strided, gen=gen)
    before = [[ref_page(t, kind, b) for b in range(BLOCKS)] for t in dst]
    targets = random_tables(BLOCKS, [5, 5, 2], gen)  # other block ids than the source's
    onload(dst, layout, targets, hosts)
    moved = {b: s for tt, st in zip(targets, tables, strict=True) for b, s in zip(tt, st, strict=True)}
    for layer in range(LAYERS):
        for block in range(BLOCKS):
            got = ref_page(dst[layer], kind, block)
            want = ref_page(src[layer], kind, moved[block]) if block in moved else before[layer][block]
            assert torch.equal(got, want), (layer, block)


@pytest.mark.parametrize(("kind", "strided"), [("vllm_kv_first", True), ("flashinfer", False)])
def test_onload_of_some_layers_reads_their_slices_of_the_full_chunk(
    kind: str, strided: bool, gen: torch.Generator
) -> None:
    src = make_cache(kind, layers=4, blocks=BLOCKS, strided=strided, gen=gen)
    layout = layout_of(src, kind)
    tables = random_tables(BLOCKS, [3, 2], gen)
    hosts = poisoned_chunks(layout, 4, tables)
    offload(src, layout, tables, hosts)
    dst = make_cache(kind, layers=4, blocks=BLOCKS, strided=strided, gen=gen)
    before = [[ref_page(t, kind, b) for b in range(BLOCKS)] for t in dst]
    for layer in (2, 0):  # layer by layer, out of order
        onload(dst, layout, tables, hosts, layers=[layer])
    for layer in range(4):
        for table in tables:
            for block in table:
                want = ref_page(src[layer], kind, block) if layer in (0, 2) else before[layer][block]
                assert torch.equal(ref_page(dst[layer], kind, block), want)


def test_offload_of_some_layers_writes_only_their_slices(gen: torch.Generator) -> None:
    kv = make_cache("mla", layers=4, blocks=BLOCKS, gen=gen)
    layout = layout_of(kv, "mla")
    tables = random_tables(BLOCKS, [3, 1], gen)
    hosts = poisoned_chunks(layout, 4, tables)
    offload(kv, layout, tables, hosts, layers=[3, 1])
    for host, table in zip(hosts, tables, strict=True):
        body = host.view(4, len(table), -1)
        for layer in range(4):
            for page, block in enumerate(table):
                if layer in (1, 3):
                    assert torch.equal(body[layer, page], ref_page(kv[layer], "mla", block))
                else:
                    assert bool((body[layer, page] == POISON).all())


def test_empty_chunks_and_empty_batches_are_no_ops(gen: torch.Generator) -> None:
    kv = make_cache("flashinfer", layers=2, blocks=BLOCKS, gen=gen)
    layout = layout_of(kv, "flashinfer")
    offload(kv, layout, [], [])
    onload(kv, layout, [], [])
    hosts = poisoned_chunks(layout, 2, [[], [5]])
    offload(kv, layout, [[], [5]], hosts)
    assert torch.equal(hosts[1].view(2, -1)[1], ref_page(kv[1], "flashinfer", 5))
    onload(kv, layout, [[], [5]], hosts, layers=[])


def test_block_ids_may_be_tensors(gen: torch.Generator) -> None:
    kv = make_cache("vllm_blocks_first", layers=2, blocks=BLOCKS, gen=gen)
    layout = layout_of(kv, "vllm_blocks_first")
    hosts = poisoned_chunks(layout, 2, [[1, 2]])
    offload(kv, layout, [torch.tensor([7, 3])], hosts)
    assert torch.equal(hosts[0].view(2, 2, -1)[1, 1], ref_page(kv[1], "vllm_blocks_first", 3))


@pytest.fixture
def small() -> tuple[list[torch.Tensor], PageLayout]:
    kv = make_cache("flashinfer", layers=2, blocks=8, gen=torch.Generator().manual_seed(5))
    return kv, layout_of(kv, "flashinfer")


def _host(layout: PageLayout, pages: int = 2, layers: int = 2) -> torch.Tensor:
    return torch.zeros(chunk_nbytes(layout, layers, pages), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda kv, lay, ids, hs: (kv, lay, [[0, 8]], hs), r"block ids must lie in \[0, 8\)"),
        (lambda kv, lay, ids, hs: (kv, lay, [[-1, 0]], hs), "block ids must lie"),
        (lambda kv, lay, ids, hs: (kv, lay, ids, [hs[0][:-1]]), "need"),
        (lambda kv, lay, ids, hs: (kv, lay, ids, [hs[0].view(torch.int16)]), "uint8"),
        (lambda kv, lay, ids, hs: (kv, lay, ids, [hs[0].view(2, -1)[:, ::2]]), "contiguous"),
        (lambda kv, lay, ids, hs: (kv, lay, ids, hs + hs), "one block-id list per host chunk"),
        (lambda kv, lay, ids, hs: (kv, lay, torch.tensor(ids), hs), "one block-id list"),
        (lambda kv, lay, ids, hs: ([], lay, ids, hs), "kv_layers is empty"),
        (lambda kv, lay, ids, hs: ([kv[0], kv[1][:4]], lay, ids, hs), "layer 1 differs"),
        (lambda kv, lay, ids, hs: ([kv[0], kv[1].float()], lay, ids, hs), "layer 1 differs"),
        (lambda kv, lay, ids, hs: (kv, lay.__class__("mla", 8, 1, (0,), 1), ids, hs), "does not fit"),
        (
            lambda kv, lay, ids, hs: (
                kv,
                lay.__class__("flashinfer", 9, lay.block_stride, (0,), lay.run_bytes),
                ids,
                hs,
            ),
            "not the given",
        ),
        (lambda kv, lay, ids, hs: (kv, "flashinfer", ids, hs), "must be a PageLayout"),
    ],
)
@pytest.mark.parametrize("op", [offload, onload])
def test_bad_arguments_raise_invalid_argument(small, mutate, match, op) -> None:  # type: ignore[no-untyped-def]
    kv, layout = small
    args = mutate(kv, layout, [[0, 1]], [_host(layout)])
    with pytest.raises(InvalidArgumentError, match=match):
        op(*args)


def test_bad_layer_selection_raises(small) -> None:  # type: ignore[no-untyped-def]
    kv, layout = small
    for layers in ([2], [-1], [0, 0]):
        with pytest.raises(InvalidArgumentError, match="distinct indices"):
            onload(kv, layout, [[0]], [_host(layout, 1)], layers=layers)


def test_onload_rejects_repeated_block_ids_but_offload_allows_them(small) -> None:  # type: ignore[no-untyped-def]
    kv, layout = small
    hosts = [_host(layout), _host(layout, 1)]
    with pytest.raises(InvalidArgumentError, match="repeat"):
        onload(kv, layout, [[0, 1], [1]], hosts)
    offload(kv, layout, [[0, 1], [1]], hosts)
    assert torch.equal(hosts[0].view(2, 2, -1)[0, 1], hosts[1].view(2, 1, -1)[0, 0])


def test_require_native_turns_fallback_into_an_error(small, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    kv, layout = small
    monkeypatch.setenv("LMTIER_REQUIRE_NATIVE", "1")
    with pytest.raises(NativeUnavailableError, match="not on a CUDA device"):
        offload(kv, layout, [[0, 1]], [_host(layout)])
    with pytest.raises(NativeUnavailableError, match="LMTIER_REQUIRE_NATIVE"):
        onload(kv, layout, [[0, 1]], [_host(layout)])


def test_transfer_status_says_which_path_and_why(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LMTIER_NATIVE_LIB", str(tmp_path / "missing.so"))
    status = transfer_status()
    assert {"active", "reason", "library", "library_version", "searched", "cuda_available"} <= set(status)
    assert status["searched"][0] == str(tmp_path / "missing.so")
    if not torch.cuda.is_available() or status["library"] is None:
        assert status["active"] == "fallback"
        assert status["reason"]
    monkeypatch.setenv("LMTIER_DISABLE_NATIVE", "1")
    assert transfer_status()["reason"] == "LMTIER_DISABLE_NATIVE is set"


def test_importing_the_package_loads_nothing_heavy() -> None:
    code = (
        "import sys, lmtier.transfer as t; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert not any(m.endswith('_native') and m.startswith('lmtier') for m in sys.modules); "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
