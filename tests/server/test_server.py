"""``lmtier serve`` for real: a server process, ServerStore clients and raw protocol clients.

Nothing is mocked: every test talks to a real server subprocess over its Unix socket and maps its
shared slab. Faults are real signals (``kill -9``, ``SIGSTOP``) to real processes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmtier.keys import ChunkKey, make_namespace
from lmtier.server import protocol as p
from tests.server.serverproc import RawClient, ServerProc, serve_command, start_server, tiers_yaml, wait_until
from tests.support.net import LOOPBACK_HEX, listening_addresses

pytestmark = pytest.mark.server

NS = make_namespace(test="server")
#: A bound on how long past its deadline a call may take on this loaded 2-core machine: the
#: behaviour checked is "answers by its deadline instead of hanging", not speed.
SLACK_S = 1.5


def keys(n: int, salt: int = 0) -> list[ChunkKey]:
    return [ChunkKey(NS, (salt * 1_000_003 + i).to_bytes(16, "big")) for i in range(n)]


def payload(i: int, size: int) -> bytes:
    return bytes((i * 7 + j) % 251 for j in range(251)) * (size // 251) + b"\x05" * (size % 251)


def store_chunks(store, ks: list[ChunkKey], size: int) -> int:
    chunks = store.reserve([size] * len(ks))
    assert all(c is not None for c in chunks)
    for i, c in enumerate(chunks):
        c.view()[:] = payload(i, size)
    return store.commit(list(zip(ks, chunks, strict=True))).result(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(tmp_path_factory.mktemp("serve"))
    yield srv
    srv.close()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[ServerProc]:
    srv = start_server(tmp_path)
    yield srv
    srv.close()


# -- data plane ---------------------------------------------------------------------------------
def test_a_client_stores_into_the_slab_and_another_client_reads_the_same_bytes_in_place(server: ServerProc) -> None:
    a, b = server.store(name="a"), server.store(name="b")
    ks = keys(4, salt=1)
    assert store_chunks(a, ks, 10_000) == 4
    assert a.lookup(ks).result().hit_chunks == 4
    assert a.tier_names == ["hot", "local"]
    assert a.lookup(ks).result().tiers == ("hot",) * 4
    assert b.lookup([*ks, *keys(1, salt=99)]).result().hit_chunks == 4
    leases = b.fetch(ks, [10_000] * 4).result()
    assert all(lease is not None for lease in leases)
    assert [bytes(lease.view()) for lease in leases] == [payload(i, 10_000) for i in range(4)]
    assert bytes(leases[0].tensor[:5].numpy()) == payload(0, 10_000)[:5]
    assert leases[0].view().readonly, "a lease is read-only: other processes read the same slot"
    status = server.status()
    assert status["leases"] == 4 and status["clients"] >= 2
    for lease in leases:
        lease.release()
    wait_until(lambda: server.status()["leases"] == 0, what="leases released")
    assert a.outstanding() == 0 and b.outstanding() == 0
    with pytest.raises(Exception, match="released twice"):
        leases[0].release()


def test_a_lookup_answers_its_tails_in_the_same_round_trip_when_the_whole_prefix_is_stored(server: ServerProc) -> None:
    store = server.store()
    ks = keys(5, salt=12)
    prefix, tails = ks[:2], ks[2:]
    assert store_chunks(store, [*prefix, tails[1]], 1000) == 3
    misses = dict(store.misses)
    found = store.lookup(prefix, tails=tails).result()
    assert (found.hit_chunks, found.tiers, found.tail_tiers) == (2, ("hot", "hot"), (None, "hot", None))
    assert store.lookup([ks[0], tails[0]], tails=tails).result().tail_tiers == ()  # a gap: tails extend nothing
    assert store.lookup([], tails=tails).result().tail_tiers == (None, "hot", None)  # the tails alone
    assert store.misses == misses


_BEFORE_TAILS = """
from lmtier.server.cache import SlabCache
_lookup = SlabCache.lookup
async def lookup(self, raw_keys, raw_tails=()):  # a server of before tails: asks the keys only, says nothing of tails
    tiers, _ = await _lookup(self, raw_keys, ())
    return tiers, None
