"""The vLLM scheduler's synchronous lookup line to its workers (lmtier.integrations._vllm_lookups).

Real Unix sockets and threads; the workers' engines are answer functions (the connector's own is
exercised on a real vLLM engine in tests/integration).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator

import pytest

from lmtier.integrations._vllm_lookups import Answer, Ask, DirectLine, LookupServer, SocketLine


@pytest.fixture
def servers() -> Iterator[Callable[[Callable[[Ask], Answer]], LookupServer]]:
    made: list[LookupServer] = []

    def make(answer: Callable[[Ask], Answer]) -> LookupServer:
        made.append(LookupServer(answer))
        return made[-1]

    yield make
    for server in made:
        server.close()


def ask(**kw: object) -> Ask:
    return Ask(**{"req_id": "r1", "token_ids": list(range(300)), "limit": 256, "timeout_s": 0.5, **kw})  # type: ignore[arg-type]


def test_each_rank_answers_on_its_socket_and_the_minimum_counts(servers) -> None:
    seen: list[Ask] = []

    def rank(tokens: int) -> Callable[[Ask], Answer]:
        def answer(a: Ask) -> Answer:
            seen.append(a)
            return Answer(tokens=tokens, runs=[("hot", tokens)])
        return answer

    r0, r1 = servers(rank(256)), servers(rank(128))
    line = SocketLine({0: r0.path, 1: r1.path})
    got = line.ask(ask(identity=[("cache_salt", "ab" * 32)], start=128, record=False))
    assert got == Answer(tokens=128, runs=[("hot", 128)])
    assert [(a.req_id, a.limit, a.start, a.record, a.identity) for a in seen] == \
        [("r1", 256, 128, False, [("cache_salt", "ab" * 32)])] * 2
    assert seen[0].token_ids == list(range(300))
    assert line.ask(ask(req_id="r2")) is not None  # the connections stay up
    line.close()


def test_the_socket_lives_in_a_private_directory_removed_at_close(servers) -> None:
    server = servers(lambda a: Answer())
    mode = stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode)
    assert mode == 0o700 and stat.S_ISSOCK(os.stat(server.path).st_mode)
    server.close()
    assert not os.path.exists(os.path.dirname(server.path))


def test_a_worker_without_an_answer_says_why_and_the_line_stays_up(servers) -> None:
    calls = []

    def answer(a: Ask) -> Answer:
        calls.append(a.req_id)
        if a.req_id == "bad":
            raise RuntimeError("boom")
        return Answer(error="no answer in 20 ms") if a.req_id == "slow" else Answer(tokens=64)

    line = SocketLine({0: servers(answer).path})
    got = line.ask(ask(req_id="bad"))  # an exception on the worker: an error, no crash
    assert got is not None and got.error == "RuntimeError: boom"
    got = line.ask(ask(req_id="slow"))
    assert got is not None and got.error == "no answer in 20 ms"
    assert line.ask(ask(req_id="ok")) == Answer(tokens=64)
    assert calls == ["bad", "slow", "ok"]
    line.close()


def test_a_rank_that_does_not_answer_in_time_takes_the_line_down_for_a_while(servers) -> None:
    release = threading.Event()

    def stuck(a: Ask) -> Answer:
        release.wait(10)
        return Answer(tokens=1)

    try:
        line = SocketLine({0: servers(lambda a: Answer(tokens=256)).path, 1: servers(stuck).path})
        assert line.ask(ask(timeout_s=0.01)) is None
        assert line.ask(ask()) is None  # down: not even asked (the connector uses its round trip)
        line.close()
    finally:
        release.set()


def test_a_missing_socket_is_no_answer(tmp_path) -> None:
    line = SocketLine({0: str(tmp_path / "nobody.sock")})
    assert line.ask(ask()) is None
    line.close()


def test_a_direct_line_calls_the_worker_in_this_process() -> None:
    line = DirectLine(lambda a: Answer(tokens=len(a.token_ids) // 2))
    assert line.ask(ask()) == Answer(tokens=150)
    assert DirectLine(lambda a: Answer(error="not ready")).ask(ask()) == Answer(error="not ready")
