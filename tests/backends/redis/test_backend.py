"""The redis tier's own behaviour: corrupt values, credentials, limits, sockets, cancellation.

Every test talks to a real redis-server; values are planted or inspected with plain redis-py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest
import redis

from lmtier.errors import BackendTimeoutError, BackendUnavailableError, CapacityError, ConfigError
from lmtier.framing import HEADER_BYTES, encode_header
from lmtier.keys import ChunkKey, make_namespace
from lmtier_backends.redis.backend import RedisBackend, open_redis_backend
from lmtier_backends.redis.config import RedisConfig
from tests.backends.redis.conftest import PASSWORD, options_for

pytestmark = pytest.mark.redis


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="redis-backend", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _raw(server, **kwargs) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, **kwargs)


async def _until(condition, timeout_s: float = 30.0) -> None:
    """Poll ``condition`` on the event loop until it holds; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


async def _open(url: str, **overrides) -> RedisBackend:
    return await open_redis_backend(RedisConfig(**options_for(url, **overrides)))


@pytest.mark.asyncio
async def test_a_key_holding_another_redis_type_is_corrupt_not_a_fault(redis_server) -> None:
    backend = await _open(redis_server.url)
    try:
        (key,) = _keys(1)
        raw = _raw(redis_server)
        raw.rpush(backend._name(key), b"a", b"b")
        assert await backend.get([key]) == [None]
        assert raw.exists(backend._name(key)) == 0
        assert backend.stats()["corrupt"] == 1
        raw.close()
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_get_into_a_buffer_of_the_wrong_size_is_a_miss_and_keeps_the_value(redis_server) -> None:
    backend = await _open(redis_server.url)
    try:
        (key,) = _keys(1)
        data = os.urandom(1 << 20)
        await backend.put([(key, data)])
        assert await backend.get_into([key], [bytearray(len(data) + 1)]) == [False]
        assert backend.stats()["corrupt"] == 0
        out = bytearray(len(data))
        assert await backend.get_into([key], [out]) == [True]
        assert out == data
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_pipelined_replies_of_mixed_sizes_and_misses_land_in_the_right_buffers(redis_server) -> None:
    backend = await _open(redis_server.url)
    try:
        keys = _keys(40)
        sizes = [0, 1, 63, 64, 65, 4095, 16 << 10, (16 << 10) + 1, 300_000, 3 << 20]
        stored = {k: os.urandom(sizes[i % len(sizes)]) for i, k in enumerate(keys) if i % 4 != 3}
        await backend.put(list(stored.items()))
        got = await backend.get(keys)
        for k, g in zip(keys, got, strict=True):
            assert (None if g is None else bytes(g)) == stored.get(k)
        outs = [bytearray(len(stored.get(k, b"?"))) for k in keys]
        filled = await backend.get_into(keys, outs)
        assert filled == [k in stored for k in keys]
        assert all(bytes(o) == stored[k] for k, o in zip(keys, outs, strict=True) if k in stored)
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_checksums_hashed_ahead_while_sending_match_every_payload_in_any_order_of_sizes(redis_server) -> None:
    """Large payloads go out in pieces while the next one is hashed between them; small and
    odd-sized neighbours, and sizes on and off the piece boundary, all get their own checksum."""
    from lmtier_backends.redis._wire import _PIECE, _SMALL

    sizes = [3 * _PIECE + 5, _SMALL, 2 * _PIECE, 10, _PIECE - 1, 5 * _PIECE + 3, _SMALL - 1, _PIECE,
             _PIECE + 1, 0, 4 * _PIECE]
    backend = await _open(redis_server.url)
    try:
        keys = _keys(len(sizes))
        values = [os.urandom(n) for n in sizes]
        await backend.put(list(zip(keys, values, strict=True)))
        assert [bytes(g) for g in await backend.get(keys)] == values  # each checksum verified
        assert backend.stats()["corrupt"] == 0
        raw = _raw(redis_server)
        for key, value in zip(keys, values, strict=True):
            assert raw.get(backend._name(key)) == encode_header(key, value) + value
        raw.close()
    finally:
        await backend.aclose()