SlabCache.lookup = lookup
"""


def test_a_server_that_predates_tails_has_every_tail_a_miss_and_serves_on(tmp_path: Path) -> None:
    srv = start_server(tmp_path, prelude=_BEFORE_TAILS)
    try:
        store = srv.store()
        ks = keys(3, salt=13)
        assert store_chunks(store, ks, 1000) == 3
        raw = RawClient(srv.socket_path)
        try:
            reply = raw.call(p.Lookup(id=raw.next_id(), keys=[p.encode_key(k.namespace, k.digest) for k in ks[:2]],
                                      tails=[p.encode_key(ks[2].namespace, ks[2].digest)]))
            assert isinstance(reply, p.LookupReply) and reply.hit_chunks == 2 and reply.tail_tiers is None
        finally:
            raw.close()
        found = store.lookup(ks[:2], tails=ks[2:]).result()
        assert (found.hit_chunks, found.tail_tiers) == (2, (None,)), "a tail the server did not answer is a miss"
    finally:
        srv.close()


def test_put_and_fetch_into_copy_caller_buffers_and_a_wrong_size_is_a_miss_that_is_deleted(server: ServerProc) -> None:
    store = server.store()
    (k1, k2) = keys(2, salt=2)
    assert store.put([(k1, payload(1, 5000)), (k2, payload(2, 300))]).result(timeout=30) == 2
    out1, out2 = bytearray(5000), bytearray(300)
    assert store.fetch_into([k1, k2], [out1, out2]) == [True, True]
    assert bytes(out1) == payload(1, 5000) and bytes(out2) == payload(2, 300)
    assert store.fetch_into([k1], [bytearray(4999)]) == [False]
    assert store.contains([k1, k2]) == [False, True], "the wrong-size value was deleted"
    assert store.outstanding() == 0


def test_a_chunk_only_in_a_colder_tier_is_copied_once_into_the_slab_and_leased(server: ServerProc) -> None:
    store = server.store()
    ks = keys(3, salt=3)
    assert store_chunks(store, ks, 4096) == 3
    store.flush()
    assert server.clear("hot")["cleared"]["hot"] >= 3  # the hot tier forgets them; the disk tier keeps them
    assert store.lookup(ks).result().hit_chunks == 3
    leases = store.fetch(ks, [4096] * 3).result()
    assert [bytes(lease.view()) for lease in leases] == [payload(i, 4096) for i in range(3)]
    for lease in leases:
        lease.release()
    tiers = {t["name"]: t for t in server.status()["tiers"]}
    assert tiers["local"]["hits"] >= 3


def test_a_full_slab_answers_none_for_a_reservation_it_cannot_fit(server: ServerProc) -> None:
    store = server.store()
    slab = server.status()["slab"]["bytes"]
    big = store.reserve([slab // 2, slab // 2, slab // 2])
    assert big[0] is not None and big[2] is None
    for c in big:
        if c is not None:
            c.release()


# -- liveness -----------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys
    from lmtier.server.client import ServerStore
    from lmtier.keys import ChunkKey
    ns, n = sys.argv[2], int(sys.argv[3])
    store = ServerStore(sys.argv[1], register_cuda=False, name="holder", lookup_timeout_s=30,
                        fetch_timeout_s=30, reserve_timeout_s=30, commit_timeout_s=30)
    ks = [ChunkKey(ns, (5_000_000 + i).to_bytes(16, "big")) for i in range(n)]
    print(store.put([(k, b"h" * 2048) for k in ks]).result(), flush=True)
    leases = store.fetch(ks, [2048] * n).result()
    reserved = store.reserve([1024, 1024])
    print("HELD", sum(x is not None for x in leases + reserved), flush=True)
    sys.stdin.read()  # hold until killed
""")


def test_kill_9_of_a_client_holding_leases_and_reservations_releases_everything(server: ServerProc) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, server.address, NS, "5"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        lines = [child.stdout.readline().strip(), child.stdout.readline().strip()]
        assert lines[1] == "HELD 7", lines
        held = {c["pid"]: c for c in server.status()["connections"]}[child.pid]
        assert held["leases"] == 5 and held["reservations"] == 2
        child.kill()
        child.wait(30)
        wait_until(lambda: all(c["pid"] != child.pid for c in server.status()["connections"]),
                   what="the killed client's connection to close")
        status = server.status()
        assert status["leases"] == 0 and status["reservations"] == 0
        assert f"client pid {child.pid} (holder) disconnected; released 7 slot(s)" in server.log()
    finally:
        child.kill()
        child.wait(30)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


