"""Chunk keys: token chunking, chained prefix hashing and namespaces.

A prompt is cut into chunks of ``chunk_tokens`` tokens. Chunk ``i``'s digest is
``xxh3_128(digest_{i-1} ‖ tokens_i)`` over the little-endian int64 bytes of its tokens, starting
from the namespace, so a digest names the chunk *and its whole prefix*. Python's ``hash()`` is
never used: it is salted per process (``PYTHONHASHSEED``) and keys must agree across processes
and hosts.

The **namespace** is a short hash of everything that makes the stored bytes interpretable
(engine, model, KV layout, dtype, block size, heads, head size, TP rank/size, ...). Two models or
two layouts can never share a key, which is how lmtier never loads wrong KV.
"""

from __future__ import annotations

import array
import json
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from lmtier.errors import InvalidArgumentError

__all__ = [
    "ChunkKey",
    "KVNamespace",
    "chunk_keys",
    "chunk_spans",
    "make_namespace",
    "partial_keys",
    "namespace_set",
]

#: Bumped whenever the hashing scheme changes, so old keys can never alias new ones.
KEY_SCHEME_VERSION = 1
# fullmatch only: `$` also matches before a trailing newline
_NAMESPACE_RE = re.compile(r"[0-9a-f]{16}")
_KEY_RE = re.compile(r"([0-9a-f]{16})-([0-9a-f]{32})")


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """The identity of one stored chunk: ``namespace`` + 16-byte prefix ``digest``.

    ``str(key)`` is ``"<16 hex namespace>-<32 hex digest>"``: lowercase hex and ``-`` only, safe
    as a file name, Redis key or S3 key. :meth:`parse` inverts it.
    """

    namespace: str
    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not _NAMESPACE_RE.fullmatch(self.namespace):
            raise InvalidArgumentError(
                f"ChunkKey.namespace must be 16 lowercase hex characters, got {self.namespace!r}; "
                "build it with lmtier.keys.make_namespace()"
            )
        if not isinstance(self.digest, bytes) or len(self.digest) != 16:
            raise InvalidArgumentError(
                f"ChunkKey.digest must be 16 bytes, got {self.digest!r}; build keys with chunk_keys()"
            )

    def __str__(self) -> str:
        return f"{self.namespace}-{self.digest.hex()}"

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        """Inverse of ``str(key)``; raises InvalidArgumentError on anything else."""
        m = _KEY_RE.fullmatch(text) if isinstance(text, str) else None
        if m is None:
            raise InvalidArgumentError(f"not a chunk key string: {text!r}")
        return cls(m.group(1), bytes.fromhex(m.group(2)))


def namespace_set(namespaces: Any) -> frozenset[str]:
    """``namespaces`` (a collection of namespaces, as :func:`make_namespace` returns them) as a
    set; :class:`~lmtier.errors.InvalidArgumentError` for a lone string or anything that is not
    16 lowercase hex digits."""
    if isinstance(namespaces, (str, bytes)) or not hasattr(namespaces, "__iter__"):
        raise InvalidArgumentError(f"namespaces must be a collection of namespaces, got {namespaces!r:.60}")
    out = frozenset(namespaces)
    for ns in out:
        if not isinstance(ns, str) or not _NAMESPACE_RE.fullmatch(ns):
            raise InvalidArgumentError(f"namespaces are 16 lowercase hex digits (make_namespace()), got {ns!r:.40}")
    return out


def make_namespace(**fields: Any) -> str:
    """Hash the fields that make stored bytes interpretable into a 16-hex-char namespace.

    Values must be JSON-serialisable scalars/lists; field order does not matter.
    """
    try:
        canonical = json.dumps(
            {"_scheme": KEY_SCHEME_VERSION, **fields}, sort_keys=True, separators=(",", ":")
        )
    except TypeError as exc:
        raise InvalidArgumentError(f"namespace fields must be JSON scalars: {exc}") from None
    return xxhash.xxh3_64_hexdigest(canonical.encode())


@dataclass(frozen=True)
class KVNamespace:
    """The fields that make a KV chunk's bytes interpretable; :attr:`namespace` hashes them."""

    model: str
    kv_layout: str
    dtype: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_size: int
    page_bytes: int
    chunk_tokens: int
    engine: str = "lmtier"
    tp_rank: int = 0
    tp_world_size: int = 1
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def namespace(self) -> str:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"}
        fields["extra"] = [list(kv) for kv in self.extra]
        return make_namespace(**fields)