def test_groups_written_in_partial_sendmsg_calls_arrive_whole_and_in_order() -> None:
    """One ``sendmsg`` per group: a kernel taking part of it (a small send buffer) gets the rest,
    from the exact byte it stopped at, before the next group."""
    import socket
    import threading

    from lmtier_backends.redis._wire import _send_groups

    class _Conn:  # what _send_groups uses of a redis-py connection
        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def disconnect(self) -> None:  # pragma: no cover - only on a failed write
            raise AssertionError("the write failed")

    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    left.settimeout(30)
    groups = [[b"head-%d|" % i, memoryview(os.urandom(300_000 + i)), b"|"] for i in range(4)]
    expected = b"".join(bytes(p) for g in groups for p in g)
    received = bytearray()

    def read() -> None:
        while len(received) < len(expected):
            received.extend(right.recv(1 << 16))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        _send_groups(_Conn(left), iter(groups))
    finally:
        reader.join(timeout=30)
        left.close()
        right.close()
    same = bytes(received) == expected  # a bool: never let pytest diff megabytes
    assert same, f"received {len(received)} bytes, not the {len(expected)} sent in order"


@pytest.mark.asyncio
async def test_a_put_cancelled_mid_batch_never_sends_the_rest_on_a_new_connection(own_redis) -> None:
    server = own_redis()
    backend = await _open(server.url, read_timeout_s=600, max_connections=1)
    raw = _raw(server)
    try:
        keys = _keys(9)
        errors = raw.info("stats")["total_error_replies"]  # handshakes so far (e.g. CLIENT SETINFO on 7.0)
        os.kill(server.pid, signal.SIGSTOP)  # the batch fills the socket buffers and blocks mid-payload
        task = asyncio.ensure_future(backend.put([(k, os.urandom(4 << 20)) for k in keys[:8]]))
        await _until(lambda: backend.stats()["jobs_running"] == 1)
        task.cancel()  # drops the connection under the blocked write
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=20)
        os.kill(server.pid, signal.SIGCONT)
        # the server reads what the dropped connection had sent, then frees it; had the rest of
        # the batch gone out on a new connection, a client of ours would remain
        await _until(lambda: not [c for c in raw.client_list() if c["name"] == "lmtier"])
        assert raw.info("stats")["total_error_replies"] == errors  # no payload bytes parsed as commands
        await backend.put([(keys[8], b"after")])  # the tier is usable on a fresh connection
        assert bytes((await backend.get(keys[8:]))[0]) == b"after"
    finally:
        os.kill(server.pid, signal.SIGCONT)
        raw.close()
        await backend.aclose()


