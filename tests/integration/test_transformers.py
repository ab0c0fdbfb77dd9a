"""HF transformers prefix reuse on CPU: tiny random models built from configs (no download).

Every check compares against the model's own computation without lmtier (``model.generate`` /
a full forward with HF's ``DynamicCache``): same greedy token ids, logits equal to float32
rounding.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmtier.errors import BackendUnavailableError, InvalidArgumentError, NotSupportedError  # noqa: E402
from lmtier.integrations.transformers import KVPrefixCache, PagedKVCache  # noqa: E402
from lmtier.keys import ChunkKey  # noqa: E402
from lmtier.manager import StorageManager  # noqa: E402
from lmtier.registry import BackendRegistry, BackendSpec, hookimpl  # noqa: E402
from lmtier_backends.cpu.backend import CpuBackend  # noqa: E402

CHUNK = 16
VOCAB = 320
ATOL = 1e-4


def _qwen3() -> Any:
    cfg = transformers.Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=1024,
    )
    return transformers.Qwen3ForCausalLM(cfg)


def _llama() -> Any:
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=1024,
    )
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"qwen3": _qwen3, "llama": _llama}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> Any:
    torch.manual_seed(1234)
    return MODELS[request.param]().eval()


def _cpu_config(max_bytes: int = 16 << 20) -> dict[str, Any]:
    return {"chunk_tokens": CHUNK, "tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": max_bytes}}]}


@pytest.fixture
def kv(model: Any) -> Iterator[KVPrefixCache]:
    with KVPrefixCache(model, _cpu_config(), model_id="tiny-test") as cache:
        yield cache


def _ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g)


def _full_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[:, -1]


def _reference_generate(model: Any, ids: torch.Tensor, new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    return out[0].tolist()


def test_cached_prefix_generate_equals_full_prefill(model: Any, kv: KVPrefixCache) -> None:
    ids = _ids(3 * CHUNK + 5, seed=1)
    want = _reference_generate(model, ids, 12)
    first = kv.generate(ids, max_new_tokens=12, do_sample=False)
    assert kv.last is not None and kv.last.hit_tokens == 0
    kv.flush()
    second = kv.generate(ids, max_new_tokens=12, do_sample=False)
    assert kv.last.hit_tokens == 3 * CHUNK and kv.last.hit_chunks == 3
    assert first[0].tolist() == want
    assert second[0].tolist() == want


def test_prefill_logits_match_full_forward_and_decoding_continues(model: Any, kv: KVPrefixCache) -> None:
    ids = _ids(4 * CHUNK + 1, seed=2)
    kv.prefill(ids)
    kv.flush()
    logits, cache, hit = kv.prefill(ids)
    assert hit == 4 * CHUNK
    assert isinstance(cache, PagedKVCache) and cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(logits[:, -1], _full_logits(model, ids), atol=ATOL, rtol=0)
    # continue decoding on the returned cache past its capacity (it grows) against a full forward
    seq = ids
    step_logits = logits[:, -1]
    for _ in range(CHUNK + 3):
        nxt = step_logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        with torch.no_grad():
            step_logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step_logits, _full_logits(model, seq), atol=ATOL, rtol=0)


def test_partial_hit_reuses_only_the_shared_prefix(model: Any, kv: KVPrefixCache) -> None:
    a = _ids(4 * CHUNK, seed=3)
    b = torch.cat([a[:, : 2 * CHUNK + 7], _ids(2 * CHUNK, seed=4)], dim=1)
    kv.prefill(a)
    kv.flush()
    logits, _, hit = kv.prefill(b)
    assert hit == 2 * CHUNK  # chunk 3 differs in its 8th token: not reused
    torch.testing.assert_close(logits[:, -1], _full_logits(model, b), atol=ATOL, rtol=0)
    assert kv.generate(b, max_new_tokens=6, do_sample=False)[0].tolist() == _reference_generate(model, b, 6)


def test_miss_computes_everything_then_stores_every_full_chunk(model: Any, kv: KVPrefixCache) -> None:
    ids = _ids(3 * CHUNK, seed=5)  # an exact multiple: the last chunk is stored but never loaded
    logits, _, hit = kv.prefill(ids)
    assert hit == 0
    torch.testing.assert_close(logits[:, -1], _full_logits(model, ids), atol=ATOL, rtol=0)
    kv.flush()
    assert kv.manager.stats()["hot"]["objects"] == 3
    logits, _, hit = kv.prefill(ids)
    assert hit == 2 * CHUNK  # one token (here: a whole chunk) must still be computed for logits
    torch.testing.assert_close(logits[:, -1], _full_logits(model, ids), atol=ATOL, rtol=0)


def test_prompt_shorter_than_a_chunk_is_a_plain_forward(model: Any, kv: KVPrefixCache) -> None:
    ids = _ids(CHUNK - 3, seed=6)
    logits, _, hit = kv.prefill(ids)
    kv.flush()
    assert hit == 0 and kv.manager.stats()["hot"]["objects"] == 0
    torch.testing.assert_close(logits[:, -1], _full_logits(model, ids), atol=ATOL, rtol=0)


def test_different_model_ids_never_share_chunks(model: Any) -> None:
    ids = _ids(3 * CHUNK + 1, seed=7)
    cfg = _cpu_config()
    with KVPrefixCache(model, cfg, model_id="weights-a") as a:
        b = KVPrefixCache(model, a.store, model_id="weights-b")  # one store, two models
        try:
            a.prefill(ids)
            a.flush()
            assert a.namespace != b.namespace
            assert b.prefill(ids).hit_tokens == 0
            assert a.prefill(ids).hit_tokens == 3 * CHUNK
        finally:
            b.close()


def test_full_hottest_tier_stores_what_fits(model: Any, kv: KVPrefixCache) -> None:
    ids = _ids(5 * CHUNK + 2, seed=8)
    with KVPrefixCache(model, _cpu_config(max_bytes=2 * kv.chunk_bytes + 256), model_id="tiny-test",
                       host_pool_bytes=1 << 16) as small:
        small.prefill(ids)
        small.flush()
        logits, _, hit = small.prefill(ids)
        assert 0 < hit < 5 * CHUNK
        torch.testing.assert_close(logits[:, -1], _full_logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("with_ram", [False, True], ids=["disk-only", "ram-over-disk"])
def test_disk_tier_hits_are_read_once_and_correct(model: Any, tmp_path: Path, with_ram: bool) -> None:
    ids = _ids(3 * CHUNK + 9, seed=9)
    tiers = [{"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path), "max_bytes": 1 << 24}}]
    if with_ram:
        tiers.insert(0, {"name": "hot", "backend": "cpu", "options": {"max_bytes": 16 << 20}})
    cfg = {"chunk_tokens": CHUNK, "tiers": tiers}
    with KVPrefixCache(model, cfg, model_id="tiny-test") as kv:
        kv.prefill(ids)
        kv.flush()
    with KVPrefixCache(model, cfg, model_id="tiny-test") as kv:  # a new process would see the same
        logits, _, hit = kv.prefill(ids)
        # read by the disk tier straight into the memory the onload reads: no second host copy
        assert hit == 3 * CHUNK and kv.last is not None and kv.last.staged_chunks == 0
        torch.testing.assert_close(logits[:, -1], _full_logits(model, ids), atol=ATOL, rtol=0)
        if with_ram:  # promoted into RAM by adoption: the repeat is a RAM hit
            kv.flush()
            assert kv.manager.stats()["hot"]["objects"] == 3
            assert kv.prefill(ids).hit_tokens == 3 * CHUNK


# -- faults are misses ---------------------------------------------------------------------------
class _FlakyCpu(CpuBackend):
    """A cpu tier whose ``get`` can be made to fail (fault injection only)."""

    fail_gets = False

    async def get(self, keys: Sequence[ChunkKey]) -> list[Any]:
        if _FlakyCpu.fail_gets:
            raise BackendUnavailableError("injected: tier unreachable")
        return await super().get(keys)


class _FlakyPlugin:
    @hookimpl
    def lmtier_backend_specs(self) -> list[BackendSpec]:
        return [BackendSpec(name="flaky", factory=f"{__name__}:_FlakyCpu",
                            config="lmtier_backends.cpu.config:CpuConfig", install_hint="-")]


def test_tier_fault_on_get_is_a_miss(model: Any) -> None:
    registry = BackendRegistry.discover()
    registry.register_plugin(_FlakyPlugin(), name="flaky-test")
    ids = _ids(3 * CHUNK + 4, seed=10)
    cfg = {"chunk_tokens": CHUNK, "tiers": [{"name": "hot", "backend": "flaky", "options": {"max_bytes": 1 << 24}}]}
    with KVPrefixCache(model, cfg, model_id="tiny-test", registry=registry) as kv:
        kv.prefill(ids)
        kv.flush()
        _FlakyCpu.fail_gets = True
        try:
            logits, _, hit = kv.prefill(ids)  # lookup still finds the chunks; the get faults
        finally:
            _FlakyCpu.fail_gets = False
        assert hit == 0
        torch.testing.assert_close(logits[:, -1], _full_logits(model, ids), atol=ATOL, rtol=0)
        assert kv.prefill(ids).hit_tokens == 3 * CHUNK  # the tier is back


def test_a_frozen_redis_tier_is_a_miss_within_its_deadline(model: Any, tmp_path: Path) -> None:
    pytest.importorskip("lmtier_backends.redis.backend")
    from tests.support.remote_tiers import RemoteTier, remote_available

    if remote_available("redis"):
        pytest.skip("redis-server is not installed")
    ids = _ids(3 * CHUNK + 4, seed=14)
    want = _reference_generate(model, ids, 5)
    with RemoteTier("redis", tmp_path) as remote:
        cfg = {"chunk_tokens": CHUNK, "tiers": [remote.tier("shared", timeout_s={"lookup": 0.1, "get": 0.2})]}
        with KVPrefixCache(model, cfg, model_id="tiny-test") as kv:
            kv.prefill(ids)
            kv.flush()
            remote.freeze()
            try:
                assert kv.generate(ids, max_new_tokens=5, do_sample=False)[0].tolist() == want
                assert kv.last is not None and kv.last.hit_tokens == 0
                # it opened on the missed deadline; its state now depends on how long generate
                # took (past the cooldown a probe makes it half_open), so that is not asserted
                assert kv.manager.tier("shared").breaker.times_opened >= 1
            finally:
                remote.thaw()


def test_redis_tier_at_a_closed_port_is_a_miss(model: Any) -> None:
    pytest.importorskip("redis")
    pytest.importorskip("lmtier_backends.redis.backend")
    from tests.support.redis_server import free_port

    ids = _ids(2 * CHUNK + 3, seed=11)
    cfg = {"chunk_tokens": CHUNK, "tiers": [
        {"name": "shared", "backend": "redis", "timeout_s": 2.0,
         "options": {"url": f"redis://127.0.0.1:{free_port()}/0", "connect_at_open": False}}]}
    want = _reference_generate(model, ids, 5)
    with KVPrefixCache(model, cfg, model_id="tiny-test") as kv:
        for _ in range(2):
            assert kv.generate(ids, max_new_tokens=5, do_sample=False)[0].tolist() == want
            assert kv.last is not None and kv.last.hit_tokens == 0
            kv.flush()


def test_wrong_sized_value_is_a_miss(model: Any) -> None:
    ids = _ids(3 * CHUNK + 2, seed=12)
    with _ManagerOnLoop(_cpu_config()) as (mgr, loop), \
            KVPrefixCache(model, mgr, model_id="tiny-test", loop=loop) as kv:
        keys = kv.keys(ids)
        asyncio.run_coroutine_threadsafe(mgr.put([(keys[0], b"\x01" * 100)]), loop).result()
        logits, _, hit = kv.prefill(ids)
        assert hit == 0
        torch.testing.assert_close(logits[:, -1], _full_logits(model, ids), atol=ATOL, rtol=0)


# -- misuse --------------------------------------------------------------------------------------
def test_unsupported_uses_are_refused(model: Any, kv: KVPrefixCache) -> None:
    with pytest.raises(NotSupportedError):
        kv.prefill(_ids(2 * CHUNK, seed=13).repeat(2, 1))
    with pytest.raises(InvalidArgumentError):
        kv.generate(_ids(CHUNK, seed=13), past_key_values=None)
    with pytest.raises(InvalidArgumentError, match="model_id"):
        KVPrefixCache(model, _cpu_config())  # a random model has no name: its KV needs an identity
    sliding = transformers.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                       vocab_size=VOCAB, use_sliding_window=True, sliding_window=8,
                                       max_window_layers=0)
    with pytest.raises(NotSupportedError, match="full-attention"):
        KVPrefixCache(transformers.Qwen3ForCausalLM(sliding), _cpu_config(), model_id="x")


# -- helpers -------------------------------------------------------------------------------------
class _ManagerOnLoop:
    """An open StorageManager on an event loop running in a thread of the test."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> tuple[StorageManager, asyncio.AbstractEventLoop]:
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(StorageManager.from_config(self.cfg), self.loop)
        self.mgr = fut.result()
        return self.mgr, self.loop

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.mgr.aclose(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def test_a_lossy_tier_keys_under_its_own_namespace_and_loads_close_to_the_full_forward(
        model: Any, tmp_path: Path) -> None:
    from lmtier.framing import READABLE_CODECS, decode_header

    cold = {"name": "cold", "backend": "disk", "codec": "int8", "options": {"root": str(tmp_path / "cold")}}
    cfg = {"chunk_tokens": CHUNK, "tiers": [*_cpu_config()["tiers"], cold]}
    ids = _ids(4 * CHUNK + 1, seed=9)
    with KVPrefixCache(model, _cpu_config(), model_id="tiny-test") as exact:
        plain = exact.namespace
    with KVPrefixCache(model, cfg, model_id="tiny-test") as writer:
        assert writer.namespace != plain and ("lossy_codecs", "int8/vector") in writer.kv.extra
        assert all(k.namespace == writer.namespace for k in writer.keys(ids))
        writer.prefill(ids)
        writer.flush()
        disk = writer.manager.tier("cold").backend
        for key in writer.keys(ids):  # quantized on the way to the disk tier, under the declaring namespace
            head = decode_header(key, Path(disk.path_of(key)).read_bytes(), codecs=READABLE_CODECS)  # type: ignore[attr-defined]
            assert head.codec == 4 and head.payload_length < 0.6 * head.raw_length
    with KVPrefixCache(model, cfg, model_id="tiny-test") as reader:  # a fresh RAM tier: loads from the disk tier
        logits, _, hit = reader.prefill(ids)
        assert hit == 4 * CHUNK and reader.last is not None and reader.last.hit_chunks == 4
        full = _full_logits(model, ids)
        error = float((logits[:, -1] - full).abs().max())
        assert 0 < error < 0.01 * float(full.abs().max()), error  # int8 KV: close, and not the exact bytes
