"""The stored-object header: round trip and every way a value can be wrong."""

from __future__ import annotations

import pytest

from lmtier.codec import HEADER_BYTES, checksum, checksum_stream, decode, encode_header
from lmtier.errors import CorruptDataError, InvalidArgumentError
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


def test_cpu_torch_tensors_of_any_dtype_are_zero_copy_byte_views() -> None:
    import torch

    from lmtier.codec import as_bytes_view

    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    view = as_bytes_view(t)
    assert view.nbytes == 12 and view.format == "B" and view.ndim == 1
    t[1, 2] = 100.0  # the view is the tensor's memory, not a copy
    assert bytes(view) == t.view(torch.uint8).numpy().tobytes()
    assert as_bytes_view(torch.empty(0)).nbytes == 0
    assert decode(KEY, encode_header(KEY, t) + bytes(view)).tobytes() == bytes(view)


@pytest.mark.parametrize(("tensor", "message"), [
    (lambda torch: torch.zeros(4, 4).t(), "C-contiguous"),
    (lambda torch: torch.zeros(4, device="meta"), "must be in host memory, got a tensor on meta"),
])
def test_tensors_that_are_not_contiguous_host_memory_are_typed_errors(tensor, message: str) -> None:
    import torch

    from lmtier.codec import as_bytes_view

    with pytest.raises(InvalidArgumentError, match=message):
        as_bytes_view(tensor(torch))
