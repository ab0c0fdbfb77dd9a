"""Faults of a real S3 server, seen through the s3 tier and the StorageManager.

The server is killed mid-batch and restarted (each test here owns its server); the tier's calls
become misses and skipped writes, the circuit opens, and the tier recovers after a restart.
Configuration faults (wrong keys, missing bucket) are clear ConfigErrors at open. A socket that
accepts and never answers stands in for a hung server (fault injection, not a mock of S3).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from lmtier.errors import BackendTimeoutError, BackendUnavailableError, ConfigError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier_backends.s3.backend import S3Backend, _make_client, open_s3_backend
from lmtier_backends.s3.config import S3Config
from tests.backends.s3.conftest import options_for
from tests.support.backdoors import rot_in_volume
from tests.support.seaweedfs import SeaweedFS

pytestmark = pytest.mark.s3

MiB = 1 << 20
RECOVERY_DEADLINE_S = 60.0  # a first PUT after a restart has been seen to take 5 s


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="s3-faults", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _fast_failing(options: dict[str, Any]) -> dict[str, Any]:
    """Options that fail fast when the server is gone (no client retries, short timeouts)."""
    return {**options, "max_attempts": 1, "connect_timeout_s": 0.5, "read_timeout_s": 5, "max_concurrency": 2}


class FakeClock:
    """The manager's clock, advanced by hand so breaker cooldowns need no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _manager_config(s3_options: dict[str, Any]) -> dict[str, Any]:
    return {
        "chunk_tokens": 256,
        "tiers": [
            {"name": "hot", "backend": "cpu", "options": {"max_bytes": "256MiB", "pinned": False}},
            {"name": "shared", "backend": "s3", "options": s3_options, "write": "through",
             "breaker": {"failures": 2, "cooldown_s": 5.0}},
        ],
    }


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest_asyncio.fixture
async def managers(own_seaweedfs: SeaweedFS) -> AsyncIterator[tuple[StorageManager, StorageManager, FakeClock,
                                                                      CollectorRegistry]]:
    """A writer manager and a reader manager (its own empty cpu tier) sharing one bucket."""
    options = _fast_failing(options_for(own_seaweedfs.endpoint))
    clock, registry = FakeClock(), CollectorRegistry()
    writer = await StorageManager.from_config(_manager_config(options), metrics_registry=registry, clock=clock)
    try:
        reader = await StorageManager.from_config(_manager_config(options), metrics_registry=CollectorRegistry(),
                                                  clock=clock)
        try:
            yield writer, reader, clock, registry
        finally:
            await reader.aclose()
    finally:
        await writer.aclose()


@pytest.mark.asyncio
async def test_a_server_killed_mid_batch_gives_misses_and_skipped_writes_then_opens_the_circuit(
    own_seaweedfs: SeaweedFS,
    managers: tuple[StorageManager, StorageManager, FakeClock, CollectorRegistry],
) -> None:
    writer, reader, _, registry = managers
    shared = writer.tier("shared")
    seen, unread = _keys(2), _keys(2)
    await writer.put([(k, os.urandom(1000)) for k in seen + unread])
    assert [v is not None for v in await reader.get(seen)] == [True, True]  # served by s3 (and promoted)

    batch = [(k, os.urandom(4 * MiB)) for k in _keys(32)]
    task = asyncio.create_task(writer.put(batch))
    deadline = time.monotonic() + 30
    while shared.backend.stats()["puts"] == 0 and not task.done() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        await asyncio.sleep(0.001)  # poll interval, not synchronisation
    own_seaweedfs.stop()  # SIGKILL: what a crash looks like
    await task  # no exception: the failed s3 writes are skipped writes
    assert shared.backend.stats()["puts"] < len(batch), "the batch finished before the server was killed"  # type: ignore[attr-defined]
    assert _sample(registry, "lmtier_tier_skipped_writes_total", tier="shared", reason="unavailable") == len(batch)
    assert await writer.get([k for k, _ in batch[:2]]) != [None, None]  # the hot tier still has them

    assert await reader.get(unread) == [None, None]  # s3 is down: misses, no exception
    assert [v is not None for v in await reader.get(seen)] == [True, True]  # the reader's hot tier
    for mgr in (writer, reader):
        await mgr.get(_keys(1))
        await mgr.put([(_keys(1)[0], b"while down")])
        assert mgr.tier("shared").breaker.state == "open"
    assert _sample(registry, "lmtier_tier_circuit_open", tier="shared") == 1
    assert _sample(registry, "lmtier_tier_skipped_writes_total", tier="shared", reason="circuit_open") >= 1


