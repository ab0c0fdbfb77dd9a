"""The header every value stored outside process memory carries.

Layout of format version 2 (64 bytes, little-endian), followed by the payload::

    0   4  magic  b"LMTR"
    4   2  format version (2)
    6   2  header length (64): the payload starts here
    8   8  payload length: the stored bytes after the header
    16  8  xxh3-64 checksum of the payload
    24  8  namespace (8 raw bytes of the 16-hex-char namespace)
    32 16  key digest
    48  2  codec id: how the payload encodes the value (0 = none: the payload is the value)
    50  2  reserved (zero)
    52  8  raw length: the value's length once decoded (equals the payload length for codec 0)
    60  4  header check: the low 32 bits of xxh3-64 of bytes 0-59

What every later version keeps, so that a reader can tell a *newer* value from a *damaged* one:
the magic at 0, the version at 4, the header length at 6, and a first 64 bytes whose last 4 are
the check of the 60 before them. A header whose check holds but whose version is newer than this
reader (or whose codec id this reader does not know) raises :class:`NewerFormatError`: a miss that
is **left in place**, because during a rolling upgrade a new writer's values must survive old
readers. Any other failure (magic, check, reserved bytes, key, length, payload checksum) raises
:class:`~lmtier.errors.CorruptDataError`: a miss that backends delete and count. A flipped bit
anywhere in the header is caught by the check, as a flipped payload bit is by the checksum.

Version 1 (no codec, raw length or check: bytes 48-63 zero) is still read, so stores written
before version 2 stay warm; it is never written.

The key is in the header so a value can never be served for a different key (a renamed file, a
hash-slot mix-up, two values swapped). Never pickle.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from lmtier.buffers import as_bytes_view
from lmtier.errors import BackendError, CorruptDataError

if TYPE_CHECKING:
    from collections.abc import Container

    from lmtier.keys import ChunkKey
    from lmtier.protocol import Buffer

__all__ = [
    "CODEC_NONE",
    "FORMAT_VERSION",
    "LMTIER_CODEC_IDS",
    "READABLE_CODECS",
    "HEADER_BYTES",
    "MAGIC",
    "Header",
    "NewerFormatError",
    "checksum",
    "checksum_stream",
    "decode",
    "decode_header",
    "encode_header",
]

MAGIC = b"LMTR"
FORMAT_VERSION = 2
HEADER_BYTES = 64
#: Codec id 0: the payload is the value's bytes as given (no encoding).
CODEC_NONE = 0
#: lmtier's own codec ids (below 0x8000), by codec name: assigned here, like format versions.
LMTIER_CODEC_IDS: dict[int, str] = {1: "lz4", 2: "zstd", 3: "fp8", 4: "int8"}


class _Readable:
    """Codec ids a backend that carries codecs passes on (see :data:`READABLE_CODECS`)."""

    def __contains__(self, codec: object) -> bool:
        return isinstance(codec, int) and (codec == CODEC_NONE or codec in LMTIER_CODEC_IDS or 0x8000 <= codec <= 0xFFFF)

    def __repr__(self) -> str:
        return "READABLE_CODECS"


#: What a backend that carries codec ids (:class:`~lmtier.protocol.SupportsCodecs`) passes as
#: ``codecs=`` to :func:`decode_header`: none, lmtier's own ids this build knows, and the
#: third-party range ``0x8000..0xFFFF`` (the manager decodes those whose plugin is installed and
#: leaves the others in place). An lmtier id this build does not know is a newer writer's value:
#: NewerFormatError, left in place, not counted by ``contains``.
READABLE_CODECS = _Readable()
_CHECKED = 60  # header bytes covered by the header check (the check fills the last 4)
_PREFIX = struct.Struct("<4sHH")  # magic, version, header length: the same in every version
_V2 = struct.Struct("<4sHHQQ8s16sHHQI")
_V1 = struct.Struct("<4sHHQQ8s16s16s")
assert _V2.size == _V1.size == HEADER_BYTES
_ZERO16 = bytes(16)


class NewerFormatError(BackendError):
    """The stored value was written in a newer format (version or codec) than this reader knows.

    Not corruption: the value is a miss for this reader and must be left in place (a newer
    writer sharing the store still reads it). Not a :class:`~lmtier.errors.CorruptDataError`, so
    code that deletes corrupt values does not delete these.
    """


@dataclass(frozen=True, slots=True)
class Header:
    """A validated header.

    Attributes:
        payload_length: stored bytes after the header.
        checksum: xxh3-64 of those bytes.
        codec: codec id (:data:`CODEC_NONE` for the raw value).
        raw_length: the value's length once decoded.
        version: format version the value was written in.
    """

    payload_length: int
    checksum: int
    codec: int = CODEC_NONE
    raw_length: int = 0
    version: int = FORMAT_VERSION


def checksum(payload: Buffer) -> int:
    """xxh3-64 of ``payload``'s bytes: the checksum stored in the header."""
    return xxhash.xxh3_64_intdigest(payload)


