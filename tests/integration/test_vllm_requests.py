"""What the connector caches beyond plain prompts, on a real vLLM engine (CPU, tiny random Llama).

Tenants (``cache_salt``) keep their KV apart; a chat's reply is stored at the request's end so the
next turn hits through it; the blocks each tier takes and drops are published as vLLM KV events in
vLLM's own block hashes. Every output is compared with vLLM without a connector (token ids equal, logprobs within
bf16 noise). One engine serves the module (KV events on, published over ZMQ to this test).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import vllm_runner as runner
from tests.integration.conftest import CHAT_REPLY_TOKENS, PROMPTS, EngineSlot, chat_turn2, tier_config

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


class EventSubscriber:
    """A ZMQ SUB socket connected to the engine's KV event publisher over a Unix socket (ipc://).

    The publisher binds the socket file (vLLM binds ipc:// endpoints and connects tcp:// ones; a
    SUB that binds and a PUB that connects exchanged nothing on this machine, and a tcp bind
    would listen beyond loopback). Connecting before the engine exists is fine: ZMQ reconnects.
    """

    def __init__(self, path: Path) -> None:
        import zmq

        self.endpoint = f"ipc://{path}"
        self._ctx = zmq.Context()
        self.sock = self._ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(self.endpoint)

    def drain(self, until: Any, timeout_s: float = 30.0) -> list[Any]:
        """Events received until ``until(events)`` holds or ``timeout_s`` passes (a deadline, not a sleep)."""
        import time

        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        events: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while not until(events) and time.monotonic() < deadline:
            if self.sock.poll(100, zmq.POLLIN):
                _topic, _seq, payload = self.sock.recv_multipart()
                events.extend(decoder.decode(payload).events)
        return events

    def close(self) -> None:
        self.sock.close(linger=0)
        self._ctx.term()


@pytest.fixture(scope="module")
def subscriber(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EventSubscriber]:
    pytest.importorskip("zmq")
    sub = EventSubscriber(tmp_path_factory.mktemp("events") / "kv-events.sock")
    yield sub
    sub.close()


@pytest.fixture(scope="module")
def engine(engines: EngineSlot, subscriber: EventSubscriber, tmp_path_factory: pytest.TempPathFactory) -> EngineSlot:
    from vllm.config import KVEventsConfig

    events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=subscriber.endpoint, topic="")
    engines.open("requests", tier_config(tmp_path_factory.mktemp("lmtier-disk")), kv_events_config=events)
    return engines


def stored(engines: EngineSlot) -> None:
    """Wait until every store has landed, then overwrite vLLM's cache: hits must come from lmtier.

    A finished request's last save runs in the engine's next step (its blocks wait for it); the
    offline ``LLM`` steps only inside ``generate``, so step it here until nothing is pending.
    """
    llm = engines.llm.llm_engine
    scheduler = llm.engine_core.engine_core.scheduler
    for _ in range(10):
        if not scheduler.has_requests():
            break
        llm.step()
    assert not scheduler.has_requests()
    engines.worker_engine().flush()
    engines.overwrite_kv_cache()


def test_each_tenant_hits_only_its_own_salted_kv(engine: EngineSlot, baseline: dict[str, runner.Result],
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmtier")
    got = []
    for salt in ("tenant-a", "tenant-a", "tenant-b", None, None):
        (result,) = runner.generate(engine.llm, [PROMPTS["salted"]], cache_salt=salt)
        got.append(result)
        stored(engine)
    # 700 tokens: 2 chunks + a 1-block tail stored, 640 loadable. B and the unsalted request never
    # see A's chunks; the second unsalted request hits what the first one stored
    assert [r.num_cached_tokens for r in got] == [0, 640, 0, 0, 640]
    for r in got:
        assert runner.same_outputs(r, baseline["salted"]) is None
    assert "tenant-a" not in caplog.text  # the salt never reaches a log line


def test_the_next_chat_turn_hits_through_the_stored_reply(engine: EngineSlot, baseline: dict[str, runner.Result],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lmtier")
    (turn1,) = runner.generate(engine.llm, [PROMPTS["chat1"]], max_tokens=CHAT_REPLY_TOKENS)
    assert runner.same_outputs(turn1, baseline["chat_turn1"]) is None
    stored(engine)
    (turn2,) = runner.generate(engine.llm, [chat_turn2(turn1.token_ids)])
    # turn 1 computed 600 + 99 tokens (the last generated one is never fed back): 2 chunks and a
    # 1-block tail reaching into the reply are stored at its end; the prompt alone would give 512
    assert turn2.num_cached_tokens == 640
    # the reply's KV was computed by decode steps, the baseline's by one prefill
    assert runner.same_outputs(turn2, baseline["chat_turn2"], atol=runner.RECOMPUTED_KV_LOGPROB_ATOL) is None
    assert "Stored 128 of 640 tokens for request" in caplog.text  # the reply's block, at the end


#: the tiers of tier_config and of tests.server.serverproc.tiers_yaml: ownership -> (medium, locality)
EVENT_TIERS = {"lmtier:hot": ("CPU", "LOCAL"), "lmtier:local": ("STORAGE", "LOCAL")}


def block_hashes(llm: Any, prompt: list[int], blocks: int) -> list[Any]:
    """vLLM's own hashes of the first ``blocks`` blocks of ``prompt`` (no salt, no adapter)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as kcu

    config = llm.llm_engine.vllm_config.cache_config
    hash_fn = get_hash_fn_by_name(config.prefix_caching_hash_algo)
    want, parent = [], None
    for i in range(blocks):
        parent = kcu.hash_block_tokens(hash_fn, parent, prompt[i * 128:(i + 1) * 128], None)
        want.append(kcu.maybe_convert_block_hash(parent))
    return want


