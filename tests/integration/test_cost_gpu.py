"""The load decision on a CUDA GPU: prefills timed with CUDA events, a slow hit recomputed.

A tiny random Qwen3 on the GPU (float32) through ``KVPrefixCache`` (layer-wise onload, the
native kernel required); the tiers a RAM tier over a disk tier whose reads are throttled
(tests/support/throttle.py) and whose estimate is seeded far slower still (1 KB/s), so the
decision does not hang on the machine's timing. Checks: the integration's ``ForwardClock`` reads
its CUDA events and feeds the engine's prefill estimate; a hit held only by the slow tier is
recomputed (logits equal the model's own forward), promoted, then loaded from RAM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmtier.integrations.transformers import KVPrefixCache  # noqa: E402
from lmtier.registry import BackendRegistry  # noqa: E402
from tests.support import throttle  # noqa: E402
from tests.support.native import skip_unless_native  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CHUNK, VOCAB = 64, 1000


@pytest.fixture(scope="module", autouse=True)
def native_library() -> None:
    skip_unless_native()


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(4321)
    cfg = transformers.Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=64, vocab_size=VOCAB, max_position_embeddings=4096)
    return transformers.Qwen3ForCausalLM(cfg).to(device="cuda", dtype=torch.float32).eval()


@pytest.fixture
def kv(model: Any, tmp_path: Path) -> Iterator[KVPrefixCache]:
    registry = BackendRegistry.discover()
    registry.register_plugin(throttle, name="throttle-test")
    config = {"chunk_tokens": CHUNK, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": 64 << 20}},
        {"name": "slow", "backend": "throttled", "timeout_s": {"get": 30}, "read_bytes_per_s": 1000,
         "options": {"inner": {"backend": "disk", "options": {"root": str(tmp_path)}}, "bytes_per_s": 1e6}}]}
    with KVPrefixCache(model, config, model_id="gpu-cost", registry=registry, block_size=16) as cache:
        yield cache


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed)).cuda()


def full_logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, logits_to_keep=1).logits[:, -1]


def test_prefills_are_timed_with_cuda_events_and_a_slow_hit_is_recomputed(kv: KVPrefixCache, model: Any) -> None:
    prompt = ids(8 * CHUNK + 3, seed=1)
    want = full_logits(model, prompt)
    assert kv.engine.recompute.cost() is None
    assert kv.prefill(prompt)[2] == 0  # a miss: a full prefill, its CUDA events recorded
    torch.cuda.synchronize()  # the events have completed: the next prefill reads them
    kv.prefill(ids(40, seed=99))
    cost = kv.engine.recompute.cost()
    assert cost is not None and cost.per_token_s + cost.per_pair_s > 0
    kv.flush()
    asyncio.run_coroutine_threadsafe(kv.manager.tier("hot").backend.clear(), kv.loop).result()
    logits, _, hit = kv.prefill(prompt)
    assert hit == 0  # only in the slow tier: recomputed
    torch.testing.assert_close(logits[:, -1], want, atol=1e-3, rtol=1e-3)
    kv.flush()  # the skipped chunks were promoted to RAM meanwhile
    logits, _, hit = kv.prefill(prompt)
    assert hit == 8 * CHUNK
    torch.testing.assert_close(logits[:, -1], want, atol=1e-3, rtol=1e-3)
