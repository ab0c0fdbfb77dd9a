"""HF transformers prefix reuse on a CUDA GPU through the native transfer kernel.

``LMTIER_REQUIRE_NATIVE=1`` is set for every test, so a silent fall back to the torch path fails
the test. Checks: the onloaded prefix is bit-identical to the KV a full prefill computed; cached
generate equals ``model.generate`` (float32); bf16 logits stay within rounding noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmtier.integrations.transformers import KVPrefixCache  # noqa: E402
from lmtier.transfer import transfer_status  # noqa: E402
from tests.support.native import skip_unless_native  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CHUNK = 64
VOCAB = 1000


@pytest.fixture(scope="module", autouse=True)
def native_library() -> None:
    skip_unless_native()


@pytest.fixture(autouse=True)
def require_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTIER_REQUIRE_NATIVE", "1")
    monkeypatch.delenv("LMTIER_DISABLE_NATIVE", raising=False)


def _model(dtype: torch.dtype) -> Any:
    torch.manual_seed(4321)
    cfg = transformers.Qwen3Config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, max_position_embeddings=4096,
    )
    return transformers.Qwen3ForCausalLM(cfg).to(device="cuda", dtype=dtype).eval()


@pytest.fixture(scope="module")
def fp32_model() -> Any:
    return _model(torch.float32)


@pytest.fixture(scope="module")
def bf16_model() -> Any:
    return _model(torch.bfloat16)


def _config() -> dict[str, Any]:
    return {"chunk_tokens": CHUNK, "tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20}}]}


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g).cuda()


@pytest.fixture(params=[(True, 16), (False, CHUNK)], ids=["layerwise-blk16", "oneshot-blk64"])
def kv_bf16(request: pytest.FixtureRequest, bf16_model: Any) -> Iterator[KVPrefixCache]:
    layerwise, block = request.param
    with KVPrefixCache(bf16_model, _config(), model_id="gpu-test", block_size=block,
                       layerwise=layerwise, timing=True) as kv:
        yield kv


def test_native_path_is_active() -> None:
    status = transfer_status()
    assert status["active"] == "native", status


def test_onloaded_prefix_is_bit_identical_to_computed_kv(bf16_model: Any, kv_bf16: KVPrefixCache) -> None:
    ids = _ids(5 * CHUNK + 7, seed=1)
    first_logits, first, hit = kv_bf16.prefill(ids)
    assert hit == 0
    kv_bf16.flush()
    logits, second, hit = kv_bf16.prefill(ids)
    torch.cuda.synchronize()
    assert hit == 5 * CHUNK
    assert kv_bf16.last is not None and kv_bf16.last.staged_chunks == 0  # zero copy from pinned tier
    assert (kv_bf16.last.load_ms() or 0) > 0
    for a, b in zip(first.storage_layers, second.storage_layers, strict=True):
        # K and V of the hit tokens, compared as bytes
        want = a.view(2, -1, *a.shape[3:])[:, :hit].contiguous().view(torch.uint8)
        got = b.view(2, -1, *b.shape[3:])[:, :hit].contiguous().view(torch.uint8)
        assert torch.equal(got, want)
    diff = (logits[:, -1].float() - first_logits[:, -1].float()).abs().max().item()
    scale = first_logits.float().abs().max().item()
    assert diff <= 0.05 * scale + 1e-3, (diff, scale)


def test_cached_generate_equals_model_generate_fp32(fp32_model: Any) -> None:
    ids = _ids(4 * CHUNK + 3, seed=2)
    with torch.no_grad():
        want = fp32_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                   do_sample=False)[0].tolist()
    with KVPrefixCache(fp32_model, _config(), model_id="gpu-test-fp32", block_size=16) as kv:
        assert kv.generate(ids, max_new_tokens=10, do_sample=False)[0].tolist() == want
        kv.flush()
        b = torch.cat([ids[:, : 2 * CHUNK + 5], _ids(CHUNK, seed=3)], dim=1)  # partial hit
        with torch.no_grad():
            want_b = fp32_model.generate(b, attention_mask=torch.ones_like(b), max_new_tokens=10,
                                         do_sample=False)[0].tolist()
        assert kv.generate(b, max_new_tokens=10, do_sample=False)[0].tolist() == want_b
        assert kv.last is not None and kv.last.hit_tokens == 2 * CHUNK
        assert kv.generate(ids, max_new_tokens=10, do_sample=False)[0].tolist() == want
        assert kv.last.hit_tokens == 4 * CHUNK


def test_disk_tier_hits_are_read_once_into_pinned_memory(fp32_model: Any, tmp_path: Path) -> None:
    ids = _ids(3 * CHUNK + 1, seed=4)
    cfg = {"chunk_tokens": CHUNK, "tiers": [{"name": "nvme", "backend": "disk",
                                             "options": {"root": str(tmp_path), "max_bytes": 1 << 28}}]}
    with torch.no_grad():
        want = fp32_model(ids, logits_to_keep=1).logits[:, -1]
    with KVPrefixCache(fp32_model, cfg, model_id="gpu-test-fp32", host_pool_bytes=32 << 20) as kv:
        kv.prefill(ids)
        kv.flush()
        logits, _, hit = kv.prefill(ids)
        # the disk tier reads each chunk into the store's pinned host pool; the onload reads it there
        assert hit == 3 * CHUNK and kv.last is not None and kv.last.staged_chunks == 0
        torch.testing.assert_close(logits[:, -1], want, atol=1e-3, rtol=1e-3)
