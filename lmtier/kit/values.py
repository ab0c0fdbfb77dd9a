"""Values on their way to storage, and the checksum that travels with them.

The checksum in a stored value's header costs one pass over every byte (xxh3: ~12% of a raw
1 MiB Redis ``SET`` on the machines measured). A value written to several tiers (write-through,
a background tier, a demotion from a tier that already verified it) would pay it once per tier.
:class:`Payload` carries it instead: a zero-copy ``uint8`` array over the value's bytes that
remembers the checksum once any tier has computed it, so the next tier reuses it. It is a numpy
array, i.e. an ordinary buffer-protocol value: a backend that knows nothing of it stores it like
any other value.

Backends reach it through :func:`put_items`, whose :class:`StoreItem` answers ``checksum()`` and
``header()`` from the carried checksum when there is one, computes and remembers it otherwise.
The same payload must not change between the tiers (the protocol already says a caller must not
change a value until ``put`` returns).

Codec id and raw length ride along too: a value codec (DESIGN.md section 8) hands tiers a
:class:`Payload` whose ``codec`` and ``raw_length`` go into the header.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmtier.buffers import as_bytes_view
from lmtier.errors import CapacityError, InvalidArgumentError
from lmtier.framing import CODEC_NONE, HEADER_BYTES, checksum, encode_header

if TYPE_CHECKING:
    from lmtier.keys import ChunkKey

__all__ = ["Payload", "StoreItem", "checksum_of", "put_items"]


class _Memo:
    """The checksum of one payload's bytes, computed at most once (shared by its copies)."""

    __slots__ = ("lock", "value")

    def __init__(self, value: int | None = None) -> None:
        self.lock = threading.Lock()
        self.value = value


class Payload(np.ndarray):  # type: ignore[type-arg]
    """A value's bytes (a read-only-or-not ``uint8`` array over them, no copy) and its header facts.

    Build it with :meth:`of`. Slices and other arrays derived from it are plain byte arrays that
    know no checksum (their bytes differ).
    """

    _memo: _Memo
    codec: int
    raw_length: int

    @classmethod
    def of(cls, value: object, *, checksum: int | None = None, codec: int = CODEC_NONE,
           raw_length: int | None = None, like: Payload | None = None) -> Payload:
        """``value`` (any host buffer) as a Payload; a Payload is returned as is.

        ``checksum``, when given, must be the checksum of exactly these bytes. ``like`` shares
        the checksum memo of another Payload holding the same bytes (a copy of it), so whichever
        is hashed first answers for both.
        """
        if isinstance(value, Payload) and checksum is None and like is None:
            return value
        view = as_bytes_view(value)
        out = np.frombuffer(view, dtype=np.uint8).view(cls) if view.nbytes else np.empty(0, np.uint8).view(cls)
        memo = like._memo if like is not None else _Memo(checksum)
        if checksum is not None and memo.value is None:
            memo.value = checksum
        out._memo = memo
        if isinstance(value, Payload):
            codec, raw_length = value.codec, value.raw_length
        elif like is not None:
            codec, raw_length = like.codec, like.raw_length
        out.codec = codec
        out.raw_length = view.nbytes if raw_length is None else raw_length
        return out

    def __array_finalize__(self, obj: Any) -> None:
        # a view or slice of a Payload holds other bytes: it starts with no checksum and no codec
        self._memo = _Memo()
        self.codec = CODEC_NONE
        self.raw_length = self.nbytes

    @property
    def known_checksum(self) -> int | None:
        """The checksum if some tier has computed it already, else None."""
        return self._memo.value

    def checksum(self, compute: Callable[[], int] | None = None) -> int:
        """The checksum of these bytes, computed on the first call only (thread-safe).
        ``compute``: how that first call gets it (default: one pass over the bytes; a tier that
        hashed most of them already while sending passes the rest of its own pass)."""
        memo = self._memo
        if memo.value is None:
            with memo.lock:  # two tiers asking at once: one hashes, the other waits for it
                if memo.value is None:
                    memo.value = checksum(memoryview(self)) if compute is None else compute()  # type: ignore[arg-type]
        return memo.value

    def remember_checksum(self, value: int) -> None:
        """Record a checksum computed elsewhere (e.g. streamed while sending)."""
        self._memo.value = value

    @property
    def being_hashed(self) -> bool:
        """Whether a tier is computing :meth:`checksum` right now (another tier asking waits
        for that pass instead of making a second)."""
        return self._memo.lock.locked()

    def copy_bytes(self) -> Payload:
        """A private copy of the bytes that keeps the checksum (known now or computed later)."""
        return Payload.of(self.tobytes(), like=self)

    @classmethod
    def copy_of(cls, value: object) -> Payload:
        """A private copy of any host buffer's bytes, keeping the checksum a Payload carries (an
        evicted value on its way to the next tier: the evicting tier's memory is reused next)."""
        if isinstance(value, Payload):
            return value.copy_bytes()
        return cls.of(bytes(as_bytes_view(value)))


