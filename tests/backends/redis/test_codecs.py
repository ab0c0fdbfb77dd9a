"""Value codecs on the redis tier, through a StorageManager and a real redis-server: each codec's
values carry its id and raw length and read back exactly (lossless) or as the codec's own round
trip (lossy); codec ids this process cannot decode are misses left in place; a broken encoding is
deleted (the scenarios: tests/support/codec_tiers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from lmtier import manager as manager_module
from tests.backends.redis.conftest import options_for
from tests.backends.redis.test_conformance import RawRedis
from tests.support.codec_tiers import (
    CODECS,
    CodecCase,
    check_a_broken_encoding_is_deleted,
    check_a_frozen_codec_tier_is_a_miss_at_its_deadline,
    check_a_reader_without_the_codec_decodes,
    check_codec_round_trip,
    check_unknown_codec_ids_are_misses_left_in_place,
)
from tests.support.remote_tiers import RemoteTier

pytestmark = pytest.mark.redis


@pytest.fixture
def tier(redis_server: Any) -> dict[str, Any]:
    return {"name": "remote", "backend": "redis", "timeout_s": 30, "options": options_for(redis_server.url)}


@pytest.fixture
def raw_store(redis_server: Any, tier: dict[str, Any]) -> Iterator[RawRedis]:
    client = redis.Redis.from_url(redis_server.url)
    try:
        yield RawRedis(client, tier["options"]["key_prefix"])
    finally:
        client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CODECS, ids=str)
async def test_each_codec_stores_fewer_bytes_and_reads_back_through_the_manager(
        tier: dict[str, Any], raw_store: RawRedis, case: CodecCase) -> None:
    await check_codec_round_trip(tier, raw_store, case)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", [CODECS[1], CODECS[3]], ids=str)
async def test_a_tier_without_the_codec_reads_what_another_process_stored_encoded(
        tier: dict[str, Any], raw_store: RawRedis, case: CodecCase) -> None:
    await check_a_reader_without_the_codec_decodes(tier, raw_store, case)


@pytest.mark.asyncio
async def test_codec_ids_this_reader_lacks_are_misses_left_in_place(tier: dict[str, Any], raw_store: RawRedis) -> None:
    await check_unknown_codec_ids_are_misses_left_in_place(tier, raw_store)


@pytest.mark.asyncio
async def test_an_encoding_that_does_not_decode_is_a_miss_and_deleted(tier: dict[str, Any],
                                                                      raw_store: RawRedis) -> None:
    await check_a_broken_encoding_is_deleted(tier, raw_store)


@pytest.mark.asyncio
async def test_a_frozen_server_behind_a_sliced_codec_tier_is_a_miss_at_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slice_bytes = 300 << 10  # one 256 KiB chunk per slice: a batch of 4 takes 4 slices
    monkeypatch.setattr(manager_module, "CODEC_SLICE_BYTES", slice_bytes)
    import torch  # noqa: F401  (as in an engine: the receive pool's first use must not cost a deadline)

    with RemoteTier("redis", tmp_path) as remote:
        await check_a_frozen_codec_tier_is_a_miss_at_its_deadline(remote, slice_bytes)
