"""``lmtier serve`` frozen (SIGSTOP), stalled and killed (SIGKILL) under a real client, for the
reliability table (issue 14, item 8's frozen and killed servers; issue 15, item 5).

A real server process (its slab, a disk tier written through) and a real
:class:`~lmtier.server.client.ServerStore`, the engine's store, with sub-second deadlines. While
the server cannot answer, every call the engine makes (lookup, contains, fetch, reserve) returns a
miss within its deadline (HANG_S bounds it: a call still running then is a hang); once the server
runs again (thawed, or restarted on the same socket and disk tier) every stored value is served,
byte-exact. Latency is recorded for the table, never asserted.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtier.keys import ChunkKey, make_namespace
from tests.faults.ledger import FaultRecord
from tests.server.serverproc import ServerProc, start_server, tiers_yaml, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.server]
#: the client's deadlines (seconds); a call past HANG_S is a hang, the failure looked for
DEADLINES = {"lookup_timeout_s": 0.5, "fetch_timeout_s": 1.0, "reserve_timeout_s": 0.5, "commit_timeout_s": 5.0,
             "retry_max_s": 0.2}
HANG_S = 3.0
CHUNK = 64 << 10


def _items(n: int) -> list[tuple[ChunkKey, bytes]]:
    ns = make_namespace(test="lmtier-serve-faults")
    return [(ChunkKey(ns, i.to_bytes(16, "big")), bytes([i % 251 + 1]) * CHUNK) for i in range(n)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProc]:
    srv = start_server(tmp_path, config=tiers_yaml(tmp_path, slab="64MiB"))
    yield srv
    srv.close()


def _store(server: ServerProc, items: list[tuple[ChunkKey, bytes]]) -> Any:
    """Store ``items`` through a writer with generous deadlines (this machine is shared), then
    return the engine's client, with the short deadlines, connected."""
    with server.store() as writer:
        wait_until(lambda: writer.connected, 60, "the writer to connect")
        _put(writer, items)
    store = server.store(**DEADLINES)
    wait_until(lambda: store.connected, 60, "the client to connect")
    return store


def _put(store: Any, items: list[tuple[ChunkKey, bytes]]) -> None:
    slots = store.reserve([len(v) for _, v in items])
    assert all(s is not None for s in slots)
    for slot, (_, value) in zip(slots, items, strict=True):
        slot.view()[:] = value
    assert store.commit([(k, s) for (k, _), s in zip(items, slots, strict=True)]).result(timeout=30) == len(items)
    store.flush()


def _bounded(rec: FaultRecord, call: Callable[[], Any]) -> Any:
    def timed() -> Any:
        got = call()
        return got.result(timeout=HANG_S) if hasattr(got, "result") else got
    return rec.call_now(timed)


def _calls_while_down(store: Any, items: list[tuple[ChunkKey, bytes]], rec: FaultRecord, rounds: int) -> None:
    keys = [k for k, _ in items]
    for _ in range(rounds):
        assert _bounded(rec, lambda: store.lookup(keys)).hit_chunks == 0
        assert _bounded(rec, lambda: store.contains(keys)) == [False] * len(keys)
        leases = _bounded(rec, lambda: store.fetch(keys, [CHUNK] * len(keys)))
        rec.values([None if x is None else bytes(x.view()) for x in leases], [None] * len(keys))
        assert leases == [None] * len(keys)
        assert _bounded(rec, lambda: store.reserve([CHUNK])) == [None]  # the store is skipped
    assert rec.worst_s < HANG_S


def _served_again(store: Any, items: list[tuple[ChunkKey, bytes]], rec: FaultRecord) -> None:
    keys = [k for k, _ in items]
    wait_until(lambda: store.connected, 60, "the client to be connected again")
    wait_until(lambda: store.lookup(keys).result().hit_chunks == len(keys), 60, "every stored chunk to hit")
    leases = store.fetch(keys, [CHUNK] * len(keys)).result()
    got = [None if x is None else bytes(x.view()) for x in leases]
    for x in leases:
        if x is not None:
            x.release()
    rec.wrong += sum(1 for g, (_, want) in zip(got, items, strict=True) if g is not None and g != want)
    rec.lost += sum(1 for g in got if g is None)
    assert got == [want for _, want in items], f"{rec.fault}: stored values lost or changed"
    assert store.outstanding() == 0


def test_a_frozen_lmtier_serve_costs_each_call_its_deadline_and_loses_nothing(
    server: ServerProc, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger("lmtier serve: server frozen (SIGSTOP)")
    items = _items(6)
    store = _store(server, items)
    server.signal(signal.SIGSTOP)
    try:
        _calls_while_down(store, items, rec, rounds=3)
    finally:
        server.signal(signal.SIGCONT)
    _served_again(store, items, rec)
    wait_until(lambda: server.status()["reservations"] == 0 and server.status()["leases"] == 0, 30,
               "late replies' slots to be released")


def test_an_lmtier_serve_stalled_for_a_second_costs_calls_their_deadline_then_serves(
    server: ServerProc, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger("lmtier serve: server stalls 1 s (slow)")
    items = _items(4)
    store = _store(server, items)
    keys = [k for k, _ in items]
    stalled = time.monotonic()
    server.signal(signal.SIGSTOP)
    try:
        assert _bounded(rec, lambda: store.lookup(keys)).hit_chunks == 0  # its deadline, then a miss
        assert _bounded(rec, lambda: store.contains(keys)) == [False] * len(keys)  # a miss at once
        time.sleep(max(0.0, 1.0 - (time.monotonic() - stalled)))  # the fault's length, not a synchronisation
    finally:
        server.signal(signal.SIGCONT)
    _served_again(store, items, rec)


def test_a_killed_lmtier_serve_is_a_miss_at_once_and_a_restart_serves_the_disk_tier(
    tmp_path: Path, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger("lmtier serve: server killed (SIGKILL), restarted")
    srv = start_server(tmp_path, config=tiers_yaml(tmp_path, slab="64MiB"))
    try:
        items = _items(6)
        store = _store(srv, items)  # the disk tier is written through: the chunks outlive the slab
        srv.kill()
        _calls_while_down(store, items, rec, rounds=3)
        restarted = start_server(tmp_path, config=tiers_yaml(tmp_path, slab="64MiB"), name="restarted")
        try:
            _served_again(store, items, rec)
            wait_until(lambda: restarted.status()["leases"] == 0, 30, "the leases to be released (sent, not awaited)")
        finally:
            restarted.close()
    finally:
        srv.close()  # closes its clients too
