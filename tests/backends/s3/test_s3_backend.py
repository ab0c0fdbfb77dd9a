"""Behaviour of the s3 tier beyond the conformance suite, on a real SeaweedFS server.

Objects are planted and inspected with raw boto3 to check what is really stored: the layout,
corruption handling, conditional puts of identical chunks, multipart uploads, open-time errors.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmtier.errors import BackendError, ConfigError
from lmtier.framing import HEADER_BYTES, decode, encode_header
from lmtier.keys import ChunkKey, make_namespace
from lmtier.memory import HostMemoryPool, host_tensor_of
from lmtier.registry import BackendRegistry
from lmtier_backends.s3.backend import S3Backend, open_s3_backend
from lmtier_backends.s3.config import S3Config
from tests.backends.s3.conftest import BUCKET, SECRET_KEY_ENV
from tests.support.hashing import assert_the_disk_tiers_hash_travels_to
from tests.support.seaweedfs import S3Endpoint

pytestmark = pytest.mark.s3

MiB = 1 << 20


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="s3", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _exists(s3: Any, name: str) -> bool:
    try:
        s3.head_object(Bucket=BUCKET, Key=name)
    except s3.exceptions.ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        return False
    return True


def _raw(s3: Any, name: str) -> bytes:
    return s3.get_object(Bucket=BUCKET, Key=name)["Body"].read()  # type: ignore[no-any-return]


# -- layout -----------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_objects_are_stored_as_prefix_slash_key_with_the_codec_header(
    s3_config: S3Config, s3_endpoint: S3Endpoint
) -> None:
    (key,) = _keys(1)
    data = os.urandom(5000)
    async with await open_s3_backend(s3_config) as backend:
        await backend.put([(key, data)])
        name = backend.object_name(key)
    assert name == f"{s3_config.prefix}/{key}"
    raw = _raw(s3_endpoint.client(), name)
    assert len(raw) == HEADER_BYTES + len(data)
    assert raw[:HEADER_BYTES] == encode_header(key, data)
    assert bytes(decode(key, raw)) == data


@pytest.mark.asyncio
async def test_an_empty_prefix_stores_objects_at_the_bucket_root(s3_options: Callable[..., dict[str, Any]]) -> None:
    (key,) = _keys(1)
    async with await open_s3_backend(S3Config(**s3_options(prefix="/"))) as backend:
        assert backend.object_name(key) == str(key)
        await backend.put([(key, b"root")])
        assert [bytes(v) for v in await backend.get([key]) if v is not None] == [b"root"]
        await backend.delete([key])


# -- conditional puts ----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_putting_identical_bytes_again_skips_the_upload_but_new_bytes_overwrite(
    s3_config: S3Config, s3_endpoint: S3Endpoint
) -> None:
    s3 = s3_endpoint.client()
    (key,) = _keys(1)
    first, second = os.urandom(2 * MiB), os.urandom(2 * MiB)  # same length: only the checksum differs
    async with await open_s3_backend(s3_config) as backend:
        await backend.put([(key, first)])
        etag = s3.head_object(Bucket=BUCKET, Key=backend.object_name(key))["ETag"]
        await backend.put([(key, first)])
        stats = backend.stats()
        assert (stats["puts"], stats["skipped_identical"]) == (1, 1)
        assert s3.head_object(Bucket=BUCKET, Key=backend.object_name(key))["ETag"] == etag
        await backend.put([(key, second)])
        stats = backend.stats()
        assert (stats["puts"], stats["skipped_identical"]) == (2, 1)
        (got,) = await backend.get([key])
        assert got is not None and bytes(got) == second


@pytest.mark.asyncio
@pytest.mark.parametrize("planted", [b"", b"LMTR", b"x" * 100], ids=["empty", "short", "foreign"])
async def test_a_put_over_a_foreign_or_empty_object_replaces_it(
    s3_config: S3Config, s3_endpoint: S3Endpoint, planted: bytes
) -> None:
    (key,) = _keys(1)
    async with await open_s3_backend(s3_config) as backend:
        s3_endpoint.client().put_object(Bucket=BUCKET, Key=backend.object_name(key), Body=planted)
        await backend.put([(key, b"ours")])
        (got,) = await backend.get([key])
        assert got is not None and bytes(got) == b"ours"
        assert backend.stats()["skipped_identical"] == 0


@pytest.mark.asyncio
async def test_without_skip_identical_puts_every_put_uploads(s3_options: Callable[..., dict[str, Any]]) -> None:
    (key,) = _keys(1)
    async with await open_s3_backend(S3Config(**s3_options(skip_identical_puts=False))) as backend:
        await backend.put([(key, b"same")])
        await backend.put([(key, b"same")])
        assert (backend.stats()["puts"], backend.stats()["skipped_identical"]) == (2, 0)


# -- multipart ----------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_objects_above_the_threshold_are_uploaded_in_parts_and_read_back_whole(
    s3_options: Callable[..., dict[str, Any]], s3_endpoint: S3Endpoint
) -> None:
    config = S3Config(**s3_options(multipart_threshold="5MiB", multipart_part_size="5MiB"))
    keys = _keys(2)
    big = [os.urandom(11 * MiB + 17), os.urandom(5 * MiB)]  # 3 parts; exactly threshold with header
    async with await open_s3_backend(config) as backend:
        await backend.put(list(zip(keys, big, strict=True)))
        assert backend.stats()["multipart_puts"] == 2
        got = await backend.get(keys)
        assert [bytes(g) for g in got if g is not None] == big
        outs = [bytearray(len(b)) for b in big]
        assert await backend.get_into(keys, outs) == [True, True]
        assert [bytes(o) for o in outs] == big
        raw = _raw(s3_endpoint.client(), backend.object_name(keys[0]))
        assert raw[:HEADER_BYTES] == encode_header(keys[0], big[0])
        # an identical big chunk is not uploaded again
        await backend.put([(keys[0], big[0])])
        assert backend.stats()["skipped_identical"] == 1


# -- buffers --------------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_get_into_fills_a_host_pool_buffer_in_place(s3_config: S3Config) -> None:
    (key,) = _keys(1)
    data = os.urandom(MiB)
    pool = HostMemoryPool(4 * MiB, pin=False, name="s3-test")
    try:
        async with await open_s3_backend(s3_config) as backend:
            await backend.put([(key, data)])
            with pool.allocate(len(data)) as buf:
                assert await backend.get_into([key], [buf]) == [True]
                assert bytes(buf.view()) == data
                assert await backend.get_into([_keys(1)[0]], [buf]) == [False]
    finally:
        pool.close()


@pytest.mark.asyncio
async def test_large_gets_are_received_into_a_reused_slab_that_overflows_to_fresh_buffers(
    s3_options: Callable[..., dict[str, Any]]
) -> None:
    keys = _keys(3)
    values = [os.urandom(3 * MiB) for _ in keys]
    async with await open_s3_backend(S3Config(**s3_options(recv_pool_bytes="8MiB"))) as backend:
        await backend.put(list(zip(keys, values, strict=True)))
        held = await backend.get(keys[:2])
        assert [bytes(v) for v in held if v is not None] == values[:2]
        assert all(v is not None and memoryview(v).readonly and host_tensor_of(v) is not None for v in held)
        pool = backend._recv_pool
        assert pool is not None and pool.outstanding() == 2  # each view holds its range
        (third,) = await backend.get(keys[2:])  # 2 ranges held + 3 MiB > 8 MiB: a fresh buffer
        assert third is not None and bytes(third) == values[2] and host_tensor_of(third) is None
        assert backend.stats()["recv_pool_fallbacks"] == 1
        del held, third
        gc.collect()
        assert pool.outstanding() == 0
        assert [bytes(v) for v in await backend.get(keys[1:]) if v is not None] == values[1:]  # the slab again
        assert backend.stats()["recv_pool_fallbacks"] == 1 and pool.outstanding() == 0


@pytest.mark.asyncio
async def test_returned_values_are_read_only(s3_config: S3Config) -> None:
    (key,) = _keys(1)
    async with await open_s3_backend(s3_config) as backend:
        await backend.put([(key, b"payload")])
        (got,) = await backend.get([key])
        assert isinstance(got, memoryview) and got.readonly


@pytest.mark.asyncio
async def test_a_cancelled_get_into_has_stopped_writing_the_callers_buffer_when_it_unwinds(
    s3_config: S3Config,
) -> None:
    (key,) = _keys(1)
    data = os.urandom(32 * MiB)
    async with await open_s3_backend(s3_config) as backend:
        await backend.put([(key, data)])
        out = bytearray(len(data))
        caught_streaming = False
        for _ in range(20):  # each attempt needs to catch the worker mid-download
            task = asyncio.create_task(backend.get_into([key], [out]))
            while not task.done() and backend.stats()["writing_caller_buffers"] == 0:
                await asyncio.sleep(0.001)  # poll interval, not synchronisation
            if task.done():
                continue
            caught_streaming = True
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert backend.stats()["writing_caller_buffers"] == 0
            break
        assert caught_streaming, "the download always finished before it could be cancelled"
        # the tier is still usable and the object intact
        assert await backend.get_into([key], [out]) == [True]
        assert out == data


# -- opening ------------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_wrong_credentials_are_a_clear_config_error_at_open(
    s3_options: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMTIER_S3_TEST_WRONG_SECRET", "not-the-secret")
    config = S3Config(**s3_options(secret_key_env="LMTIER_S3_TEST_WRONG_SECRET"))
    with pytest.raises(ConfigError, match=r"rejected the keys from \$LMTIER_S3_TEST_ACCESS_KEY") as info:
        await open_s3_backend(config)
    assert "not-the-secret" not in str(info.value)


@pytest.mark.asyncio
async def test_a_missing_bucket_is_a_clear_config_error_unless_create_bucket_is_set(
    s3_options: Callable[..., dict[str, Any]], s3_endpoint: S3Endpoint
) -> None:
    bucket = f"lmtier-missing-{os.urandom(4).hex()}"
    with pytest.raises(ConfigError, match=f"bucket '{bucket}' .* does not exist; create it, or set create_bucket"):
        await open_s3_backend(S3Config(**s3_options(bucket=bucket)))
    async with await open_s3_backend(S3Config(**s3_options(bucket=bucket, create_bucket=True))) as backend:
        (key,) = _keys(1)
        await backend.put([(key, b"in the new bucket")])
    s3_endpoint.client().head_bucket(Bucket=bucket)  # it exists now
    async with await open_s3_backend(S3Config(**s3_options(bucket=bucket, create_bucket=True))):
        pass  # and opening again with create_bucket is fine


@pytest.fixture
def chain_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An environment where boto3's chain finds nothing but what a test puts there."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


@pytest.mark.asyncio
async def test_without_named_variables_the_standard_aws_variables_are_used(
    s3_options: Callable[..., dict[str, Any]], s3_endpoint: S3Endpoint, chain_only: pytest.MonkeyPatch
) -> None:
    options = s3_options(access_key_env=None, secret_key_env=None)
    with pytest.raises(ConfigError, match="configure credentials"):  # nothing in the chain yet
        await open_s3_backend(S3Config(**options))
    chain_only.setenv("AWS_ACCESS_KEY_ID", s3_endpoint.access_key)
    chain_only.setenv("AWS_SECRET_ACCESS_KEY", s3_endpoint.secret_key)
    async with await open_s3_backend(S3Config(**options)) as backend:
        (key,) = _keys(1)
        await backend.put([(key, b"through the chain")])
        assert [bytes(v) for v in await backend.get([key]) if v is not None] == [b"through the chain"]


@pytest.mark.asyncio
async def test_a_named_profile_takes_its_keys_from_the_shared_credentials_file(
    s3_options: Callable[..., dict[str, Any]], s3_endpoint: S3Endpoint, chain_only: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[lmtier-test]\naws_access_key_id = {s3_endpoint.access_key}\n"
                           f"aws_secret_access_key = {s3_endpoint.secret_key}\n")
    chain_only.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    options = s3_options(access_key_env=None, secret_key_env=None, profile="lmtier-test")
    async with await open_s3_backend(S3Config(**options)) as backend:
        (key,) = _keys(1)
        await backend.put([(key, b"from the profile")])
        assert await backend.contains([key]) == [True]
    with pytest.raises(ConfigError, match="profile"):
        await open_s3_backend(S3Config(**{**options, "profile": "no-such-profile"}))


@pytest.mark.asyncio
async def test_an_unset_credentials_variable_is_a_config_error_naming_it(
    s3_options: Callable[..., dict[str, Any]]
) -> None:
    config = S3Config(**s3_options(secret_key_env="LMTIER_S3_TEST_NOT_SET_ANYWHERE"))
    with pytest.raises(ConfigError, match="LMTIER_S3_TEST_NOT_SET_ANYWHERE"):
        await open_s3_backend(config)


@pytest.mark.asyncio
async def test_secrets_never_appear_in_reprs_or_logs(
    s3_config: S3Config, caplog: pytest.LogCaptureFixture
) -> None:
    secret = os.environ[SECRET_KEY_ENV]
    caplog.set_level(logging.DEBUG)
    async with await open_s3_backend(s3_config) as backend:
        (key,) = _keys(1)
        await backend.put([(key, b"x")])
        await backend.get([key])
        texts = [repr(backend), repr(backend.config), str(backend.stats())]
    texts += [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if secret in t]


def test_the_registry_builds_the_tier_from_options_and_reports_bad_keys(s3_options: Callable[..., dict[str, Any]]) -> None:
    registry = BackendRegistry.discover()
    assert registry.spec("s3").install_hint == "pip install 'lmtier[s3]'"
    with pytest.raises(ConfigError, match=r"tiers\[1\].options.bukket: unknown key; allowed keys: .*bucket"):
        registry.validate_options("s3", {**s3_options(), "bukket": "x"}, path="tiers[1].options")
    with pytest.raises(ConfigError, match="access_key_env and secret_key_env"):
        registry.validate_options("s3", {**s3_options(), "access_key_env": None})


@pytest.mark.asyncio
async def test_the_registry_awaits_the_factory_and_returns_an_open_tier(
    s3_options: Callable[..., dict[str, Any]]
) -> None:
    backend = await BackendRegistry.discover().create("s3", s3_options())
    try:
        assert isinstance(backend, S3Backend)
        assert backend.capabilities.persistent and backend.capabilities.shared
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_unsigned_payloads_are_accepted_and_still_checksummed(
    s3_options: Callable[..., dict[str, Any]]
) -> None:
    (key,) = _keys(1)
    data = os.urandom(MiB + 3)
    async with await open_s3_backend(S3Config(**s3_options(sign_payload=False))) as backend:
        await backend.put([(key, data)])
        (got,) = await backend.get([key])
        assert got is not None and bytes(got) == data


@pytest.mark.asyncio
async def test_aclose_during_a_batch_fails_its_queued_requests_with_a_backend_error(
    s3_options: Callable[..., dict[str, Any]]
) -> None:
    backend = await open_s3_backend(S3Config(**s3_options(max_concurrency=1)))
    keys = _keys(40)
    await backend.put([(k, os.urandom(256 * 1024)) for k in keys])
    task = asyncio.create_task(backend.get(keys))
    while backend.stats()["gets"] == 0:
        await asyncio.sleep(0.001)  # poll interval, not synchronisation
    await backend.aclose()
    with pytest.raises(BackendError, match="closed"):
        await task
    with pytest.raises(BackendError, match="closed"):
        await backend.get(keys[:1])


@pytest.mark.asyncio
async def test_a_value_the_disk_tier_hashed_reaches_s3_without_another_hash(
    s3_options: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    await assert_the_disk_tiers_hash_travels_to(
        {"name": "s3", "backend": "s3", "options": s3_options(), "write": "through"}, tmp_path)