def _token_bytes(tokens: Any) -> memoryview:
    """Canonical little-endian int64 bytes of a token sequence (list, numpy, torch).

    Token ids must be integers that fit in int64: floats are refused, not truncated (``1.5``
    would silently key as ``1``), and so are ids of 2**63 or more.
    """
    import numpy as np

    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch tensor, without importing torch
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        arr = tokens
        if arr.dtype.kind not in "iu" and arr.size:
            raise InvalidArgumentError(
                f"token ids must be integers, got an array of {arr.dtype}; pass ints "
                "(a torch tensor: .long(); numpy: .astype(np.int64))")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 1 << 63:
            raise InvalidArgumentError(f"token ids must be below 2**63, got {int(arr.max())}")
    else:
        # array('q') takes only true integers (it refuses 1.5 where numpy would truncate it) and
        # converts a list faster than numpy's own type inference
        try:
            arr = np.frombuffer(array.array("q", tokens), dtype=np.int64)
        except OverflowError:
            raise InvalidArgumentError("token ids must fit in a signed 64-bit integer (below 2**63); "
                                       "got a larger one") from None
        except TypeError as exc:
            raise InvalidArgumentError(f"token ids must be a 1-D sequence of ints (a float is refused, "
                                       f"never truncated): {exc}") from None
    if arr.ndim != 1:
        raise InvalidArgumentError(f"token ids must be 1-D, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype="<i8")
    return memoryview(arr.data).cast("B")


def chunk_spans(num_tokens: int, chunk_tokens: int, *, include_partial: bool = True) -> list[tuple[int, int]]:
    """``[start, end)`` token spans of each chunk; the last may be partial if allowed."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral):
        raise InvalidArgumentError(f"chunk_tokens must be an integer, got {chunk_tokens!r}")
    if chunk_tokens <= 0:
        raise InvalidArgumentError(f"chunk_tokens must be positive, got {chunk_tokens}")
    end = num_tokens if include_partial else num_tokens - num_tokens % chunk_tokens
    return [(s, min(s + chunk_tokens, end)) for s in range(0, end, chunk_tokens)]


def chunk_keys(
    tokens: Sequence[int] | Iterable[int] | Any,
    namespace: str,
    chunk_tokens: int,
    *,
    include_partial: bool = False,
) -> list[ChunkKey]:
    """Keys of the chunks of ``tokens``: key ``i`` names tokens ``[0, (i+1)*chunk_tokens)``.

    A trailing partial chunk gets a key only with ``include_partial=True``; its digest differs
    from the full chunk it would grow into, so partial and full chunks never alias.
    """
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidArgumentError(f"namespace must come from make_namespace(), got {namespace!r}")
    data = _token_bytes(tokens)
    n_tokens = len(data) // 8
    prev = bytes.fromhex(namespace)
    keys: list[ChunkKey] = []
    hasher = xxhash.xxh3_128()
    for start, end in chunk_spans(n_tokens, chunk_tokens, include_partial=include_partial):
        hasher.reset()
        hasher.update(prev)
        hasher.update(data[start * 8 : end * 8])
        prev = hasher.digest()
        keys.append(_trusted_key(namespace, prev))
    return keys


def partial_keys(tokens: Sequence[int] | Iterable[int] | Any, namespace: str, chunk_tokens: int,
                 ends: Sequence[int]) -> list[ChunkKey]:
    """``chunk_keys(tokens[:end], namespace, chunk_tokens, include_partial=True)[-1]`` for each
    ``end`` of ``ends``: the keys of partial last chunks (each ``end`` in ``(0, len(tokens)]``, not
    a multiple of ``chunk_tokens``), with the whole chunks before them keyed once, not once per end
    (the engine probes up to a chunk's pages - 1 tail lengths of one prompt)."""
    data = _token_bytes(tokens)
    n_tokens = len(data) // 8
    for end in ends:
        if isinstance(end, bool) or not isinstance(end, numbers.Integral) or not 0 < end <= n_tokens \
                or end % chunk_tokens == 0:
            raise InvalidArgumentError(f"a partial chunk's end must be in (0, {n_tokens}] and not a multiple of "
                                       f"{chunk_tokens}, got {end!r}")
    whole = max((end // chunk_tokens * chunk_tokens for end in ends), default=0)
    import numpy as np

    prefix = chunk_keys(np.frombuffer(data, dtype="<i8")[:whole], namespace, chunk_tokens) if whole else []
    first = bytes.fromhex(namespace)
    hasher = xxhash.xxh3_128()
    out = []
    for end in ends:
        n_whole = end // chunk_tokens
        hasher.reset()
        hasher.update(prefix[n_whole - 1].digest if n_whole else first)
        hasher.update(data[n_whole * chunk_tokens * 8: end * 8])
        out.append(_trusted_key(namespace, hasher.digest()))
    return out


def _trusted_key(namespace: str, digest: bytes) -> ChunkKey:
    """A ChunkKey from parts already known to be valid: skips __post_init__'s checks, which were
    most of the cost of keying a long prompt (~1 us of ~1.3 us per chunk)."""
    key = object.__new__(ChunkKey)
    object.__setattr__(key, "namespace", namespace)
    object.__setattr__(key, "digest", digest)
    return key
