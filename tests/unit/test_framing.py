"""The stored-value header (lmtier.framing): round trip and every way a value can be wrong."""

from __future__ import annotations

import pytest

from lmtier.errors import CorruptDataError, InvalidArgumentError
from lmtier.framing import HEADER_BYTES, checksum, checksum_stream, decode, encode_header
from lmtier.keys import ChunkKey, make_namespace

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
