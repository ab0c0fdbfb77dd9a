"""The header every value stored outside process memory carries.

Layout (64 bytes, little-endian), followed by the payload::

    0   4  magic  b"LMTR"
    4   2  format version
    6   2  header length (64)
    8   8  payload length
    16  8  xxh3-64 checksum of the payload
    24  8  namespace (8 raw bytes of the 16-hex-char namespace)
    32 16  key digest
    48 16  reserved (zero)

The key is in the header so a value can never be served for a different key (a renamed file,
a hash-slot mix-up). A value that fails any check raises :class:`CorruptDataError`; backends
turn that into a miss, delete the entry and count it. Never pickle.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import xxhash

from lmtier.buffers import as_bytes_view
from lmtier.errors import CorruptDataError

if TYPE_CHECKING:
    from lmtier.keys import ChunkKey
    from lmtier.protocol import Buffer

__all__ = [
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "checksum",
    "checksum_stream",
    "decode",
    "decode_header",
    "encode_header",
]

MAGIC = b"LMTR"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<4sHHQQ8s16s16x")
assert _HEADER.size == HEADER_BYTES


def checksum(payload: Buffer) -> int:
    return xxhash.xxh3_64_intdigest(payload)


def checksum_stream() -> xxhash.xxh3_64:
    """An incremental :func:`checksum`: ``update()`` it with a payload's pieces in order, and
    ``intdigest()`` equals ``checksum(payload)``. For hashing a payload piece by piece while
    other work (sending the previous one) goes on."""
    return xxhash.xxh3_64()


def encode_header(key: ChunkKey, payload: Buffer, *, payload_checksum: int | None = None) -> bytes:
    """The 64-byte header for ``payload`` stored under ``key``.

    ``payload_checksum``, when given, must be ``checksum(payload)`` computed by the caller (e.g.
    with :func:`checksum_stream`); it is trusted, not recomputed.
    """
    view = as_bytes_view(payload)
    csum = checksum(view) if payload_checksum is None else payload_checksum
    return _HEADER.pack(
        MAGIC, FORMAT_VERSION, HEADER_BYTES, view.nbytes, csum,
        bytes.fromhex(key.namespace), key.digest,
    )


def decode_header(key: ChunkKey, header: Buffer) -> tuple[int, int]:
    """Validate a header for ``key``; return ``(payload_length, checksum)``."""
    view = as_bytes_view(header)
    if view.nbytes < HEADER_BYTES:
        raise CorruptDataError(f"{key}: value shorter than the {HEADER_BYTES}-byte header")
    magic, version, hlen, length, csum, ns, digest = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CorruptDataError(f"{key}: bad magic {magic!r}")
    if version != FORMAT_VERSION or hlen != HEADER_BYTES:
        raise CorruptDataError(f"{key}: unsupported format version {version} (header {hlen} bytes)")
    if ns.hex() != key.namespace or digest != key.digest:
        raise CorruptDataError(f"{key}: header names a different key")
    return length, csum


def decode(key: ChunkKey, value: Buffer, *, verify: bool = True) -> memoryview:
    """Validate ``header ‖ payload`` for ``key`` and return a zero-copy view of the payload."""
    view = as_bytes_view(value)
    length, csum = decode_header(key, view)
    payload = view[HEADER_BYTES:]
    if payload.nbytes != length:
        raise CorruptDataError(f"{key}: payload is {payload.nbytes} bytes, header says {length}")
    if verify and checksum(payload) != csum:
        raise CorruptDataError(f"{key}: checksum mismatch")
    return payload
