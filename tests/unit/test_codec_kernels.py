"""The fp8 codec's CPU kernels (lmtier.codecs.kernels) write the bytes torch's ops write: every
bf16 value at several scales, every code back, and whole values under each kind of scales. The
GPU path runs the torch ops, so this is also what keeps a CPU and a GPU encoding equal."""

from __future__ import annotations

import pytest
import torch

from lmtier.codecs.base import KVGeometry
from lmtier.codecs.kernels import fp8_kernels
from lmtier.codecs.quant import Fp8Codec, QuantOptions

# scales' reciprocals: powers of two, values from KV (448 / amax), and ones that push x into
# e4m3's subnormals and its largest binade
INVERSES = [1.0, 2.0 ** -20, 3.7, 448 / 1.3e-5, 448 / 0.001234, 448 / 17.25, 2.0 ** 40, 1e-30]


def every_bf16() -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def test_the_kernels_are_built_here() -> None:
    # CI installs numba (lmtier[codecs]); without it the codec runs torch's ops and this suite
    # would compare nothing
    assert fp8_kernels() is not None


@pytest.mark.parametrize("inverse", INVERSES)
def test_every_bf16_value_encodes_to_torchs_e4m3_code(inverse: float) -> None:
    kernels = fp8_kernels()
    assert kernels is not None
    x = every_bf16()
    inv = torch.tensor([inverse], dtype=torch.float32)
    keep = torch.isfinite(x.float()) & ((x.float() * inv).abs() <= 448)  # the codec's scales ensure both
    x = x[keep].contiguous()
    want = torch.empty(x.numel(), dtype=torch.uint8)
    torch.mul(x.view(1, -1), inv.view(1, 1), out=want.view(1, -1).view(torch.float8_e4m3fn))
    got = torch.empty_like(want)
    kernels.encode_bf16(x.view(torch.int16).numpy().view("uint16"), inv.numpy(), got.numpy(), 1, 1, 1, x.numel())
    same = bool(torch.equal(got, want))
    assert same, f"{int((got != want).sum())} of {x.numel()} codes differ at 1/scale {inverse}"


@pytest.mark.parametrize("scale", [1.0, 1 / 3.7, 2.0 ** -30, 0.0123, 2.0 ** 100])
def test_every_code_decodes_to_what_torch_makes_of_it(scale: float) -> None:
    kernels = fp8_kernels()
    assert kernels is not None
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    scales = torch.tensor([scale], dtype=torch.float32)
    want = torch.empty(256, dtype=torch.bfloat16)
    Fp8Codec().dequantize(codes.view(1, -1), scales.view(1, 1), want.view(1, -1), step=None)
    got = torch.empty(256, dtype=torch.int16)
    kernels.decode_bf16(codes.numpy(), scales.numpy(), got.numpy().view("uint16"), 1, 1, 1, 256)
    finite = torch.isfinite(want)
    assert torch.equal(got[finite], want.view(torch.int16)[finite])
    assert bool(torch.isnan(got.view(torch.bfloat16)[~finite]).all())  # codes 0x7F / 0xFF


@pytest.mark.parametrize("scales", ["vector", "block_head", "layer"])
def test_a_value_encodes_and_decodes_to_the_same_bytes_with_or_without_the_kernels(
        scales: str, monkeypatch: pytest.MonkeyPatch) -> None:
    layers, pages, block, heads, head = 3, 4, 16, 4, 64
    g = torch.Generator().manual_seed(7)
    x = torch.randn(layers, pages, 2, block, heads, head, generator=g) * torch.linspace(0.01, 6.0, head)
    x[0, 0, 0, 0] = 0.0  # a zero group
    x[1, 1, 1, 1, 1, :4] = torch.tensor([-0.0, 1e-30, -3e-6, 2e-4])
    raw = x.to(torch.bfloat16).view(-1).view(torch.uint8)
    kv = KVGeometry("bfloat16", "hf_vllm_kv_first", layers, block, heads, head, 2 * block * heads * head * 2)
    codec = Fp8Codec(QuantOptions(scales=scales))
    n = codec.encoded_nbytes(raw.numel(), kv)
    encoded = {mode: torch.empty(n, dtype=torch.uint8) for mode in ("kernels", "torch")}
    decoded = {mode: torch.empty_like(raw) for mode in ("kernels", "torch")}
    for mode in ("kernels", "torch"):
        monkeypatch.setenv("LMTIER_CODEC_KERNELS", mode)
        assert (fp8_kernels() is None) == (mode == "torch")
        codec.encode_tensor(raw, encoded[mode], kv)
    for mode in ("kernels", "torch"):
        monkeypatch.setenv("LMTIER_CODEC_KERNELS", mode)
        codec.decode_tensor(encoded["torch"], decoded[mode])
    assert torch.equal(encoded["kernels"], encoded["torch"])
    assert torch.equal(decoded["kernels"], decoded["torch"])


def test_every_bf16_value_as_a_groups_largest_gets_torchs_scale_and_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = every_bf16()
    x = x[torch.isfinite(x.float())].contiguous().view(-1, 1)  # one group per value
    x = torch.cat([x, x * 0.37], dim=1).contiguous()  # and a smaller one beside it
    got_scales, want_scales = torch.empty(x.shape[0], 1), torch.empty(x.shape[0], 1)
    got, want = (torch.empty(x.shape, dtype=torch.uint8) for _ in range(2))
    Fp8Codec().quantize(x, got_scales, got)
    monkeypatch.setenv("LMTIER_CODEC_KERNELS", "torch")
    Fp8Codec().quantize(x, want_scales, want)
    assert torch.equal(got_scales.view(torch.int32), want_scales.view(torch.int32))
    assert torch.equal(got, want)


def test_inf_or_nan_is_still_refused() -> None:
    for bad in (float("inf"), float("nan")):
        x = torch.ones(4, 128, dtype=torch.bfloat16)
        x[2, 5] = bad
        with pytest.raises(ValueError, match="inf or NaN"):
            Fp8Codec().quantize(x, torch.empty(4, 1), torch.empty(4, 128, dtype=torch.uint8))