def checksum_of(value: object) -> int:
    """The checksum of any host buffer; a :class:`Payload` computes it at most once."""
    if isinstance(value, Payload):
        return value.checksum()
    return checksum(as_bytes_view(value))


class StoreItem:
    """One item of a ``put`` batch, ready to be written: its key, the value as given, a flat byte
    view of it, and the header facts (checksum, codec, raw length) the value may carry."""

    __slots__ = ("_payload", "key", "value", "view")

    def __init__(self, key: ChunkKey, value: object) -> None:
        self.key = key
        self.value = value
        self._payload = value if isinstance(value, Payload) else None
        self.view = as_bytes_view(value)

    @property
    def nbytes(self) -> int:
        return self.view.nbytes

    @property
    def known_checksum(self) -> int | None:
        """The carried checksum, or None if no tier has computed it yet."""
        return None if self._payload is None else self._payload.known_checksum

    def checksum(self) -> int:
        """The payload's checksum: carried, or computed now (and remembered for the next tier)."""
        if self._payload is not None:
            return self._payload.checksum()
        return checksum(self.view)

    @property
    def unhashed(self) -> bool:
        """No tier has the checksum, nor is computing it now: a backend may hash the payload its
        own way (piece by piece while sending) and :meth:`remember_checksum` it. Once this turns
        False, :meth:`checksum` gives (or waits for) the other tier's pass: a backend hashing
        ahead abandons its own, and ends it with :meth:`settle_checksum`."""
        return self._payload is None or (self._payload.known_checksum is None and not self._payload.being_hashed)

    def settle_checksum(self, finish: Callable[[], int]) -> int:
        """The checksum, ending a pass the backend ran itself (``finish()`` completes it, e.g. the
        last pieces of a hash run ahead while sending), unless another tier has the checksum or is
        computing it: then ``finish`` is not called and that tier's value is returned (waited
        for). Concurrent tiers sharing a value thus complete one pass between them."""
        return finish() if self._payload is None else self._payload.checksum(finish)

    def remember_checksum(self, value: int) -> None:
        """Record a checksum the backend computed itself (e.g. piece by piece while sending)."""
        if self._payload is not None:
            self._payload.remember_checksum(value)

    def header(self, payload_checksum: int | None = None) -> bytes:
        """The 64-byte header of this item (hashes the payload unless the checksum is known)."""
        csum = self.checksum() if payload_checksum is None else payload_checksum
        codec = CODEC_NONE if self._payload is None else self._payload.codec
        raw = None if self._payload is None else self._payload.raw_length
        return encode_header(self.key, self.view, payload_checksum=csum, codec=codec, raw_length=raw)


def put_items(items: Sequence[tuple[ChunkKey, Any]], *, tier: str,
              max_item_bytes: int | None = None) -> list[StoreItem]:
    """The items of a ``put`` batch as :class:`StoreItem`, a key given twice kept once with its
    last value (as if stored one by one), every value checked before anything is written.

    Raises:
        InvalidArgumentError: a value is not a host buffer (from :func:`~lmtier.buffers.as_bytes_view`).
        CapacityError: a value is larger than ``max_item_bytes`` (the message names ``tier``).
    """
    latest: dict[ChunkKey, StoreItem] = {}
    for i, (key, value) in enumerate(items):
        try:
            item = StoreItem(key, value)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{tier}: items[{i}][1]: {exc}") from None
        if max_item_bytes is not None and item.nbytes > max_item_bytes:
            raise CapacityError(
                f"{tier}: {key} is {item.nbytes} bytes, more than the tier's max_item_bytes of "
                f"{max_item_bytes} (its limit minus the {HEADER_BYTES}-byte header); use smaller chunks or "
                "raise the limit"
            )
        latest.pop(key, None)  # re-insert: the order of last occurrence, as sequential puts give
        latest[key] = item
    return list(latest.values())
