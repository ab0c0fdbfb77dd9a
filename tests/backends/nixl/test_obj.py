"""The ``obj`` flavour of the nixl tier on a real SeaweedFS: layout, size guessing, corruption,
and clear errors at open."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from lmtier.errors import BackendUnavailableError, ConfigError
from lmtier.framing import encode_header
from lmtier.keys import ChunkKey, make_namespace
from lmtier_backends.nixl.backend import NixlBackend, open_nixl_backend
from lmtier_backends.nixl.config import NixlConfig
from tests.backends.nixl._helpers import needs_nixl, obj_options

pytestmark = [*needs_nixl, pytest.mark.s3]


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="nixl-obj", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _config(seaweed: Any, bucket: str, *, io_threads: int | None = None, **obj: Any) -> NixlConfig:
    threads = {} if io_threads is None else {"io_threads": io_threads}  # None: NixlConfig's default
    return NixlConfig(plugin="obj", obj=obj_options(seaweed, bucket, **obj), staging_slab_bytes=8 << 20, **threads)


@pytest_asyncio.fixture
async def opener(seaweed: Any, bucket: str) -> AsyncIterator[Callable[..., Any]]:
    opened: list[NixlBackend] = []

    async def open_tier(*, io_threads: int | None = None, **obj: Any) -> NixlBackend:
        backend = await open_nixl_backend(_config(seaweed, bucket, io_threads=io_threads, **obj))
        opened.append(backend)
        return backend

    try:
        yield open_tier
    finally:
        for backend in opened:
            await backend.aclose()


@pytest.mark.asyncio
async def test_each_chunk_is_one_object_named_by_prefix_and_key(
    seaweed: Any, bucket: str, opener: Callable[..., Any]
) -> None:
    tier = await opener(prefix="kv/")
    (key,) = _keys(1)
    await tier.put([(key, b"object payload")])
    body = seaweed.endpoint.client().get_object(Bucket=bucket, Key=f"kv/{key}")["Body"].read()
    assert body == encode_header(key, b"object payload") + b"object payload"


@pytest.mark.asyncio
async def test_objects_written_by_another_client_are_found_and_read(
    seaweed: Any, bucket: str, opener: Callable[..., Any]
) -> None:
    tier = await opener()
    key, absent = _keys(2)
    payload = os.urandom(300_000)
    seaweed.endpoint.client().put_object(Bucket=bucket, Key=f"lmtier/{key}",
                                         Body=encode_header(key, payload) + payload)
    assert await tier.contains([key, absent]) == [True, False]
    assert bytes((await tier.get([key]))[0]) == payload  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_an_object_bigger_than_the_first_read_is_read_again_at_its_size(
    opener: Callable[..., Any]
) -> None:
    writer = await opener()
    keys = _keys(2)
    values = [os.urandom(200_000), os.urandom(50_000)]
    await writer.put(list(zip(keys, values, strict=True)))
    reader = await opener(expected_item_bytes=4096)  # a fresh handle knows no sizes
    assert [bytes(v) for v in await reader.get(keys)] == values  # type: ignore[arg-type]
    assert reader.stats()["rereads"] == 2
    assert [bytes(v) for v in await reader.get(keys)] == values  # type: ignore[arg-type]
    assert reader.stats()["rereads"] == 2  # sizes are remembered: one GET each now


@pytest.mark.asyncio
async def test_wrong_credentials_are_a_config_error_at_open(seaweed: Any, bucket: str) -> None:
    with pytest.raises(ConfigError, match="rejected the credentials"):
        await open_nixl_backend(_config(seaweed, bucket, secret_key="not-the-secret"))


@pytest.mark.asyncio
async def test_a_missing_bucket_is_a_config_error_at_open(seaweed: Any) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        await open_nixl_backend(_config(seaweed, "lmtier-no-such-bucket"))


@pytest.mark.asyncio
async def test_an_unreachable_endpoint_is_unavailable_at_open(seaweed: Any, bucket: str) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendUnavailableError, match="cannot reach"):
        await open_nixl_backend(_config(seaweed, bucket, endpoint_override=f"http://127.0.0.1:{port}"))


@pytest.mark.asyncio
async def test_credentials_can_come_from_named_environment_variables(
    seaweed: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = seaweed.endpoint
    monkeypatch.setenv("LMTIER_TEST_NIXL_AK", endpoint.access_key)
    monkeypatch.setenv("LMTIER_TEST_NIXL_SK", endpoint.secret_key)
    config = _config(seaweed, bucket, access_key=None, secret_key=None,
                     access_key_env="LMTIER_TEST_NIXL_AK", secret_key_env="LMTIER_TEST_NIXL_SK")
    assert endpoint.secret_key not in repr(config)
    tier = await open_nixl_backend(config)
    try:
        (key,) = _keys(1)
        await tier.put([(key, b"env credentials")])
        assert bytes((await tier.get([key]))[0]) == b"env credentials"  # type: ignore[arg-type]
    finally:
        await tier.aclose()
    monkeypatch.delenv("LMTIER_TEST_NIXL_SK")
    with pytest.raises(ConfigError, match="LMTIER_TEST_NIXL_SK"):
        await open_nixl_backend(config)


def test_an_inline_secret_never_shows_in_the_config_repr(seaweed: Any, bucket: str) -> None:
    config = _config(seaweed, bucket)
    assert seaweed.endpoint.secret_key not in repr(config) and seaweed.endpoint.secret_key not in str(config)


@pytest.mark.asyncio
async def test_get_into_has_nixl_read_payloads_straight_into_the_callers_buffers(
    opener: Callable[..., Any]
) -> None:
    tier = await opener()
    keys = _keys(3)
    values = [os.urandom(300_000 + i) for i in range(3)]
    await tier.put(list(zip(keys, values, strict=True)))
    outs = [bytearray(len(v)) for v in values]
    assert await tier.get_into(keys, outs) == [True, True, True]
    assert [bytes(o) for o in outs] == values
    assert tier.stats()["get_into_direct"] == 3 and tier.stats()["staging_outstanding"] == 0
    assert await tier.get_into([keys[0]], [bytearray(10)]) == [False]  # another size: not corrupt
    assert tier.stats()["corrupt"] == 0


@pytest.mark.asyncio
async def test_get_into_of_an_object_cut_after_its_header_is_false_deleted_and_counted(
    seaweed: Any, bucket: str, opener: Callable[..., Any]
) -> None:
    tier = await opener()
    (key,) = _keys(1)
    name = f"lmtier/{key}"
    s3 = seaweed.endpoint.client()
    s3.put_object(Bucket=bucket, Key=name, Body=encode_header(key, b"q" * 1000))  # the payload is missing
    assert await tier.get_into([key], [bytearray(1000)]) == [False]
    assert tier.stats()["corrupt"] == 1
    assert _gone(seaweed, bucket, key)


def _truncate(seaweed: Any, bucket: str, key: ChunkKey, payload: bytes) -> None:
    """Store ``key``'s value with its last byte cut off, behind the tier's back."""
    seaweed.endpoint.client().put_object(Bucket=bucket, Key=f"lmtier/{key}",
                                         Body=(encode_header(key, payload) + payload)[:-1])


def _gone(seaweed: Any, bucket: str, key: ChunkKey) -> bool:
    return seaweed.endpoint.client().list_objects_v2(Bucket=bucket, Prefix=f"lmtier/{key}").get("KeyCount", 0) == 0


@pytest.mark.asyncio
async def test_get_into_of_an_object_cut_by_a_byte_after_a_full_read_into_the_same_buffer_is_a_miss(
    seaweed: Any, bucket: str, opener: Callable[..., Any]
) -> None:
    # the caller's buffer still holds the byte the cut object lacks: unless that byte is replaced
    # (the sentinel) or the object probed, the checksum passes and a cut object is served
    tier = await opener()
    (key,) = _keys(1)
    payload = os.urandom(300_000)
    await tier.put([(key, payload)])
    out = bytearray(len(payload))
    assert await tier.get_into([key], [out]) == [True]
    _truncate(seaweed, bucket, key, payload)
    assert await tier.get_into([key], [out]) == [False]
    assert tier.stats()["corrupt"] == 1 and _gone(seaweed, bucket, key)


@pytest.mark.asyncio
async def test_get_of_an_object_cut_by_a_byte_after_a_full_get_is_a_miss(
    seaweed: Any, bucket: str, opener: Callable[..., Any]
) -> None:
    tier = await opener()
    (key,) = _keys(1)
    payload = os.urandom(300_000)
    await tier.put([(key, payload)])
    (got,) = await tier.get([key])
    assert got is not None and bytes(got) == payload
    del got  # its staging range goes back, and the next read of the same size is staged there
    _truncate(seaweed, bucket, key, payload)
    assert await tier.get([key]) == [None]
    assert tier.stats()["corrupt"] == 1 and _gone(seaweed, bucket, key)


@pytest.mark.asyncio
async def test_reads_of_whole_objects_send_no_probe(opener: Callable[..., Any]) -> None:
    writer = await opener()
    keys = _keys(3)
    values = [os.urandom(200_000) + b"\x00" for _ in keys]  # not ending in the sentinel: no doubt
    await writer.put(list(zip(keys, values, strict=True)))
    # knows no sizes, nor how objects end. One worker: the batch is one piece, every size a guess
    # (split across workers, a piece that starts after another finished guesses the size it learnt)
    reader = await opener(io_threads=1)
    assert [bytes(v) for v in await reader.get(keys)] == values  # type: ignore[arg-type]
    outs = [bytearray(len(v)) for v in values]
    assert await reader.get_into(keys, outs) == [True, True, True]
    assert [bytes(o) for o in outs] == values
    assert reader.stats()["probes"] == 0 and reader.stats()["rereads"] == 3  # sizes were guessed


@pytest.mark.asyncio
@pytest.mark.parametrize("op", ["get", "get_into"])
async def test_a_value_ending_in_the_sentinel_is_served_after_one_probe(
    opener: Callable[..., Any], op: str
) -> None:
    from lmtier_backends.nixl._obj import _SENTINEL

    writer = await opener()
    (key,) = _keys(1)
    payload = os.urandom(200_000)[:-1] + bytes([_SENTINEL])  # a fresh reader cannot tell it is read whole
    await writer.put([(key, payload)])
    reader = await opener(expected_item_bytes=len(payload) + 64)

    async def read() -> bytes | None:
        if op == "get":
            (got,) = await reader.get([key])
            return None if got is None else bytes(got)
        out = bytearray(len(payload))
        return bytes(out) if await reader.get_into([key], [out]) == [True] else None

    assert await read() == payload
    assert reader.stats()["probes"] == 1
    assert await read() == payload
    assert reader.stats()["probes"] == 1  # now it knows how the object ends: another sentinel
    assert reader.stats()["corrupt"] == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("op", ["get", "get_into"])
async def test_an_object_cut_just_before_a_last_byte_equal_to_the_sentinel_is_a_miss(
    seaweed: Any, bucket: str, opener: Callable[..., Any], op: str
) -> None:
    # the sentinel a fresh reader sets stands in for the missing byte, so the checksum passes:
    # only the probe finds the object short
    from lmtier_backends.nixl._obj import _SENTINEL

    writer = await opener()
    (key,) = _keys(1)
    payload = os.urandom(200_000)[:-1] + bytes([_SENTINEL])
    await writer.put([(key, payload)])
    _truncate(seaweed, bucket, key, payload)
    reader = await opener(expected_item_bytes=len(payload) + 64)
    if op == "get":
        assert await reader.get([key]) == [None]
    else:
        assert await reader.get_into([key], [bytearray(len(payload))]) == [False]
    assert reader.stats()["corrupt"] == 1 and _gone(seaweed, bucket, key)