def lmtier_blocks(events: list[Any], kind: type, of: list[Any]) -> dict[str, list[Any]]:
    """Per lmtier tier, the hashes (among ``of``) that ``kind`` events name, in order."""
    return {owner: [h for e in events if isinstance(e, kind) and e.ownership == owner
                    for h in e.block_hashes if h in of] for owner in EVENT_TIERS}


def check_places(events: list[Any], kind: type, of: list[Any], owners: tuple[str, ...] = tuple(EVENT_TIERS)) -> None:
    """Every ``kind`` event of ``owners`` naming blocks of ``of`` carries its tier's medium and locality."""
    for owner in owners:
        place = EVENT_TIERS[owner]
        got = {(e.medium, e.locality) for e in events
               if isinstance(e, kind) and e.ownership == owner and set(e.block_hashes) & set(of)}
        assert got == {place}, owner


def step_after_stores(llm: Any, flush: Any) -> None:
    """Let the stores land, then run a step: its output carries the workers' residency reports."""
    flush()
    runner.generate(llm, [PROMPTS["short"]])


def test_kv_events_name_vllms_block_hashes_per_tier_and_removals_follow(
        engine: EngineSlot, subscriber: EventSubscriber) -> None:
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    from lmtier.keys import chunk_keys

    prompt = PROMPTS["events"]
    runner.generate(engine.llm, [prompt])
    step_after_stores(engine.llm, engine.worker_engine().flush)
    # 1000 tokens: 3 chunks + a 1-block tail = 7 blocks of 128, in the order vLLM hashes them
    want = block_hashes(engine.llm, prompt, 7)
    # one residency per tier: the RAM tier and the (write-through) disk tier both took the chunks
    events = subscriber.drain(lambda evs: all(len(b) >= 7 for b in lmtier_blocks(evs, BlockStored, want).values()))
    assert lmtier_blocks(events, BlockStored, want) == dict.fromkeys(EVENT_TIERS, want)
    check_places(events, BlockStored, want)
    for owner in EVENT_TIERS:
        got = [e for e in events if isinstance(e, BlockStored) and e.ownership == owner and e.block_hashes[0] in want]
        assert [t for e in got for t in e.token_ids] == prompt[:896]
        assert {e.block_size for e in got} == {128}
    # the chunks leave both tiers (deleted here; evictions: the server test below): removals of
    # the same hashes, per tier
    eng = engine.worker_engine()
    eng.kvstore.delete(chunk_keys(prompt[:896], eng.namespace, 256, include_partial=True))
    runner.generate(engine.llm, [PROMPTS["short"]])
    events = subscriber.drain(lambda evs: all(len(b) >= 7 for b in lmtier_blocks(evs, BlockRemoved, want).values()))
    assert {owner: sorted(b) for owner, b in lmtier_blocks(events, BlockRemoved, want).items()} == \
        dict.fromkeys(EVENT_TIERS, sorted(want))
    check_places(events, BlockRemoved, want)


