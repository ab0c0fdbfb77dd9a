"""Value codecs on the nixl tier (posix and obj plugins), through a StorageManager: each codec's
values carry its id and raw length and read back exactly (lossless) or as the codec's own round
trip (lossy); codec ids this process cannot decode are misses left in place; a broken encoding is
deleted (the scenarios: tests/support/codec_tiers.py, shared with the redis and s3 tiers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.backends.nixl._helpers import needs_nixl, obj_options, posix_options
from tests.support.backdoors import RawFiles, RawObjects
from tests.support.codec_tiers import (
    CODECS,
    CodecCase,
    check_a_broken_encoding_is_deleted,
    check_a_reader_without_the_codec_decodes,
    check_codec_round_trip,
    check_unknown_codec_ids_are_misses_left_in_place,
)

pytestmark = needs_nixl
STAGING = {"staging_slab_bytes": 16 << 20, "max_staging_bytes": 256 << 20}


@pytest.fixture(params=["posix", pytest.param("obj", marks=pytest.mark.s3)])
def tier_and_raw(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[dict[str, Any], Any]:
    if request.param == "posix":
        options = {"plugin": "posix", "posix": posix_options(tmp_path / "tier"), **STAGING}
        raw: Any = RawFiles(tmp_path / "tier")
    else:
        seaweed, bucket = request.getfixturevalue("seaweed"), request.getfixturevalue("bucket")
        prefix = f"c-{os.urandom(4).hex()}/"
        options = {"plugin": "obj", "obj": obj_options(seaweed, bucket, prefix=prefix, max_attempts=2), **STAGING}
        raw = RawObjects(seaweed.endpoint.client(), bucket, prefix)
    return {"name": "remote", "backend": "nixl", "timeout_s": 30, "options": options}, raw


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CODECS, ids=str)
async def test_each_codec_stores_fewer_bytes_and_reads_back_through_the_manager(
        tier_and_raw: tuple[dict[str, Any], Any], case: CodecCase) -> None:
    await check_codec_round_trip(*tier_and_raw, case)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", [CODECS[1], CODECS[3]], ids=str)
async def test_a_tier_without_the_codec_reads_what_another_process_stored_encoded(
        tier_and_raw: tuple[dict[str, Any], Any], case: CodecCase) -> None:
    await check_a_reader_without_the_codec_decodes(*tier_and_raw, case)


@pytest.mark.asyncio
async def test_codec_ids_this_reader_lacks_are_misses_left_in_place(tier_and_raw: tuple[dict[str, Any], Any]) -> None:
    await check_unknown_codec_ids_are_misses_left_in_place(*tier_and_raw)


@pytest.mark.asyncio
async def test_an_encoding_that_does_not_decode_is_a_miss_and_deleted(tier_and_raw: tuple[dict[str, Any], Any]) -> None:
    await check_a_broken_encoding_is_deleted(*tier_and_raw)
