"""Checking a stored value read back as a header and a payload held in different buffers.

Backends rarely read ``header ‖ payload`` into one buffer: the payload lands in the caller's
buffer (``get_into``) or a receive slab, the header in a small buffer of its own.
:func:`check_stored` validates the two together (header, key, length, checksum) exactly as
:func:`lmtier.framing.decode` does for one buffer. :class:`Rejections` is the bookkeeping every
backend needs for what fails: a corrupt value is a miss to delete, a newer-format value a miss to
leave in place, both counted and logged once per value.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Literal

from lmtier.errors import CorruptDataError
from lmtier.framing import CODEC_NONE, HEADER_BYTES, Header, NewerFormatError, checksum, decode_header

if TYPE_CHECKING:
    from collections.abc import Container

    from lmtier.keys import ChunkKey
    from lmtier.protocol import Buffer

__all__ = ["Rejections", "check_stored", "stored_size", "stored_value"]

log = logging.getLogger("lmtier.kit")


def check_stored(key: ChunkKey, header: Buffer, payload: Buffer, *, verify: bool = True,
                 payload_checksum: int | None = None, codecs: Container[int] = (CODEC_NONE,)) -> Header:
    """Validate a value read back as ``header`` (its first 64 bytes) and ``payload`` (the rest).

    ``payload_checksum``, when given, is the checksum the caller computed while reading (e.g.
    piece by piece); otherwise it is computed here unless ``verify`` is off (the header is
    always checked). ``codecs``: the codec ids the caller passes on (a backend that carries
    codecs passes :data:`lmtier.framing.READABLE_CODECS` and returns :func:`stored_value`).

    Raises:
        CorruptDataError: damaged header, another key's value, wrong length or checksum: a miss
            the backend deletes.
        NewerFormatError: written by a newer lmtier: a miss the backend leaves in place.
    """
    head = decode_header(key, header, codecs=codecs)
    got = memoryview(payload).nbytes
    if got != head.payload_length:
        raise CorruptDataError(f"{key}: payload is {got} bytes, header says {head.payload_length} (truncated?)")
    if verify or payload_checksum is not None:
        csum = checksum(payload) if payload_checksum is None else payload_checksum
        if csum != head.checksum:
            raise CorruptDataError(f"{key}: checksum mismatch (damaged payload)")
    return head


def stored_value(value: Buffer, header: Header) -> Buffer:
    """What a backend's ``get`` returns for a validated value: ``value`` itself when it is not
    encoded, else a :class:`~lmtier.kit.Payload` over it (no copy) carrying the header's codec
    id, raw length and checksum, which tell the manager how to decode it (and spare the next
    tier a hash). See :class:`~lmtier.protocol.SupportsCodecs`."""
    if header.codec == CODEC_NONE:
        return value
    from lmtier.kit.values import Payload

    return Payload.of(value, checksum=header.checksum, codec=header.codec, raw_length=header.raw_length)  # type: ignore[return-value]


def stored_size(key: ChunkKey, header: Buffer) -> int:
    """Bytes the whole stored value has (header + payload) by its header; raises like
    :func:`check_stored`. For reads that fetch the header first and size the payload's buffer."""
    return HEADER_BYTES + decode_header(key, header).payload_length


Kind = Literal["corrupt", "newer"]


class Rejections:
    """Counts of the values a tier's reads refused, and the log line for each.

    ``note(key, exc)`` says what a read failure means: ``"corrupt"`` (delete the value: it is a
    miss and would stay one), ``"newer"`` (leave it: a newer reader can use it), or ``None`` (not
    about the value: a fault of the tier, to be raised or mapped). Thread-safe.
    """

    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.corrupt = 0
        self.newer = 0
        self._lock = threading.Lock()

    def note(self, key: ChunkKey, exc: BaseException) -> Kind | None:
        if isinstance(exc, NewerFormatError):
            with self._lock:
                self.newer += 1
            log.info("%s: %s is a miss for this reader, left in place: %s", self.tier, key, exc)
            return "newer"
        if isinstance(exc, CorruptDataError):
            with self._lock:
                self.corrupt += 1
            log.warning("%s: deleting a corrupt value (a miss): %s", self.tier, exc)
            return "corrupt"
        return None

    def stats(self) -> dict[str, int]:
        """``corrupt`` and ``newer_format`` counts, for a backend's ``stats()``."""
        return {"corrupt": self.corrupt, "newer_format": self.newer}
