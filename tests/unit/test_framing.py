"""The stored-value header (lmtier.framing): round trip and every way a value can be wrong."""

from __future__ import annotations

import pytest

from lmtier.errors import CorruptDataError, InvalidArgumentError
from lmtier.framing import (
    FORMAT_VERSION,
    HEADER_BYTES,
    NewerFormatError,
    checksum,
    checksum_stream,
    decode,
    decode_header,
    encode_header,
)
from lmtier.keys import ChunkKey, make_namespace
from lmtier.testing.backdoors import HEADER_FIELDS, flip_bit, newer_format, unknown_codec, version_1

KEY = ChunkKey(make_namespace(t="codec"), bytes(range(16)))
OTHER = ChunkKey(make_namespace(t="codec"), bytes(range(1, 17)))


def stored(payload: bytes, key: ChunkKey = KEY) -> bytearray:
    return bytearray(encode_header(key, payload) + payload)


def test_round_trip_returns_a_zero_copy_payload_view() -> None:
    value = stored(b"payload bytes")
    view = decode(KEY, value)
    assert bytes(view) == b"payload bytes" and view.obj is value


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "magic", "version", "too_short"])
def test_damaged_values_are_corrupt(damage: str) -> None:
    value = stored(b"x" * 100)
    if damage == "flip_payload":
        value[HEADER_BYTES + 5] ^= 0xFF
    elif damage == "truncate":
        del value[-1]
    elif damage == "magic":
        value[0:4] = b"NOPE"
    elif damage == "version":
        value[4] = 99
    elif damage == "too_short":
        del value[10:]
    with pytest.raises(CorruptDataError):
        decode(KEY, value)


def test_a_value_stored_under_another_key_is_corrupt() -> None:
    with pytest.raises(CorruptDataError, match="different key"):
        decode(OTHER, stored(b"abc"))


def test_non_buffers_are_typed_errors() -> None:
    with pytest.raises(InvalidArgumentError):
        encode_header(KEY, "text")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, 240, 241, 65_537, 1 << 20, 3_000_017])
def test_a_checksum_streamed_piece_by_piece_equals_the_whole_payloads(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    stream = checksum_stream()
    for start in range(0, size, 100_003):
        stream.update(memoryview(payload)[start:start + 100_003])
    assert stream.intdigest() == checksum(payload)
    header = encode_header(KEY, payload, payload_checksum=stream.intdigest())
    assert header == encode_header(KEY, payload)  # the same stored format either way
    assert bytes(decode(KEY, header + payload)) == payload


# -- format version 2: the header checks itself; newer formats are not corruption --------------------


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
def test_a_flipped_bit_in_any_header_field_is_corrupt(field: str) -> None:
    value = bytes(stored(b"y" * 300))
    for bit in range(8):
        with pytest.raises(CorruptDataError):
            decode(KEY, flip_bit(value, HEADER_FIELDS[field], bit))


def test_an_intact_header_of_a_newer_version_or_unknown_codec_is_newer_not_corrupt() -> None:
    value = bytes(stored(b"z" * 300))
    for newer in (newer_format(value), unknown_codec(value)):
        with pytest.raises(NewerFormatError, match="left in place"):
            decode(KEY, newer)
        assert not isinstance(NewerFormatError("x"), CorruptDataError)  # deleting code never sees it
    with pytest.raises(CorruptDataError):  # a newer version with a damaged header is just damaged
        decode(KEY, flip_bit(newer_format(value), 20))


def test_codec_and_raw_length_round_trip_for_readers_that_know_the_codec() -> None:
    payload = b"encoded" * 10
    header = encode_header(KEY, payload, codec=7, raw_length=1000)
    head = decode_header(KEY, header, codecs=(0, 7))
    assert (head.codec, head.raw_length, head.payload_length, head.version) == (7, 1000, 70, FORMAT_VERSION)
    with pytest.raises(NewerFormatError, match="codec 7"):
        decode_header(KEY, header)


def test_values_stored_in_format_version_1_are_still_read() -> None:
    payload = b"written by lmtier 0.1"
    assert bytes(decode(KEY, version_1(KEY, payload))) == payload
    assert decode_header(KEY, version_1(KEY, payload)).version == 1
    damaged = bytearray(version_1(KEY, payload))
    damaged[50] = 1  # version 1 had only zeros there
    with pytest.raises(CorruptDataError):
        decode(KEY, bytes(damaged))
