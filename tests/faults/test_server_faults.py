"""Remote tiers whose server is frozen, killed or stalls (issue 14, item 8), against real servers:
redis-server and SeaweedFS's S3 on 127.0.0.1, stopped with SIGSTOP and killed with SIGKILL.

What a user runs is a StorageManager with a RAM tier over a shared tier written in the background,
so that is what these tests drive, with the default deadlines: a second engine (a fresh manager,
its RAM tier empty) reads what a first one stored. While the server is down every call returns,
as misses, within its deadline (HANG_S bounds it: a call still running then is a hang, the
failure these tests exist to catch; latency itself is reported, not asserted); after the server
is back, every stored value is served again, byte-exact.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from tests.faults.ledger import FaultRecord
from tests.faults.remotes import Remote

pytestmark = [pytest.mark.faults, pytest.mark.asyncio]

#: A frozen server must cost a call its deadline (sub-second by default), never the client's
#: socket timeouts (10-30 s): a call still running after this long is a hang.
HANG_S = 3.0
#: How long the tier gets to come back after the server does (its breaker's cooldown, a reconnect).
RECOVERY_S = 60.0
VALUE_BYTES = 256 << 10


def _config(remote: Remote) -> dict[str, Any]:
    return {"chunk_tokens": 256, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "64MiB", "pinned": False}},
        {"name": "shared", "backend": remote.name, "write": "async", "options": remote.options()},
    ]}


def _items(n: int) -> list[tuple[ChunkKey, bytes]]:
    ns = make_namespace(test="server-faults")
    return [(ChunkKey(ns, os.urandom(16)), os.urandom(VALUE_BYTES)) for _ in range(n)]


async def _open(remote: Remote) -> StorageManager:
    return await StorageManager.from_config(_config(remote), metrics_registry=CollectorRegistry())


async def _stored_by_a_first_engine(remote: Remote, items: list[tuple[ChunkKey, bytes]]) -> None:
    async with await _open(remote) as first:
        await first.put(items)
        await first.flush()
        assert await first.tier("shared").backend.contains([k for k, _ in items]) == [True] * len(items)


def _sample(mgr: StorageManager, name: str, **labels: str) -> float:
    return mgr.metrics.registry.get_sample_value(name, labels) or 0.0


async def _bounded(rec: FaultRecord, call: Any) -> Any:
    """One caller-facing call during the fault, recorded; a hang fails the test."""
    try:
        return await asyncio.wait_for(rec.call(call), HANG_S)
    except TimeoutError:
        pytest.fail(f"{rec.fault}: a call was still running after {HANG_S} s: the caller hangs on the server")


async def _served_again(mgr: StorageManager, items: list[tuple[ChunkKey, bytes]], rec: FaultRecord) -> None:
    """Poll until the tier serves again (its breaker lets a probe through), then count losses."""
    keys = [k for k, _ in items]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_S
    while True:
        got = await mgr.get(keys)
        if all(v is not None for v in got) or loop.time() > deadline:
            break
        del got
        await mgr.tier("hot").backend.delete(keys)  # promotions of a partial answer: ask the tier again
        await asyncio.sleep(0.2)  # the breaker's cooldown passing, not a synchronisation of our own
    wrong = sum(1 for v, (_, want) in zip(got, items, strict=True) if v is not None and bytes(v) != want)
    rec.wrong += wrong
    rec.lost += sum(1 for v in got if v is None)
    assert wrong == 0
    assert [bytes(v) for v in got] == [want for _, want in items], f"{rec.fault}: stored values lost"


async def _calls_while_down(mgr: StorageManager, items: list[tuple[ChunkKey, bytes]], rec: FaultRecord,
                            rounds: int) -> None:
    keys = [k for k, _ in items]
    fresh = _items(4)
    for _ in range(rounds):
        assert await _bounded(rec, mgr.lookup(keys)) == 0
        got = await _bounded(rec, mgr.get(keys))
        rec.values(got, [None] * len(keys))  # anything but a miss is wrong while the server is down
        assert got == [None] * len(keys)
        await _bounded(rec, mgr.put(fresh))  # lands in the RAM tier; the shared tier's copy is skipped
        assert await _bounded(rec, mgr.contains([k for k, _ in fresh])) == [True] * len(fresh)


async def test_a_frozen_server_costs_each_call_at_most_its_deadline_and_loses_nothing(
    remote: Remote, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger(f"{remote.name}: server frozen (SIGSTOP)")
    items = _items(16)
    await _stored_by_a_first_engine(remote, items)
    async with await _open(remote) as mgr:  # a second engine: its RAM tier is empty
        remote.freeze()
        try:
            await _calls_while_down(mgr, items, rec, rounds=3)
            assert _sample(mgr, "lmtier_tier_circuit_open", tier="shared") == 1  # taken out at the first miss
        finally:
            remote.thaw()
        await _served_again(mgr, items, rec)
    assert rec.raised == 0 and rec.wrong == 0


async def test_a_server_stalled_for_a_second_costs_calls_their_deadline_then_serves_again(
    remote: Remote, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger(f"{remote.name}: server stalls 1 s (slow)")
    items = _items(16)
    await _stored_by_a_first_engine(remote, items)
    async with await _open(remote) as mgr:
        keys = [k for k, _ in items]
        remote.freeze()
        thaw = threading.Timer(1.0, remote.thaw)  # a GC pause, a fork for a snapshot: it ends by itself
        thaw.start()
        try:
            got = await _bounded(rec, mgr.get(keys))
            rec.values(got, [want for _, want in items])
            del got
            assert await _bounded(rec, mgr.lookup(keys)) in (0, len(keys))
        finally:
            thaw.join()
        await _served_again(mgr, items, rec)
    assert rec.raised == 0 and rec.wrong == 0


async def test_a_killed_server_is_a_miss_at_once_and_its_values_are_served_after_a_restart(
    remote: Remote, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger(f"{remote.name}: server killed (SIGKILL), restarted")
    items = _items(16)
    await _stored_by_a_first_engine(remote, items)
    async with await _open(remote) as mgr:
        remote.kill()
        await _calls_while_down(mgr, items, rec, rounds=3)
        assert _sample(mgr, "lmtier_tier_circuit_open", tier="shared") == 1
        await asyncio.to_thread(remote.restart)
        await _served_again(mgr, items, rec)
    assert rec.raised == 0 and rec.wrong == 0