@pytest.mark.asyncio
async def test_the_tier_recovers_after_the_server_restarts(
    own_seaweedfs: SeaweedFS,
    managers: tuple[StorageManager, StorageManager, FakeClock, CollectorRegistry],
) -> None:
    writer, reader, clock, registry = managers
    old = _keys(1)
    await writer.put([(old[0], b"written before the crash")])
    own_seaweedfs.stop()
    for _ in range(3):
        await writer.put([(_keys(1)[0], b"lost")])
    assert writer.tier("shared").breaker.state == "open"

    own_seaweedfs.restart()
    deadline = time.monotonic() + RECOVERY_DEADLINE_S
    (probe,) = _keys(1)
    while True:  # poll: each round lets one probe through the breaker
        clock.now += 60
        await writer.put([(probe, b"after the restart")])
        (got,) = await reader.get([probe])
        if got is not None:
            break
        assert time.monotonic() < deadline, "the s3 tier did not recover after the server restarted"
        await asyncio.sleep(0.05)  # poll interval, not synchronisation
    assert bytes(got) == b"after the restart"
    assert writer.tier("shared").breaker.state == "closed"
    assert _sample(registry, "lmtier_tier_circuit_open", tier="shared") == 0
    (kept,) = await reader.get(old)  # data written before the crash survived it
    assert kept is not None and bytes(kept) == b"written before the crash"


@pytest.mark.asyncio
async def test_opening_while_the_server_is_down_is_unavailable_not_a_config_error(own_seaweedfs: SeaweedFS) -> None:
    own_seaweedfs.stop()
    with pytest.raises(BackendUnavailableError, match="cannot talk to the server"):
        await open_s3_backend(S3Config(**_fast_failing(options_for(own_seaweedfs.endpoint))))


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A loopback TCP port that accepts connections and never answers (a hung server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.asyncio
async def test_a_server_that_never_answers_is_a_timeout(
    silent_server: str, s3_options: Callable[..., dict[str, Any]]
) -> None:
    config = S3Config(**{**_fast_failing(s3_options()), "endpoint_url": silent_server, "read_timeout_s": 0.3})
    backend = S3Backend(config, await asyncio.to_thread(_make_client, config))
    try:
        with pytest.raises(BackendTimeoutError, match="timed out"):
            await backend.get(_keys(1))
    finally:
        await backend.aclose()


@pytest.mark.parametrize("attempts", [1, 2])
@pytest.mark.asyncio
async def test_max_attempts_counts_the_first_request(
    silent_server: str, s3_options: Callable[..., dict[str, Any]], attempts: int
) -> None:
    """``max_attempts: 2`` is two requests to a server that never answers, not three (botocore's
    own ``max_attempts`` counts retries only): what bounds a call detached at its deadline."""
    config = S3Config(**{**_fast_failing(s3_options()), "endpoint_url": silent_server, "read_timeout_s": 0.2,
                         "max_attempts": attempts})
    client = await asyncio.to_thread(_make_client, config)
    sent: list[str] = []
    client.meta.events.register("before-send.s3", lambda **kw: sent.append(kw["request"].method))
    backend = S3Backend(config, client)
    try:
        with pytest.raises(BackendTimeoutError):
            await backend.get(_keys(1))
    finally:
        await backend.aclose()
    assert sent == ["GET"] * attempts


@pytest.mark.asyncio
async def test_wrong_credentials_fail_the_manager_at_open_with_a_config_error(
    s3_options: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMTIER_S3_TEST_BAD_ACCESS", "nobody")
    options = s3_options(access_key_env="LMTIER_S3_TEST_BAD_ACCESS")
    with pytest.raises(ConfigError, match="rejected the keys"):
        await StorageManager.from_config(_manager_config(options), metrics_registry=CollectorRegistry())


@pytest.mark.asyncio
async def test_a_missing_bucket_fails_the_manager_at_open_with_a_config_error(
    s3_options: Callable[..., dict[str, Any]]
) -> None:
    options = s3_options(bucket=f"lmtier-absent-{os.urandom(4).hex()}", create_bucket=False)
    with pytest.raises(ConfigError, match="does not exist; create it, or set create_bucket: true"):
        await StorageManager.from_config(_manager_config(options), metrics_registry=CollectorRegistry())


@pytest.mark.asyncio
async def test_keys_revoked_while_the_tier_is_open_are_unavailable_errors_that_say_so(
    own_seaweedfs: SeaweedFS,
) -> None:
    backend = await open_s3_backend(S3Config(**_fast_failing(options_for(own_seaweedfs.endpoint))))
    try:
        (key,) = _keys(1)
        await backend.put([(key, b"before the rotation")])
        own_seaweedfs.secret_key = "rotated-" + os.urandom(4).hex()  # the server now wants another key
        own_seaweedfs.restart()
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while True:  # the first requests after a restart may still fail to connect or time out
            with pytest.raises(BackendUnavailableError) as info:
                await backend.get([key])
            if "credentials were rejected" in str(info.value) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)  # poll interval, not synchronisation
        assert "credentials were rejected" in str(info.value)
    finally:
        await backend.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["get", "get_into"])
