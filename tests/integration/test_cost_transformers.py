"""HF transformers: the integration times its prefills, and a hit on a slow tier is recomputed.

A tiny random Qwen3 on CPU; the tiers a RAM tier over a disk tier whose reads are throttled
(tests/support/throttle.py) and whose estimate is seeded far slower still (1 KB/s: 100 s for the
prompt's KV, where a prefill takes milliseconds, or a second or two on a busy machine), so the
decision does not hang on this machine's timing. Logits are compared with the model's own full
forward.
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

CHUNK, VOCAB, ATOL = 16, 320, 1e-4


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(1234)
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=1024)
    return transformers.Qwen3ForCausalLM(cfg).eval()


@pytest.fixture
def kv(model: Any, tmp_path: Path) -> Iterator[KVPrefixCache]:
    registry = BackendRegistry.discover()
    registry.register_plugin(throttle, name="throttle-test")
    config = {"chunk_tokens": CHUNK, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": 16 << 20}},
        {"name": "slow", "backend": "throttled", "timeout_s": {"get": 30}, "read_bytes_per_s": 1000,
         "options": {"inner": {"backend": "disk", "options": {"root": str(tmp_path)}}, "bytes_per_s": 100_000}}]}
    with KVPrefixCache(model, config, model_id="tiny-cost", registry=registry) as cache:
        yield cache


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def full_logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits[:, -1]


def drop_ram(kv: KVPrefixCache) -> None:
    kv.flush()
    asyncio.run_coroutine_threadsafe(kv.manager.tier("hot").backend.clear(), kv.loop).result()


def test_prefills_are_timed_and_a_slow_hit_is_recomputed(kv: KVPrefixCache, model: Any) -> None:
    prompt = ids(8 * CHUNK + 3, seed=1)
    assert kv.engine.recompute.cost() is None
    assert kv.prefill(prompt)[2] == 0  # a miss: a full prefill, timed
    kv.prefill(ids(40, seed=99))  # a prefill's time is read by the next load
    assert kv.engine.recompute.cost() is not None
    drop_ram(kv)
    logits, _, hit = kv.prefill(prompt)
    assert hit == 0  # only in the slow tier: recomputed
    assert torch.allclose(logits[:, -1], full_logits(model, prompt), atol=ATOL)
    kv.flush()  # the skipped chunks were promoted to RAM meanwhile
    logits, _, hit = kv.prefill(prompt)
    assert hit == 8 * CHUNK
    assert torch.allclose(logits[:, -1], full_logits(model, prompt), atol=ATOL)
