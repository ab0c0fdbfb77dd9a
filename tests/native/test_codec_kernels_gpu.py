"""The native codec kernels (lmt_quantize_runs / lmt_dequantize_runs) write exactly the bytes the
codec's torch ops write on the same device: scales, codes and decoded values, for every dtype the
codecs take, over magnitudes from zero and subnormals to the dtype's large values."""

from __future__ import annotations

import pytest
import torch

from lmtier.codecs.quant import Fp8Codec, Int8Codec, QuantOptions
from lmtier.transfer import _native
from tests.support.native import skip_unless_native

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RUNS, WIDTH = 3000, 128


def _values(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    top = {torch.bfloat16: 30.0, torch.float16: 4.0, torch.float32: 30.0}[dtype]
    spread = torch.logspace(-40, top, RUNS, dtype=torch.float64)[:, None]
    x = (torch.randn(RUNS, WIDTH, generator=gen, dtype=torch.float64) * spread).to(dtype)
    x[0] = 0  # an all-zero run: scale 1
    x[1, ::2] = -x[1, ::2]
    return x.cuda()


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])  # NaN-safe equality


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("codec", [Fp8Codec(QuantOptions()), Int8Codec(QuantOptions())], ids=["fp8", "int8"])
def test_the_native_kernels_write_the_torch_ops_bytes(codec: Fp8Codec | Int8Codec, dtype: torch.dtype,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless_native()
    x = _values(dtype)
    out = {}
    for path in ("torch", "native"):
        if path == "torch":
            monkeypatch.setenv("LMTIER_DISABLE_NATIVE", "1")
        else:
            monkeypatch.delenv("LMTIER_DISABLE_NATIVE")
        scales = torch.empty(RUNS, 1, dtype=torch.float32, device="cuda")
        codes = torch.empty(RUNS, WIDTH, dtype=torch.uint8, device="cuda")
        assert _native.runs_fit(x, scales.view(-1), codes)
        codec.quantize(x, scales, codes, step=None, check=False)
        back = torch.empty_like(x)
        codec.dequantize(codes, scales, back, step=None)
        torch.cuda.synchronize()
        out[path] = (scales.cpu(), codes.cpu(), _as_bits(back).cpu())
    for part, torch_bytes, native_bytes in zip(("scales", "codes", "decoded values"), out["torch"], out["native"],
                                               strict=True):
        same = torch_bytes == native_bytes
        assert bool(same.all()), f"{codec.name} {dtype}: {int((~same).sum())} {part} differ from the torch ops'"


def test_the_kernels_refuse_a_bad_format_with_a_typed_error() -> None:
    skip_unless_native()
    from lmtier.errors import InvalidArgumentError

    x = torch.zeros(4, WIDTH, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(KeyError):
        _native.quantize_runs("fp4", x, torch.empty(4, device="cuda"), torch.empty(4 * WIDTH, dtype=torch.uint8,
                                                                                   device="cuda"))
    lib = _native._library()
    assert lib.lmt_quantize_runs(9, 1, x.data_ptr(), 4, WIDTH, 0, 0, 0, None) == 1  # LMT_ERR_INVALID_ARGUMENT
    assert b"format 9" in lib.lmt_last_error()
    assert InvalidArgumentError is _native._ERRORS[1]
