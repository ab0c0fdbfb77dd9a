"""Fixtures of the vLLM integration tests: the tiny model, baseline outputs, one engine at a time.

vLLM keeps its worker-side connector in a process-wide slot, so two engines with a connector must
never be alive together in one process: :class:`EngineSlot` shuts the current engine down before
it opens the next. Engines are opened by module-scoped fixtures, so the RAM tier they keep between
tests is not mistaken for a leak by the per-test buffer check. Engines run with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (scheduler and worker in
this process, which lets tests look at the worker's lmtier engine); the multiprocess test starts
vLLM's OpenAI server (API server, engine core and worker in three processes).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import vllm_runner as runner

__all__ = ["CHAT_REPLY_TOKENS", "PROMPTS", "EngineSlot", "chat_turn2", "tier_config"]

#: Tokens generated in the first turn of the chat test: 600 prompt + 100 reply tokens end in the
#: third chunk, whose 128-token block only a save at the request's end can store.
CHAT_REPLY_TOKENS = 100


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(1234)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, 2000) for _ in range(n)]

    long = toks(1000)  # 3 chunks of 256 + a 1-block tail (128) stored; 896 loadable
    return {
        "long": long,
        "shared": long[:600] + toks(300),  # shares 2 whole chunks with "long"
        "odd": toks(700),  # 2 chunks + a 1-block tail: 640 stored and loadable
        "short": toks(50),  # shorter than one block: never stored
        "disk": toks(1000),
        "redis_a": toks(600),
        "redis_b": toks(600),
        "dead": toks(600),
        "mp": toks(800),
        "whole": toks(1024),  # exactly 4 chunks: stored whole, the repeat loads 896 of chunk 3's pages
        "salted": toks(700),
        "chat1": toks(600),  # first chat turn (generates CHAT_REPLY_TOKENS)
        "chat_question": toks(50),  # appended to turn 1's prompt and reply: the second turn
        "pd": toks(1000),
        "events": toks(1000),
    }


PROMPTS = _prompts()


def chat_turn2(reply: list[int]) -> list[int]:
    """The second turn's prompt: the first turn's prompt, its reply, a new question."""
    return [*PROMPTS["chat1"], *reply, *PROMPTS["chat_question"]]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The SGLang tests run after every other test: importing sglang patches transformers and sets
    cache variables process-wide (sglang/__init__.py), which no other test should run under."""
    items.sort(key=lambda item: item.get_closest_marker("sglang") is not None)


@pytest.fixture(scope="session")
def vllm_env() -> Iterator[None]:
    pytest.importorskip("vllm", reason="needs vLLM: pip install 'lmtier[vllm]'")
    saved = {k: os.environ.get(k) for k in runner.ENGINE_ENV}
    os.environ.update(runner.ENGINE_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model(vllm_env: None) -> str:
    from tests.support.tiny_model import tiny_llama

    return str(tiny_llama("test"))


@pytest.fixture(scope="session")
def baseline(tiny_model: str) -> dict[str, runner.Result]:
    """Every prompt's outputs from vLLM without any connector (the reference)."""
    llm = runner.make_llm(tiny_model)
    try:
        names = list(PROMPTS)
        results = dict(zip(names, runner.generate(llm, [PROMPTS[n] for n in names]), strict=True))
        (turn1,) = runner.generate(llm, [PROMPTS["chat1"]], max_tokens=CHAT_REPLY_TOKENS)
        (turn2,) = runner.generate(llm, [chat_turn2(turn1.token_ids)])
        results["chat_turn1"], results["chat_turn2"] = turn1, turn2
    finally:
        runner.shutdown(llm)
    return results


class EngineSlot:
    """Holds at most one vLLM engine with the lmtier connector; opening another closes it."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.name: str | None = None
        self.llm: Any = None

    def open(self, name: str, extra: dict[str, Any], **engine: Any) -> Any:
        """The engine ``name`` (opened with ``extra`` and ``engine`` arguments if not open already)."""
        if self.name == name:
            return self.llm
        self.close()
        self.llm = runner.make_llm(self.model, extra, **engine)
        self.name = name
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            llm, self.llm, self.name = self.llm, None, None
            runner.shutdown(llm)

    def run(self, *names: str) -> list[runner.Result]:
        return runner.generate(self.llm, [PROMPTS[n] for n in names])

    @staticmethod
    def worker_engine() -> Any:
        """The lmtier KVCacheEngine of the (in-process) worker connector."""
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        return get_kv_transfer_group().engine

    @staticmethod
    def overwrite_kv_cache(value: float = 3.0) -> None:
        """Overwrite every page of vLLM's paged KV cache (in-process worker).

        With vLLM's own prefix cache off, a request's blocks are often the very blocks an earlier
        run of the same prompt left its KV in; overwriting them first means a later match with
        the baseline proves the KV was loaded from lmtier, not found lying in freed blocks.
        A constant, not noise: filling the whole cache stays a memset, and attention over
        constant K/V changes the output beyond recognition.
        """
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        for layer in get_kv_transfer_group()._layers:
            layer.fill_(value)


@pytest.fixture(scope="session")
def engines(tiny_model: str, baseline: dict[str, runner.Result]) -> Iterator[EngineSlot]:
    # the baseline first: its engine (no connector) cannot start while a connector engine is alive
    slot = EngineSlot(tiny_model)
    yield slot
    slot.close()


def tier_config(disk_root: Path, *more: dict[str, Any], **options: Any) -> dict[str, Any]:
    """A connector extra config: a RAM tier and a disk tier under ``disk_root``, then ``more``."""
    tier_list: list[dict[str, Any]] = [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": 256 << 20}},
        {"name": "local", "backend": "disk", "options": {"root": str(disk_root)}},
        *more,
    ]
    return {"chunk_tokens": 256, "tiers": tier_list, **options}
