"""Value codecs on the s3 tier, through a StorageManager and a real SeaweedFS: each codec's values
carry its id and raw length and read back exactly (lossless) or as the codec's own round trip
(lossy); codec ids this process cannot decode are misses left in place; a broken encoding is
deleted (the scenarios: tests/support/codec_tiers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmtier import manager as manager_module
from tests.backends.s3.conftest import BUCKET
from tests.support.backdoors import RawObjects
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
from tests.support.seaweedfs import S3Endpoint

pytestmark = pytest.mark.s3


@pytest.fixture
def tier(s3_options: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    return {"name": "remote", "backend": "s3", "timeout_s": 30, "options": s3_options()}


@pytest.fixture
def raw_store(s3_endpoint: S3Endpoint, tier: dict[str, Any]) -> RawObjects:
    return RawObjects(s3_endpoint.client(), BUCKET, tier["options"]["prefix"])


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CODECS, ids=str)
async def test_each_codec_stores_fewer_bytes_and_reads_back_through_the_manager(
        tier: dict[str, Any], raw_store: RawObjects, case: CodecCase) -> None:
    await check_codec_round_trip(tier, raw_store, case)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", [CODECS[1], CODECS[3]], ids=str)
async def test_a_tier_without_the_codec_reads_what_another_process_stored_encoded(
        tier: dict[str, Any], raw_store: RawObjects, case: CodecCase) -> None:
    await check_a_reader_without_the_codec_decodes(tier, raw_store, case)


@pytest.mark.asyncio
async def test_codec_ids_this_reader_lacks_are_misses_left_in_place(tier: dict[str, Any],
                                                                    raw_store: RawObjects) -> None:
    await check_unknown_codec_ids_are_misses_left_in_place(tier, raw_store)


@pytest.mark.asyncio
async def test_an_encoding_that_does_not_decode_is_a_miss_and_deleted(tier: dict[str, Any],
                                                                      raw_store: RawObjects) -> None:
    await check_a_broken_encoding_is_deleted(tier, raw_store)


@pytest.mark.asyncio
async def test_a_frozen_server_behind_a_sliced_codec_tier_is_a_miss_at_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slice_bytes = 300 << 10  # one 256 KiB chunk per slice: a batch of 4 takes 4 slices
    monkeypatch.setattr(manager_module, "CODEC_SLICE_BYTES", slice_bytes)
    with RemoteTier("s3", tmp_path) as remote:
        await check_a_frozen_codec_tier_is_a_miss_at_its_deadline(remote, slice_bytes)