async def test_a_download_cut_mid_body_is_unavailable_not_corrupt_and_keeps_the_object(
    own_seaweedfs: SeaweedFS, method: str
) -> None:
    backend = await open_s3_backend(S3Config(**_fast_failing(options_for(own_seaweedfs.endpoint))))
    try:
        (key,) = _keys(1)
        data = os.urandom(32 * MiB)
        await backend.put([(key, data)])
        out = bytearray(len(data))
        call = backend.get([key]) if method == "get" else backend.get_into([key], [out])
        task = asyncio.ensure_future(call)
        # get: kill as the request starts; get_into: kill while the body streams into `out`
        counter = "gets" if method == "get" else "writing_caller_buffers"
        deadline = time.monotonic() + 30
        while backend.stats()[counter] == 0 and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # poll interval, not synchronisation
        own_seaweedfs.stop()
        try:
            result = await task
            # the kernel may already hold the whole response: then it must be complete and right
            assert result == [True] if method == "get_into" else bytes(result[0]) == data
        except BackendUnavailableError:
            pass  # the usual outcome
        assert backend.stats()["corrupt"] == 0, "a truncated download was taken for corruption"

        own_seaweedfs.restart()
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while True:  # the object must still be there, whole
            try:
                (got,) = await backend.get([key])
                break
            except BackendUnavailableError:
                assert time.monotonic() < deadline, "the server did not come back"
                await asyncio.sleep(0.05)  # poll interval, not synchronisation
        assert got is not None and bytes(got) == data
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_an_object_the_server_cannot_serve_is_a_miss_for_its_key_alone(
    own_seaweedfs: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    # one object of the batch rots inside SeaweedFS's volume (its GETs fail on the server's own
    # CRC check, after the tier's read timeout), one was deleted meanwhile: the other six are
    # served by get, get_into and contains
    options = {**_fast_failing(options_for(own_seaweedfs.endpoint)), "read_timeout_s": 1}
    backend = await open_s3_backend(S3Config(**options))
    try:
        keys = _keys(8)
        values = [os.urandom(200_000) for _ in keys]
        await backend.put(list(zip(keys, values, strict=True)))
        rotten, gone = 2, 5
        rot_in_volume(own_seaweedfs, values[rotten])
        await backend.delete([keys[gone]])
        served = [i not in (rotten, gone) for i in range(8)]
        with caplog.at_level(logging.WARNING, logger="lmtier.kit"):
            got = [None if v is None else bytes(v) for v in await backend.get(keys)]
            assert got == [v if ok else None for v, ok in zip(values, served, strict=True)]
            outs = [bytearray(len(v)) for v in values]
            assert await backend.get_into(keys, outs) == served
            assert all(bytes(o) == v for o, v, ok in zip(outs, values, served, strict=True) if ok)
            assert await backend.contains(keys) == served
        assert backend.stats()["key_faults"] == 3
        assert backend.stats()["corrupt"] == 0, "an object the server cannot serve is not known to be corrupt"
        for method in ("get", "get_into", "contains"):
            assert f"{method}: 1 of 8 keys faulted and are misses" in caplog.text
        with pytest.raises(BackendTimeoutError):  # the rotten object alone: nothing answered
            await backend.get([keys[rotten]])
    finally:
        await backend.aclose()
