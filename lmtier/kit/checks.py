"""Argument checks for backends called without a manager, with errors that say what to pass.

The :class:`~lmtier.manager.StorageManager` checks every key and value before a backend sees
them, and the conformance suite does not ask a backend to check again. These helpers are for a
backend (or a tool) that is also called directly and wants the same clear
:class:`~lmtier.errors.InvalidArgumentError` the manager gives, at the cost of one ``isinstance``
per key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmtier.buffers import as_bytes_view, writable_bytes_view
from lmtier.errors import InvalidArgumentError
from lmtier.keys import ChunkKey

__all__ = ["check_items", "check_keys", "into_views"]


def check_keys(keys: object, *, argument: str = "keys") -> Sequence[ChunkKey]:
    """``keys`` if it is a sequence of :class:`~lmtier.keys.ChunkKey`; InvalidArgumentError naming
    ``argument`` and the first offending element otherwise."""
    if isinstance(keys, (str, bytes)) or not isinstance(keys, Sequence):
        raise InvalidArgumentError(f"{argument} must be a sequence of lmtier.ChunkKey, got {type(keys).__name__}")
    for i, k in enumerate(keys):
        if not isinstance(k, ChunkKey):
            raise InvalidArgumentError(
                f"{argument}[{i}] must be an lmtier.ChunkKey (build keys with lmtier.keys.chunk_keys), "
                f"got {type(k).__name__}: {k!r:.80}"
            )
    return keys


def check_items(items: object) -> Sequence[tuple[ChunkKey, Any]]:
    """``items`` if it is a sequence of ``(ChunkKey, host buffer)`` pairs; InvalidArgumentError
    naming the first bad item otherwise. Every value is checked before the caller writes any."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise InvalidArgumentError(f"items must be a sequence of (ChunkKey, buffer) pairs, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidArgumentError(f"items[{i}] must be a (ChunkKey, buffer) pair, got {item!r:.80}")
        key, value = item
        if not isinstance(key, ChunkKey):
            raise InvalidArgumentError(f"items[{i}][0] must be an lmtier.ChunkKey, got {type(key).__name__}: {key!r:.80}")
        try:
            as_bytes_view(value)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"items[{i}][1]: {exc}") from None
    return items  # type: ignore[return-value]


def into_views(keys: Sequence[ChunkKey], outs: Sequence[Any]) -> list[memoryview]:
    """Writable flat byte views of ``get_into``'s ``outs``, one per key; InvalidArgumentError for a
    count mismatch or a buffer that cannot be written (read-only, GPU, not contiguous)."""
    if len(keys) != len(outs):
        raise InvalidArgumentError(f"get_into needs one buffer per key: got {len(keys)} keys and {len(outs)} buffers")
    return [writable_bytes_view(o) for o in outs]
