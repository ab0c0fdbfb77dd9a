"""Counting the checksum passes over stored values: every xxh3 pass lmtier.framing makes over more
than a header's bytes, one-shot or streamed, wherever a tier or the manager makes it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import xxhash

__all__ = ["payload_hashes"]

_HEADER_CHECK = 64  # the header's own check hashes its first 60 bytes: not a payload pass


@contextlib.contextmanager
def payload_hashes() -> Iterator[list[int]]:
    """Yields a list that receives the byte count of each payload hashed meanwhile (a streamed
    pass is counted when its digest is taken). Patches the ``xxhash`` functions lmtier.framing
    calls, so every path is seen, not only the kit's."""
    passes: list[int] = []
    one_shot = xxhash.xxh3_64_intdigest
    stream = xxhash.xxh3_64

    def counted(data: Any, *args: Any) -> int:
        n = memoryview(data).nbytes
        if n > _HEADER_CHECK:
            passes.append(n)
        return one_shot(data, *args)

    class CountedStream:
        def __init__(self, *args: Any) -> None:
            self._inner = stream(*args)
            self._bytes = 0

        def update(self, data: Any) -> None:
            self._bytes += memoryview(data).nbytes
            self._inner.update(data)

        def intdigest(self) -> int:
            if self._bytes > _HEADER_CHECK:
                passes.append(self._bytes)
            return self._inner.intdigest()

    xxhash.xxh3_64_intdigest = counted  # type: ignore[assignment]
    xxhash.xxh3_64 = CountedStream  # type: ignore[assignment,misc]
    try:
        yield passes
    finally:
        xxhash.xxh3_64_intdigest = one_shot  # type: ignore[assignment]
        xxhash.xxh3_64 = stream  # type: ignore[misc]