def test_bad_tenant_and_adapter_identities_are_served_without_lmtier(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from lmtier.integrations.vllm import lora_identity

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert lora_identity("a", str(adapter)) is None  # no adapter files: cannot be identified
    assert lora_identity("a", str(tmp_path / "missing")) is None
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"x" * 10)
    first = lora_identity("a", str(adapter))
    assert first is not None and first != lora_identity("b", str(adapter))  # the name counts
    (adapter / "adapter_model.safetensors").write_bytes(b"y" * 11)  # rebuilt in place
    assert lora_identity("a", str(adapter)) not in (None, first)

    # the scheduler's identity of real vLLM requests (a connector without an engine: only the
    # scheduler-side state the identity needs)
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.request import Request

    from lmtier.integrations.vllm import LMTierConnector

    conn = object.__new__(LMTierConnector)
    conn._disabled, conn._identities, conn._lora_ids = None, {}, {}

    def identity(rid: str, **kw: Any) -> Any:
        return conn._identity(Request(rid, [1, 2, 3], SamplingParams(), None, **kw))

    caplog.set_level(logging.WARNING, logger="lmtier")
    assert identity("plain") == ()
    salted = identity("salted", cache_salt="tenant-a")
    assert salted is not None and salted[0][0] == "cache_salt" and "tenant-a" not in repr(salted)
    assert identity("bad-salt", cache_salt=123) is None  # not a string: served without lmtier
    assert "request bad-salt: cache_salt must be a string" in caplog.text
    hub = LoRARequest("hub", 3, "some-org/some-adapter")  # not a local directory
    assert identity("hub-lora", lora_request=hub) is None
    assert "request hub-lora: LoRA adapter 'hub'" in caplog.text
    both = identity("both", lora_request=LoRARequest("a", 1, str(adapter)), cache_salt="tenant-a")
    assert both is not None and [k for k, _ in both] == ["lora", "cache_salt"]

    # an unknown kv_role never reaches the connector: vLLM's config rejects it, naming the field
    # and the roles it accepts (the engine does not start; no request is served under a guess)
    from vllm.config import KVTransferConfig

    for role in ("kv_bogus", None):
        with pytest.raises(ValueError, match="kv_role") as err:
            KVTransferConfig(kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
                             kv_role=role)
        assert "kv_producer" in str(err.value) and "kv_consumer" in str(err.value)