def checksum_stream() -> xxhash.xxh3_64:
    """An incremental :func:`checksum`: ``update()`` it with a payload's pieces in order, and
    ``intdigest()`` equals ``checksum(payload)``. For hashing a payload piece by piece while
    other work (sending the previous one) goes on."""
    return xxhash.xxh3_64()


def _header_check(first60: Buffer) -> int:
    return xxhash.xxh3_64_intdigest(first60) & 0xFFFFFFFF


def encode_header(key: ChunkKey, payload: Buffer, *, payload_checksum: int | None = None,
                  codec: int = CODEC_NONE, raw_length: int | None = None) -> bytes:
    """The 64-byte header for ``payload`` stored under ``key``.

    ``payload_checksum``, when given, must be ``checksum(payload)`` computed by the caller (e.g.
    with :func:`checksum_stream`, or carried with the value from another tier); it is trusted,
    not recomputed. ``codec`` and ``raw_length`` describe an encoded payload (a value codec's
    output); by default the payload is the value itself.
    """
    view = as_bytes_view(payload)
    csum = checksum(view) if payload_checksum is None else payload_checksum
    raw = view.nbytes if raw_length is None else raw_length
    head = _V2.pack(MAGIC, FORMAT_VERSION, HEADER_BYTES, view.nbytes, csum, bytes.fromhex(key.namespace),
                    key.digest, codec, 0, raw, 0)
    return head[:_CHECKED] + _header_check(head[:_CHECKED]).to_bytes(4, "little")


def decode_header(key: ChunkKey, header: Buffer, *, codecs: Container[int] = (CODEC_NONE,)) -> Header:
    """Validate the first 64 bytes of a value stored under ``key``.

    Raises:
        CorruptDataError: bad magic, header check, reserved bytes, or a header naming another key.
        NewerFormatError: an intact header of a newer format version, or of a codec not in
            ``codecs`` (the codec ids the caller can decode).
    """
    view = as_bytes_view(header)
    if view.nbytes < HEADER_BYTES:
        raise CorruptDataError(f"{key}: value shorter than the {HEADER_BYTES}-byte header")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptDataError(f"{key}: bad magic {bytes(magic)!r}")
    if version == 1:
        return _decode_v1(key, view)
    if version < 1 or int.from_bytes(view[_CHECKED:HEADER_BYTES], "little") != _header_check(view[:_CHECKED]):
        raise CorruptDataError(f"{key}: the header fails its own check (damaged header)")
    if version > FORMAT_VERSION:
        raise NewerFormatError(
            f"{key}: stored in format version {version}, newer than this reader's {FORMAT_VERSION}; "
            "a miss, left in place for newer readers (upgrade lmtier to read it)"
        )
    _, _, _, length, csum, ns, digest, codec, reserved, raw, _ = _V2.unpack_from(view)
    if hlen != HEADER_BYTES or reserved:
        raise CorruptDataError(f"{key}: header length {hlen} or reserved bytes {reserved} invalid for version 2")
    if ns.hex() != key.namespace or digest != key.digest:
        raise CorruptDataError(f"{key}: header names a different key")
    if codec not in codecs:
        raise NewerFormatError(
            f"{key}: payload encoded with codec {codec}, which this reader cannot decode; a miss, "
            "left in place"
        )
    if codec == CODEC_NONE and raw != length:
        raise CorruptDataError(f"{key}: raw length {raw} differs from payload length {length} without a codec")
    return Header(length, csum, codec, raw, version)


def _decode_v1(key: ChunkKey, view: memoryview) -> Header:
    _, _, hlen, length, csum, ns, digest, reserved = _V1.unpack_from(view)
    if hlen != HEADER_BYTES or reserved != _ZERO16:
        raise CorruptDataError(f"{key}: version 1 header with length {hlen} or non-zero reserved bytes")
    if ns.hex() != key.namespace or digest != key.digest:
        raise CorruptDataError(f"{key}: header names a different key")
    return Header(length, csum, CODEC_NONE, length, 1)


def decode(key: ChunkKey, value: Buffer, *, verify: bool = True,
           codecs: Container[int] = (CODEC_NONE,)) -> memoryview:
    """Validate ``header ‖ payload`` for ``key`` and return a zero-copy view of the payload.

    Raises CorruptDataError or NewerFormatError as :func:`decode_header` does, and
    CorruptDataError for a payload of the wrong length or checksum (``verify=False`` skips the
    checksum, never the header). ``codecs`` as for :func:`decode_header`; the payload's codec is
    then the caller's to read (:func:`decode_header` of the first 64 bytes).
    """
    view = as_bytes_view(value)
    header = decode_header(key, view, codecs=codecs)
    payload = view[HEADER_BYTES:]
    if payload.nbytes != header.payload_length:
        raise CorruptDataError(f"{key}: payload is {payload.nbytes} bytes, header says {header.payload_length}")
    if verify and checksum(payload) != header.checksum:
        raise CorruptDataError(f"{key}: checksum mismatch")
    return payload
