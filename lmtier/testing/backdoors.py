"""Back doors the conformance suite's fault and corruption scenarios use (zarr-style raw access).

A backend's tests opt into the scenarios by overriding two fixtures of
:class:`~lmtier.testing.BackendConformance`:

* ``raw_store`` returns a :class:`RawStore`: read and replace the bytes stored for a key,
  bypassing the backend, as bit rot, a crashed writer, another lmtier version or an operator
  would. The suite then truncates values, flips bits in payloads and headers, swaps two values,
  and writes values of a newer format version, and checks what the backend makes of them. A
  raw store that is also an :class:`UnreadableStore` can make one key's value unreadable by the
  store itself (a bad sector, a directory where the file was): the suite then checks that the
  fault is a miss for that key alone.
* ``service`` returns a :class:`Service`: stop the store the backend talks to (kill the server,
  take the filesystem away) and start it again. The suite checks that a tier that is down fails
  fast with :class:`~lmtier.errors.BackendUnavailableError` (or answers a miss) and works again
  once the store is back, without being reopened.

Both methods of each may be plain or ``async``. The helpers below make the damaged bytes.
"""

from __future__ import annotations

import inspect
import struct
from typing import Any, Protocol, runtime_checkable

import xxhash

from lmtier.framing import FORMAT_VERSION, HEADER_BYTES, MAGIC
from lmtier.keys import ChunkKey

__all__ = [
    "HEADER_FIELDS",
    "RawStore",
    "Service",
    "UnreadableStore",
    "flip_bit",
    "maybe_await",
    "newer_format",
    "unknown_codec",
    "version_1",
]

#: Byte offsets of the header's fields (format version 2), for flipping a bit in each.
HEADER_FIELDS = {
    "magic": 0, "version": 4, "header length": 6, "payload length": 8, "checksum": 16,
    "namespace": 24, "digest": 32, "codec": 48, "reserved": 50, "raw length": 52, "header check": 60,
}


@runtime_checkable
class RawStore(Protocol):
    """The bytes a backend stored for each key (header and payload), read and written around it."""

    def read(self, key: ChunkKey) -> bytes | None:
        """The stored bytes of ``key`` exactly as stored, or None if nothing is stored."""
        ...

    def write(self, key: ChunkKey, data: bytes) -> None:
        """Replace (or create) what is stored for ``key`` with ``data``, as the backend would
        find it on its next read."""
        ...


@runtime_checkable
class UnreadableStore(Protocol):
    """A :class:`RawStore` that can also break the storage of one key."""

    def make_unreadable(self, key: ChunkKey) -> None:
        """Make reads of ``key``'s value fail inside the store (an I/O error, a directory where
        its file was, an object the server cannot serve), the other keys untouched. Not
        corruption: the store fails to answer, it does not answer wrong bytes."""
        ...


@runtime_checkable
class Service(Protocol):
    """The store a backend depends on (a server, a filesystem), stopped and started by the test.

    Attributes:
        deadline_s: the longest any call of the backend may take while the store is down (its
            configured timeouts plus a margin): a call still running after it counts as a hang.
    """

    deadline_s: float

    def stop(self) -> None:
        """Make the store unreachable (kill the server, remove the mount...)."""
        ...

    def start(self) -> None:
        """Bring it back where the backend expects it; return once it answers."""
        ...


async def maybe_await(value: Any) -> Any:
    """``value``, awaited if it is awaitable (back doors may be sync or async)."""
    return await value if inspect.isawaitable(value) else value


def flip_bit(data: bytes, offset: int, bit: int = 0) -> bytes:
    """``data`` with bit ``bit`` of byte ``offset`` inverted."""
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def _recheck(header: bytearray) -> None:
    header[60:64] = (xxhash.xxh3_64_intdigest(bytes(header[:60])) & 0xFFFFFFFF).to_bytes(4, "little")


def newer_format(data: bytes) -> bytes:
    """A stored value re-labelled as written in the next format version, its header check intact:
    what a newer lmtier sharing the store would write."""
    out = bytearray(data)
    assert out[:4] == MAGIC, "not a value with an lmtier header"
    struct.pack_into("<H", out, 4, FORMAT_VERSION + 1)
    _recheck(out)
    return bytes(out)


def unknown_codec(data: bytes, codec: int = 0x7F01) -> bytes:
    """A stored value whose header names a codec this reader does not have (check intact)."""
    out = bytearray(data)
    struct.pack_into("<H", out, 48, codec)
    _recheck(out)
    return bytes(out)


def version_1(key: ChunkKey, payload: bytes) -> bytes:
    """``payload`` stored in format version 1 (before codec ids and the header check)."""
    head = struct.pack("<4sHHQQ8s16s16x", MAGIC, 1, HEADER_BYTES, len(payload),
                       xxhash.xxh3_64_intdigest(payload), bytes.fromhex(key.namespace), key.digest)
    return head + payload