def test_lora_requests_are_cached_per_adapter(engines: EngineSlot, tiny_model: str,
                                              baseline: dict[str, runner.Result],
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    """vLLM's CPU LoRA path with two adapters built here: each hits only its own KV."""
    from vllm.lora.request import LoRARequest

    from tests.support.tiny_model import tiny_lora

    root = tmp_path_factory.mktemp("lora")
    a = LoRARequest("a", 1, str(tiny_lora(tiny_model, root / "a", seed=1)))
    b = LoRARequest("b", 2, str(tiny_lora(tiny_model, root / "b", seed=2)))
    engines.open("lora", tier_config(root / "disk"), enable_lora=True, max_lora_rank=8, max_loras=2)
    got = {}
    for name, lora in (("a1", a), ("a2", a), ("b", b), ("none", None)):
        (got[name],) = runner.generate(engines.llm, [PROMPTS["salted"]], lora_request=lora)
        stored(engines)
    assert [got[n].num_cached_tokens for n in ("a1", "a2", "b", "none")] == [0, 640, 0, 0]
    assert runner.same_outputs(got["a2"], got["a1"]) is None  # loaded KV of adapter a = computed
    assert got["a1"].token_ids != got["b"].token_ids  # the adapters do change the KV and outputs
    assert runner.same_outputs(got["none"], baseline["salted"]) is None
    engines.close()


@pytest.mark.server
def test_kv_events_over_lmtier_serve_follow_its_evictions(engines: EngineSlot, tmp_path: Path) -> None:
    """The connector over a real ``lmtier serve`` (its optional ``residency`` op): the server's
    slab takes a prompt's chunks and its write-through disk tier too; a second prompt makes the
    slab evict the first one's, which is published as their removal from ``CPU`` only."""
    from vllm.config import KVEventsConfig
    from vllm.distributed.kv_events import BlockRemoved, BlockStored

    from tests.server.serverproc import start_server, tiers_yaml

    first, second = PROMPTS["events"], PROMPTS["events"][::-1]
    # 1000 tokens of the test model (1 KiB of KV per token): 3 chunks + a 128-token tail, 896 KiB;
    # a 1 MiB slab holds one prompt's, so the second prompt's evict the first's
    server = start_server(tmp_path, config=tiers_yaml(tmp_path, slab="1MiB"))
    sub = EventSubscriber(tmp_path / "kv-events.sock")
    try:
        events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=sub.endpoint, topic="")
        engines.open("events-server", {"chunk_tokens": 256, "server": server.address}, kv_events_config=events_config)
        flush = engines.worker_engine().flush
        runner.generate(engines.llm, [first])
        step_after_stores(engines.llm, flush)
        want = block_hashes(engines.llm, first, 7)
        events = sub.drain(lambda evs: all(len(b) >= 7 for b in lmtier_blocks(evs, BlockStored, want).values()))
        assert lmtier_blocks(events, BlockStored, want) == dict.fromkeys(EVENT_TIERS, want)
        check_places(events, BlockStored, want)

        runner.generate(engines.llm, [second])
        step_after_stores(engines.llm, flush)
        later = block_hashes(engines.llm, second, 7)
        # the second prompt's 896 KiB leave 128 KiB of the first's in the slab: whole chunks of at
        # least 768 KiB of it are evicted (which ones is the slab's LRU's business)
        chunks = [(want[0:2], 256), (want[2:4], 256), (want[4:6], 256), (want[6:7], 128)]

        def evicted(evs: list[Any]) -> list[tuple[list[Any], int]]:
            gone = set(lmtier_blocks(evs, BlockRemoved, want)["lmtier:hot"])
            return [(blocks, kib) for blocks, kib in chunks if set(blocks) <= gone]

        events = sub.drain(lambda evs: sum(kib for _, kib in evicted(evs)) >= 768
                           and all(len(b) >= 7 for b in lmtier_blocks(evs, BlockStored, later).values()))
        removed = lmtier_blocks(events, BlockRemoved, want)["lmtier:hot"]
        assert sum(kib for _, kib in evicted(events)) >= 768
        assert sorted(removed) == sorted(h for blocks, _ in evicted(events) for h in blocks)  # whole chunks, once
        assert lmtier_blocks(events, BlockRemoved, want)["lmtier:local"] == []  # the disk tier keeps them
        check_places(events, BlockRemoved, want, owners=("lmtier:hot",))
        assert lmtier_blocks(events, BlockStored, later) == dict.fromkeys(EVENT_TIERS, later)
    finally:
        engines.close()
        sub.close()
        server.close()