def test_a_killed_server_is_a_miss_within_the_deadline_and_a_restarted_one_hits_again(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    store = srv.store(lookup_timeout_s=2.0, fetch_timeout_s=2.0, retry_max_s=0.2)
    try:
        ks = keys(3, salt=4)
        assert store_chunks(store, ks, 4096) == 3
        store.flush()
        held = store.fetch(ks[:1], [4096]).result()[0]
        srv.kill()
        calls = {"lookup": (lambda: store.lookup(ks).result().hit_chunks, 0),
                 "fetch": (lambda: store.fetch(ks, [4096] * 3).result(), [None] * 3),
                 "reserve": (lambda: store.reserve([4096]), [None]),
                 "contains": (lambda: store.contains(ks), [False] * 3)}
        for name, (call, miss) in calls.items():
            start = time.monotonic()
            assert call() == miss, name
            assert time.monotonic() - start < 2.0 + SLACK_S, f"{name} waited past its deadline"
        assert bytes(held.view()[:4]) == payload(0, 4096)[:4], "a lease of the dead server's slab stays readable"
        held.release()  # a no-op: the dead server released everything
        srv2 = start_server(tmp_path, name="restarted")  # same socket path, same disk tier
        try:
            wait_until(lambda: store.connected, what="the client to reconnect")
            assert store.stats()["reconnects"] >= 1 and store.stats()["server_pid"] == srv2.pid
            assert store.lookup(ks).result().hit_chunks == 3, "the disk tier survived the restart"
            leases = store.fetch(ks, [4096] * 3).result()
            assert [bytes(x.view()) for x in leases] == [payload(i, 4096) for i in range(3)]
            for x in leases:
                x.release()
            assert store.outstanding() == 0
        finally:
            srv2.close()
    finally:
        store.close()
        srv.close()


def test_a_frozen_server_is_a_miss_within_the_deadline_and_usable_again_once_it_thaws(own_server: ServerProc) -> None:
    store = own_server.store(lookup_timeout_s=1.0, retry_max_s=0.2)
    ks = keys(2, salt=5)
    assert store_chunks(store, ks, 2048) == 2
    own_server.signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert store.lookup(ks).result().hit_chunks == 0
        assert time.monotonic() - start < 1.0 + SLACK_S
        start = time.monotonic()
        assert store.lookup(ks).result().hit_chunks == 0 and store.reserve([2048]) == [None]
        assert time.monotonic() - start < SLACK_S, "while frozen, later calls are misses at once"
        assert not store.connected
    finally:
        own_server.signal(signal.SIGCONT)
    wait_until(lambda: store.connected, what="the thawed server to answer a ping")
    assert store.lookup(ks).result().hit_chunks == 2
    wait_until(lambda: own_server.status()["reservations"] == 0, what="late reservations to be released")
    assert store.stats()["misses"].get("lookup:deadline", 0) >= 1


# -- bad input ----------------------------------------------------------------------------------
def test_fetches_cancelled_or_past_their_deadline_on_a_frozen_server_leave_no_lease_once_it_thaws(
        own_server: ServerProc) -> None:
    store = own_server.store(fetch_timeout_s=1.0, retry_max_s=0.2)
    ks = keys(3, salt=14)
    assert store_chunks(store, ks, 2048) == 3
    (held,) = store.fetch(ks[:1], [2048]).result()
    assert held is not None
    own_server.signal(signal.SIGSTOP)
    try:
        cancelled = store.fetch(ks[1:2], [2048])
        assert cancelled.cancel(), "a frozen server cannot have answered"
        start = time.monotonic()
        assert store.fetch(ks[2:], [2048]).result() == [None]
        assert time.monotonic() - start < 1.0 + SLACK_S
        held.release()  # sent to a server that does not read: it goes when the server does
    finally:
        own_server.signal(signal.SIGCONT)
    # the server answers both fetches late, leasing a slot each: the client gives them back
    wait_until(lambda: own_server.status()["leases"] == 0, what="late leases and the release to be settled")
    assert store.outstanding() == 0
    wait_until(lambda: store.connected, what="the thawed server to answer a ping")
    leases = store.fetch(ks, [2048] * 3).result()
    assert [bytes(x.view()) for x in leases if x is not None] == [payload(i, 2048) for i in range(3)]
    for x in leases:
        assert x is not None
        x.release()
    wait_until(lambda: own_server.status()["leases"] == 0, what="leases released")


def test_a_client_of_another_protocol_version_is_refused_naming_both_versions(server: ServerProc) -> None:
    raw = RawClient(server.socket_path, hello=False)
    try:
        reply = raw.call(p.Hello(id=1, version=p.PROTOCOL_VERSION + 1, pid=os.getpid()))
        assert isinstance(reply, p.Error) and reply.code == p.E_VERSION
        assert f"version {p.PROTOCOL_VERSION + 1}" in reply.message and f"version {p.PROTOCOL_VERSION}" in reply.message
        assert raw.closed_by_server() and not raw.fds
    finally:
        raw.close()


def test_bad_requests_get_typed_errors_logged_with_the_pid_and_nothing_else_changes(server: ServerProc) -> None:
    import msgspec

    good = server.store(name="bystander")
    ks = keys(2, salt=6)
    assert store_chunks(good, ks, 1000) == 2
    raw = RawClient(server.socket_path)
    try:
        assert isinstance(raw.hello_reply, p.HelloReply) and len(raw.fds) == 1
        cases = [
            (p.frame(b"\xc1\xc1"), p.E_BAD_MESSAGE),
            (p.frame(msgspec.msgpack.encode({"op": "teleport", "id": 2})), p.E_UNKNOWN_OP),
            (p.encode(p.Commit(id=3, items=[(p.encode_key(NS, b"\x00" * 16), 999)])), p.E_NOT_HELD),
            (p.encode(p.Hello(id=4, version=p.PROTOCOL_VERSION, pid=1)), p.E_BAD_MESSAGE),
            (p.encode(p.Reserve(id=5, sizes=[1 << 40])), p.E_BAD_ARGUMENT),
        ]
        for data, code in cases:
            raw.send_raw(data)
            reply = raw.recv()
            assert isinstance(reply, p.Error) and reply.code == code, (code, reply)
        reply = raw.call(p.Fetch(id=6, keys=[p.encode_key(k.namespace, k.digest) for k in ks], sizes=[1000, 1000]))
        assert isinstance(reply, p.FetchReply)
        slot = reply.slots[0].slot
        assert isinstance(raw.call(p.Release(id=7, slots=[slot])), p.ReleaseReply)
        again = raw.call(p.Release(id=8, slots=[slot, reply.slots[1].slot]))
        assert isinstance(again, p.Error) and again.code == p.E_NOT_HELD, "a release twice is refused whole"
        assert isinstance(raw.call(p.Release(id=9, slots=[reply.slots[1].slot])), p.ReleaseReply)
        assert isinstance(raw.call(p.Ping(id=10)), p.PingReply), "the connection is still usable"
    finally:
        raw.close()
    assert good.lookup(ks).result().hit_chunks == 2, "nothing stored was lost; other clients unaffected"
    log = server.log()
    assert f"client pid {os.getpid()} (raw): refused request 2: unknown op 'teleport'" in log
    assert "[not_held]" in log


def test_an_impossible_frame_length_is_refused_and_only_that_connection_closes(server: ServerProc) -> None:
    raw = RawClient(server.socket_path)
    try:
        raw.send_raw(p.FRAME_HEADER.pack(p.MAX_FRAME_BYTES + 1))
        reply = raw.recv()
        assert isinstance(reply, p.Error) and reply.code == p.E_BAD_FRAME
        assert raw.closed_by_server()
    finally:
        raw.close()
    assert server.get("/healthz")[0] == 200


def test_a_request_before_hello_is_refused(server: ServerProc) -> None:
    raw = RawClient(server.socket_path, hello=False)
    try:
        reply = raw.call(p.Ping(id=1))
        assert isinstance(reply, p.Error) and reply.code == p.E_HELLO_FIRST
    finally:
        raw.close()


# -- the socket path ----------------------------------------------------------------------------
def test_the_socket_is_owner_only_by_default_and_socket_mode_widens_it(server: ServerProc, tmp_path: Path) -> None:
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o600
    other = start_server(tmp_path, extra=("--socket-mode", "0660"))
    try:
        assert stat.S_IMODE(other.socket_path.stat().st_mode) == 0o660
    finally:
        other.close()


def test_a_live_socket_path_is_refused_naming_the_pid_that_holds_it(server: ServerProc, tmp_path: Path) -> None:
    done = subprocess.run(serve_command("--config", str(tiers_yaml(tmp_path, disk=False)), "--socket",
                                        str(server.socket_path), "--http", "127.0.0.1:0"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"already served by lmtier serve pid {server.pid}" in done.stderr
    assert server.socket_path.exists() and server.get("/healthz")[0] == 200

    path = tmp_path / "someone-else.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        done = subprocess.run(serve_command("--config", str(tiers_yaml(tmp_path, disk=False)), "--socket", str(path),
                                            "--http", "127.0.0.1:0"), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"process {os.getpid()} is listening on it" in done.stderr
    finally:
        listener.close()


def test_a_stale_socket_file_is_replaced_and_a_file_that_is_not_a_socket_is_never_touched(tmp_path: Path) -> None:
    stale = tmp_path / "lmtier.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a killed server leaves
    srv = start_server(tmp_path, config=tiers_yaml(tmp_path, disk=False))
    try:
        assert "replacing the stale socket" in srv.log()
        assert srv.store().connected
    finally:
        srv.close()
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    done = subprocess.run(serve_command("--config", str(tiers_yaml(tmp_path, disk=False)), "--socket",
                                        str(precious), "--http", "127.0.0.1:0"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "is not a socket; not touching it" in done.stderr
    assert precious.read_text() == "mine"


# -- lifecycle and HTTP -------------------------------------------------------------------------
def test_sigterm_drains_background_writes_and_exits_0(tmp_path: Path) -> None:
    config = tiers_yaml(tmp_path, disk_write="async")
    srv = start_server(tmp_path, config=config)
    store = srv.store()
    ks = keys(20, salt=7)
    try:
        assert store_chunks(store, ks, 8192) == 20  # in the slab now; the disk tier is written behind
        assert srv.stop() == 0
        assert "lmtier serve: stopped; background writes drained" in srv.log()
        assert not srv.socket_path.exists()
        srv2 = start_server(tmp_path, config=config, name="after")
        try:
            wait_until(lambda: store.connected, what="reconnect")
            assert store.lookup(ks).result().hit_chunks == 20, "every async write reached the disk tier"
        finally:
            srv2.close()
    finally:
        store.close()
        srv.close()


def test_http_serves_health_metrics_status_and_clear_on_loopback_only(server: ServerProc) -> None:
    store = server.store()
    ks = keys(2, salt=8)
    store_chunks(store, ks, 512)
    for lease in store.fetch(ks, [512, 512]).result():  # a hit in the hot tier, whatever ran before
        lease.release()
    assert server.get("/healthz") == (200, b"ok\n")
    code, body = server.get("/metrics")
    text = body.decode()
    assert code == 200
    for name in ("lmtier_server_clients", "lmtier_server_leases", "lmtier_server_reservations",
                 "lmtier_server_slab_bytes", "lmtier_server_slab_used_bytes",
                 'lmtier_server_requests_total{op="commit"}',
                 *(f'{metric}{{tier="{tier}"}}' for tier in ("hot", "local") for metric in (
                     "lmtier_tier_hits_total", "lmtier_tier_misses_total", "lmtier_tier_evictions_total",
                     "lmtier_backend_bytes", "lmtier_backend_objects"))):
        assert name in text, name  # issue 15: per-tier bytes, objects, hits, misses, evictions (from the start)
    assert "# TYPE lmtier_tier_errors_total counter" in text  # labelled by op and kind: a series per error seen
    status = server.status()
    assert isinstance(status["clients"], int) and isinstance(status["leases"], int)
    assert [t["name"] for t in status["tiers"]] == ["hot", "local"]
    assert all(isinstance(t[f], int) for t in status["tiers"] for f in ("bytes", "hits"))
    assert {t["backend"] for t in status["tiers"]} == {"cpu", "disk"}
    cleared = server.clear("hot")
    assert cleared["cleared"]["hot"] >= 2 and list(cleared["cleared"]) == ["hot"] and cleared["kept"] == []
    assert {t["name"]: t["objects"] for t in server.status()["tiers"]}["hot"] == 0
    assert set(listening_addresses([server.pid])) <= LOOPBACK_HEX


def disk_files(root: Path) -> list[Path]:
    """The chunk files of a disk tier's root (not its marker file)."""
    return [f for f in root.rglob("*") if f.is_file() and re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]{32}", f.name)]


def test_clear_drops_every_tier_or_the_named_tiers_and_namespaces_and_refuses_bad_names(own_server: ServerProc,
                                                                                     tmp_path: Path) -> None:
    store = own_server.store()
    other = make_namespace(test="server-clear-other")
    mine, theirs = keys(3, salt=11), [ChunkKey(other, bytes([i]) * 16) for i in range(2)]
    assert store_chunks(store, mine, 1024) == 3 and store_chunks(store, theirs, 1024) == 2
    store.flush()
    disk = tmp_path / "disk"
    assert len(disk_files(disk)) == 5
    for query in (("ghost",), ("hot", "nope")):
        code, body = post(own_server, "/v1/clear?" + "&".join(f"tier={t}" for t in query))
        assert code == 400 and b"no tier named" in body
    for bad in ("/v1/clear?namespace=XYZ", "/v1/clear?namespace=" + "0" * 15, "/v1/clear?tiers=hot"):
        code, body = post(own_server, bad)
        assert code == 400, (bad, body)
    assert store.lookup(mine + theirs).result().hit_chunks == 5, "a refused clear cleared nothing"

    cleared = own_server.clear(namespaces=(NS,))  # every tier, one namespace
    assert cleared == {"cleared": {"hot": 3, "local": 3}, "total": 6, "kept": []}
    assert store.contains(mine + theirs) == [False] * 3 + [True] * 2
    assert len(disk_files(disk)) == 2 and all(f.name.startswith(other) for f in disk_files(disk))

    assert own_server.clear() == {"cleared": {"hot": 2, "local": 2}, "total": 4, "kept": []}
    assert store.contains(theirs) == [False, False] and disk_files(disk) == []
    assert own_server.status()["slab"]["used_bytes"] == 0
    assert store_chunks(store, mine[:1], 1024) == 1 and store.lookup(mine[:1]).result().hit_chunks == 1

    raw = RawClient(own_server.socket_path)  # the wire op: the same, with the per-tier counts
    try:
        reply = raw.call(p.Clear(id=raw.next_id(), tiers=["local"]))
        assert isinstance(reply, p.ClearReply) and reply.tiers == {"local": 1} and reply.cleared == 1
        bad = raw.call(p.Clear(id=raw.next_id(), tiers=["ghost"]))
        assert isinstance(bad, p.Error) and bad.code == p.E_BAD_ARGUMENT and "ghost" in bad.message
    finally:
        raw.close()
    assert store.lookup(mine[:1]).result().hit_chunks == 1, "the hot tier kept it"


def post(server: ServerProc, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(server.http + path, method="POST"), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_reserve_with_keys_skips_the_chunks_the_hot_tier_holds(server: ServerProc) -> None:
    store = server.store()
    ks = keys(3, salt=9)
    assert store_chunks(store, ks[:2], 700) == 2
    slots = store.reserve([700, 700, 700], keys=ks)
    assert slots[0] is None and slots[1] is None and slots[2] is not None, "only the new chunk needs a copy"
    slots[2].release()
    assert store.outstanding() == 0


def test_a_commit_sent_just_before_close_is_stored(server: ServerProc) -> None:
    store = server.store()
    ks = keys(3, salt=10)
    slots = store.reserve([900] * 3)
    for i, c in enumerate(slots):
        c.view()[:] = payload(i, 900)
    store.commit(list(zip(ks, slots, strict=True)))  # not waited on
    store.close()
    other = server.store()
    assert other.lookup(ks).result().hit_chunks == 3


def residency_until(store, want: set[tuple[str, ChunkKey, bool]]) -> int:  # type: ignore[no-untyped-def]
    """Take ``store``'s residency changes until they are ``want`` (they arrive a call late, as the
    background requests are answered); returns the dropped count they came with."""
    got: set[tuple[str, ChunkKey, bool]] = set()
    dropped = 0

    def arrived() -> bool:
        nonlocal dropped
        events, n = store.take_residency()
        dropped += n
        got.update((e.tier, e.key, e.held) for e in events)
        assert got <= want, f"unexpected residency changes {got - want}"
        return got == want

    wait_until(arrived, what=f"residency changes {want}")
    return dropped


def test_residency_tells_each_subscribed_client_what_the_tiers_took_and_dropped(tmp_path: Path) -> None:
    srv = start_server(tmp_path, config=tiers_yaml(tmp_path, slab="1MiB"))
    try:
        a, b = srv.store(name="a"), srv.store(name="b")
        assert a.take_residency() == ([], 0)  # starts recording for a's connection; b never asks
        ks = keys(3, salt=7)
        size = 400 << 10  # the slab holds two
        assert store_chunks(b, ks[:2], size) == 2  # another client's stores are told too
        b.flush()
        assert residency_until(a, {("hot", ks[0], True), ("hot", ks[1], True), ("local", ks[0], True),
                                   ("local", ks[1], True)}) == 0
        assert store_chunks(b, ks[2:], size) == 1  # the slab evicts ks[0]; the disk tier has it
        b.flush()
        residency_until(a, {("hot", ks[2], True), ("local", ks[2], True), ("hot", ks[0], False)})
        b.delete([ks[1]])
        residency_until(a, {("hot", ks[1], False), ("local", ks[1], False)})
        raw = RawClient(srv.socket_path)  # the wire form: [key, tier name, held] triples
        try:
            assert raw.call(p.Residency(id=raw.next_id())) == p.ResidencyReply(id=2)
            b.delete([ks[2]])
            reply = raw.call(p.Residency(id=raw.next_id()))
            assert isinstance(reply, p.ResidencyReply) and reply.dropped == 0
            assert sorted(reply.changes) == [(p.encode_key(NS, ks[2].digest), "hot", False),
                                             (p.encode_key(NS, ks[2].digest), "local", False)]
        finally:
            raw.close()
    finally:
        srv.close()


#: A server of the protocol revision before the ``residency`` op (what an older ``lmtier serve`` runs).
_BEFORE_RESIDENCY = """
import typing
import msgspec
from lmtier.server import protocol as p
p.OPS = p.OPS - {"residency"}
p._REQUEST_DECODER = msgspec.msgpack.Decoder(
    typing.Union[tuple(c for c in p.Request.__args__ if c is not p.Residency)])
"""


def test_a_server_that_predates_residency_is_asked_once_and_serves_on(tmp_path: Path) -> None:
    from lmtier.errors import NotSupportedError

    srv = start_server(tmp_path, prelude=_BEFORE_RESIDENCY)
    try:
        raw = RawClient(srv.socket_path)
        try:
            reply = raw.call(p.Residency(id=raw.next_id()))
            assert isinstance(reply, p.Error) and reply.code == p.E_UNKNOWN_OP
        finally:
            raw.close()
        store = srv.store(name="new-client")
        assert store.take_residency() == ([], 0)  # asks in the background: never waits

        def refused() -> bool:
            try:
                store.take_residency()
            except NotSupportedError as exc:
                assert "does not report residency changes" in str(exc)
                return True
            return False

        wait_until(refused, what="the store to learn that the server predates residency")
        with pytest.raises(NotSupportedError):  # not asked again
            store.take_residency()
        ks = keys(2, salt=11)
        assert store_chunks(store, ks, 4096) == 2  # the connection serves on
        assert store.lookup(ks).result().hit_chunks == 2
        assert srv.log_path.read_text().count("unknown op 'residency'") == 2  # the raw client's, then one
    finally:
        srv.close()


def test_take_residency_never_waits_on_a_frozen_server(own_server: ServerProc) -> None:
    store = own_server.store(lookup_timeout_s=5.0, retry_max_s=0.2)  # a blocking call would wait 5 s
    assert store.take_residency() == ([], 0)
    own_server.signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        for _ in range(5):  # what vLLM's KV events do every worker step
            assert store.take_residency()[0] == []
        assert time.monotonic() - start < SLACK_S, "a worker step never waits on the server's residency"
    finally:
        own_server.signal(signal.SIGCONT)
    ks = keys(1, salt=15)
    assert store_chunks(store, ks, 1024) == 1
    store.flush()
    residency_until(store, {("hot", ks[0], True), ("local", ks[0], True)})  # and they flow again once it thaws