def test_a_put_batch_is_cut_into_runs_of_about_equal_bytes_none_under_the_minimum() -> None:
    from lmtier_backends.redis.backend import _STRIPE_BYTES, _stripes

    big = _STRIPE_BYTES
    assert _stripes(list(range(8)), [big] * 8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert _stripes(list(range(8)), [big] * 8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert _stripes([4, 9, 11], [0] * 4 + [2 * big] + [0] * 4 + [1] + [0] + [2 * big], 4) == [[4], [9, 11]]
    assert _stripes(list(range(4)), [big // 4] * 4, 2) == [[0, 1, 2, 3]]  # too small to split
    assert _stripes([0], [10 * big], 2) == [[0]]
    assert _stripes(list(range(4)), [big] * 4, 1) == [[0, 1, 2, 3]]


@pytest.mark.asyncio
async def test_a_large_put_batch_goes_out_on_parallel_connections(own_redis) -> None:
    server = own_redis()
    backend = await _open(server.url, put_streams=2, read_timeout_s=600)
    try:
        keys = _keys(8)
        values = [os.urandom(2 << 20) for _ in keys]
        os.kill(server.pid, signal.SIGSTOP)  # both halves block until the server answers
        task = asyncio.ensure_future(backend.put(list(zip(keys, values, strict=True))))
        await _until(lambda: backend.stats()["jobs_running"] == 2)
        os.kill(server.pid, signal.SIGCONT)
        await task
        assert [bytes(g) for g in await backend.get(keys)] == values
    finally:
        os.kill(server.pid, signal.SIGCONT)
        await backend.aclose()


@pytest.mark.asyncio
async def test_a_key_given_twice_in_a_put_batch_keeps_its_last_value(redis_server) -> None:
    backend = await _open(redis_server.url, put_streams=4)
    try:
        keys = _keys(6)
        first, last = os.urandom(5 << 20), os.urandom(5 << 20)
        items = [(keys[0], first)] + [(k, os.urandom(5 << 20)) for k in keys[1:]] + [(keys[0], last)]
        await backend.put(items)  # 35 MiB: split over parallel streams
        got = await backend.get(keys)
        assert bytes(got[0]) == last
        assert [bytes(g) for g in got[1:]] == [v for _, v in items[1:-1]]
        assert backend.stats()["puts"] == 7
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_without_the_direct_read_parser_replies_are_copied_from_redis_pys_parser(
    redis_server, monkeypatch
) -> None:
    """The fallback when hiredis (or the parser hook) is missing: same results, one more copy."""
    import lmtier_backends.redis.backend as backend_module

    monkeypatch.setattr(backend_module, "direct_read_parser", lambda sink: None)
    backend = await _open(redis_server.url)
    try:
        keys = _keys(6)
        values = [os.urandom(n) for n in (0, 10, 70_000, 300_000, 1 << 20, 5)]
        await backend.put(list(zip(keys, values, strict=True)))
        assert [bytes(g) for g in await backend.get(keys)] == values
        outs = [bytearray(len(v)) for v in values]
        assert await backend.get_into(keys, outs) == [True] * 6
        assert [bytes(o) for o in outs] == values
        raw = _raw(redis_server)
        raw.set(backend._name(keys[0]), b"garbage")
        assert await backend.get(keys[:1]) == [None]
        assert backend.stats()["corrupt"] == 1
        raw.close()
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_large_gets_are_lease_views_of_the_receive_slab_until_it_is_full(redis_server) -> None:
    from lmtier.memory import host_tensor_of

    backend = await _open(redis_server.url, recv_pool_bytes=(5 << 20) // 2)
    try:
        keys = _keys(3)
        values = [os.urandom(1 << 20) for _ in keys]
        await backend.put(list(zip(keys, values, strict=True)))
        got = await backend.get(keys)
        assert [bytes(g) for g in got] == values
        assert host_tensor_of(got[0]) is not None and memoryview(got[0]).readonly
        assert backend.stats()["recv_pool_fallbacks"] >= 1  # the third MiB did not fit: plain buffer
        del got
        assert backend.stats()["recv_pool_used_bytes"] == 0  # views dropped: the slab is free again
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_with_the_receive_slab_off_gets_are_plain_read_only_buffers(redis_server) -> None:
    from lmtier.memory import host_tensor_of

    backend = await _open(redis_server.url, recv_pool_bytes=0)
    try:
        keys = _keys(2)
        values = [os.urandom(1 << 20), os.urandom(3 << 20)]
        await backend.put(list(zip(keys, values, strict=True)))
        got = await backend.get(keys)
        assert [bytes(g) for g in got] == values
        assert host_tensor_of(got[0]) is None and memoryview(got[0]).readonly
        assert backend.stats()["recv_pool_fallbacks"] == 0  # no slab at all, not a full one
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_keys_carry_the_prefix_and_the_ttl(redis_server) -> None:
    backend = await _open(redis_server.url, key_prefix="myapp:kv:", ttl_s=120)
    try:
        (key,) = _keys(1)
        await backend.put([(key, b"v" * 100)])
        raw = _raw(redis_server)
        name = f"myapp:kv:{key}"
        assert raw.exists(name) == 1
        assert 0 < raw.pttl(name) <= 120_000
        assert raw.strlen(name) == HEADER_BYTES + 100
        assert backend.capabilities.evicts is True  # a TTL drops entries
        raw.close()
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_capabilities_follow_the_servers_eviction_policy_and_bulk_limit(own_redis) -> None:
    server = own_redis(maxmemory_policy="noeviction",
                       extra_args=["--proto-max-bulk-len", str(2 << 20)])
    backend = await _open(server.url)
    try:
        caps = backend.capabilities
        assert caps.persistent and caps.shared and caps.evicts is False
        assert caps.max_item_bytes == (2 << 20) - HEADER_BYTES
        (key,) = _keys(1)
        with pytest.raises(CapacityError, match="proto-max-bulk-len"):
            await backend.put([(key, bytes(2 << 20))])
    finally:
        await backend.aclose()
    evicting = own_redis(maxmemory_policy="allkeys-lru")
    backend = await _open(evicting.url)
    try:
        assert backend.capabilities.evicts is True
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_maxmemory_with_noeviction_is_a_capacity_error(own_redis) -> None:
    server = own_redis(maxmemory="4mb", maxmemory_policy="noeviction")
    backend = await _open(server.url)
    try:
        keys = _keys(8)
        with pytest.raises(CapacityError, match="maxmemory"):
            for k in keys:
                await backend.put([(k, os.urandom(1 << 20))])
        assert backend.stats()["errors"] >= 1
        # reads still work while the server is full
        assert (await backend.get([keys[0]]))[0] is not None
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_a_unix_socket_url_works(own_redis, tmp_path) -> None:
    sock = tmp_path / "redis.sock"
    server = own_redis(extra_args=["--unixsocket", str(sock), "--unixsocketperm", "700"])
    assert server.running
    backend = await open_redis_backend(RedisConfig(url=f"unix://{sock}?db=2", key_prefix="u:"))
    try:
        (key,) = _keys(1)
        await backend.put([(key, b"over a unix socket")])
        assert bytes((await backend.get([key]))[0]) == b"over a unix socket"
        raw = _raw(server, db=2)
        assert raw.exists(f"u:{key}") == 1
        raw.close()
    finally:
        await backend.aclose()


# -- credentials -----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_wrong_password_is_a_config_error_at_open_that_does_not_show_it(redis_with_password, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError, match="refused our credentials") as info:
        await open_redis_backend(RedisConfig(url=redis_with_password.url, password="not-the-password-9b1"))
    assert "not-the-password-9b1" not in str(info.value)
    assert "not-the-password-9b1" not in caplog.text


@pytest.mark.asyncio
async def test_a_missing_password_is_a_config_error_at_open(redis_with_password) -> None:
    with pytest.raises(ConfigError, match="refused our credentials"):
        await open_redis_backend(RedisConfig(url=redis_with_password.url))


@pytest.mark.asyncio
async def test_an_unset_password_variable_is_a_config_error_naming_it(redis_with_password, monkeypatch) -> None:
    monkeypatch.delenv("LMTIER_TEST_UNSET_PW", raising=False)
    with pytest.raises(ConfigError, match="LMTIER_TEST_UNSET_PW"):
        await open_redis_backend(RedisConfig(url=redis_with_password.url, password_env="LMTIER_TEST_UNSET_PW"))


@pytest.mark.asyncio
async def test_a_password_in_the_url_works_and_never_shows(redis_with_password, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    config = RedisConfig(url=f"redis://:{PASSWORD}@127.0.0.1:{redis_with_password.port}/0")
    assert PASSWORD not in repr(config) and PASSWORD not in str(config) and PASSWORD not in config.url
    backend = await open_redis_backend(config)
    try:
        (key,) = _keys(1)
        await backend.put([(key, b"authenticated")])
        assert bytes((await backend.get([key]))[0]) == b"authenticated"
        assert PASSWORD not in repr(backend.stats()) and PASSWORD not in backend.where
    finally:
        await backend.aclose()
    redis_with_password.kill()  # a fault now: its message and log lines must not carry the password either
    try:
        backend = await open_redis_backend(config.model_copy(update={"connect_at_open": False}))
        with pytest.raises(BackendUnavailableError) as info:
            await backend.get([key])
        await backend.aclose()
        assert PASSWORD not in str(info.value)
    finally:
        redis_with_password.start()
    assert PASSWORD not in caplog.text


@pytest.mark.asyncio
async def test_an_untrusted_tls_certificate_is_a_config_error_at_open(redis_tls) -> None:
    with pytest.raises(ConfigError, match="certificate"):
        await open_redis_backend(RedisConfig(url=redis_tls.url))  # the system store lacks our CA
    backend = await open_redis_backend(RedisConfig(url=redis_tls.url, tls_verify=False))
    try:
        (key,) = _keys(1)
        await backend.put([(key, b"unverified but encrypted")])
        assert bytes((await backend.get([key]))[0]) == b"unverified but encrypted"
    finally:
        await backend.aclose()


# -- availability ----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_server_that_is_down_at_open_is_unavailable_unless_connect_at_open_is_off(own_redis) -> None:
    server = own_redis()
    server.stop()
    with pytest.raises(BackendUnavailableError, match="is the server up"):
        await _open(server.url)
    backend = await _open(server.url, connect_at_open=False)
    try:
        (key,) = _keys(1)
        with pytest.raises(BackendUnavailableError):
            await backend.put([(key, b"x")])
        server.start()  # same port: the tier works without being reopened
        await backend.put([(key, b"x")])
        assert bytes((await backend.get([key]))[0]) == b"x"
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_a_stalled_server_is_a_timeout(own_redis) -> None:
    server = own_redis()
    backend = await _open(server.url, read_timeout_s=0.3)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        (key,) = _keys(1)
        with pytest.raises(BackendTimeoutError):
            await backend.get([key])
    finally:
        os.kill(server.pid, signal.SIGCONT)
        await backend.aclose()


@pytest.mark.asyncio
async def test_cancelling_get_into_aborts_the_transfer_and_the_tier_stays_usable(own_redis) -> None:
    server = own_redis()
    # a read deadline far beyond the test's own: the call can only return early by aborting
    backend = await _open(server.url, read_timeout_s=600, max_connections=1)
    try:
        (key,) = _keys(1)
        data = os.urandom(4 << 20)
        await backend.put([(key, data)])
        os.kill(server.pid, signal.SIGSTOP)  # the GET is sent, and its reply never comes
        out = bytearray(len(data))
        task = asyncio.ensure_future(backend.get_into([key], [out]))
        await _until(lambda: backend.stats()["jobs_running"] == 1)  # blocked on the stalled server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=20)
        os.kill(server.pid, signal.SIGCONT)
        # with one connection and one worker, this runs only once the cancelled job has finished
        out2 = bytearray(len(data))
        assert await backend.get_into([key], [out2]) == [True]
        assert out2 == data
    finally:
        os.kill(server.pid, signal.SIGCONT)
        await backend.aclose()


@pytest.mark.asyncio
async def test_calls_after_aclose_are_unavailable_errors(redis_server) -> None:
    backend = await _open(redis_server.url)
    await backend.aclose()
    with pytest.raises(BackendUnavailableError, match="closed"):
        await backend.get(_keys(1))


# -- Cluster ---------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_cluster_batches_are_spread_over_every_primary(redis_cluster) -> None:
    backend = await _open(redis_cluster.url, cluster=True)
    try:
        keys = _keys(60)
        await backend.put([(k, b"c" * 10) for k in keys])
        counts = []
        for port in redis_cluster.ports:
            raw = redis.Redis(host="127.0.0.1", port=port)
            counts.append(sum(1 for _ in raw.scan_iter(match=backend.config.key_prefix + "*")))
            raw.close()
        assert sum(counts) == 60 and all(c > 0 for c in counts), counts
        assert backend.stats()["nodes"] == 3
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_cluster_keys_answered_with_moved_are_retried_after_a_slot_map_refresh(redis_cluster) -> None:
    backend = await _open(redis_cluster.url, cluster=True)
    try:
        keys = _keys(30)
        await backend.put([(k, b"m" * 10) for k in keys])
        # poison the client's slot map: every key is routed to one node, which answers MOVED
        # for the keys it does not own, so the tier must refresh the map and retry those keys
        cluster = backend._cluster
        first = cluster.get_primaries()[0]
        for slot in list(cluster.nodes_manager.slots_cache):
            cluster.nodes_manager.slots_cache[slot] = [first]
        got = await backend.get(keys)
        assert [bytes(g) for g in got] == [b"m" * 10] * 30
        assert backend.stats()["moved_retries"] > 0
    finally:
        await backend.aclose()
