"""Where a chunk lives: one naming scheme for files, one for objects, shared by every transport.

A store written by one transport is read by the other: the ``disk`` tier and NIXL's ``posix``
plugin use :class:`FileLayout`, the ``s3`` tier and NIXL's ``obj`` plugin use
:func:`object_name`. Both use ``str(key)`` (lowercase hex and ``-`` only) as the last path part.

Files (``fan_out=2``, the default)::

    <root>/<namespace>/<d0d1>/<d2d3>/<str(key)>          d0d1: the digest's first two hex digits
    <root>/<namespace>/<d0d1>/<d2d3>/<str(key)>.tmp-<12 hex>   a write in progress (renamed over)

Objects::

    <prefix>/<str(key)>      (``str(key)`` alone when the prefix is empty)

Since ``str(key)`` starts with the namespace, ``<prefix>/<namespace>-`` lists one model's chunks.

Older names: NIXL's ``posix`` plugin fanned out one level (``<root>/<ns>/<d0d1>/<key>``);
:func:`scan_files` moves files found at another depth into place when a tier opens, so those
stores stay warm. NIXL's ``obj`` plugin stored ``<prefix><namespace>/<str(key)>``;
:func:`migrate_object_names` renames such objects once (docs/backends/nixl.md says how).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtier.errors import InvalidArgumentError
from lmtier.keys import ChunkKey

__all__ = [
    "TEMP_MARK",
    "FileLayout",
    "ScanResult",
    "legacy_object_name",
    "migrate_object_names",
    "normalize_prefix",
    "object_name",
    "scan_files",
]

#: What a temp file's name adds to its final name, before 12 random hex digits.
TEMP_MARK = ".tmp-"
_KEY = r"[0-9a-f]{16}-[0-9a-f]{32}"
_TEMP_RE = re.compile(rf"^({_KEY}){re.escape(TEMP_MARK)}[0-9a-f]{{12}}$")
_NS_RE = re.compile(r"^[0-9a-f]{16}$")
_FAN_RE = re.compile(r"^[0-9a-f]{2}$")
_MAX_FAN_OUT = 4


@dataclass(frozen=True)
class FileLayout:
    """Paths of chunk files under ``root`` (see the module docstring)."""

    root: Path
    fan_out: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.fan_out <= _MAX_FAN_OUT:
            raise InvalidArgumentError(f"fan_out must be 0 to {_MAX_FAN_OUT}, got {self.fan_out}")

    def dir_of(self, key: ChunkKey) -> str:
        hexd = key.digest.hex()
        return os.path.join(self.root, key.namespace, *(hexd[2 * i:2 * i + 2] for i in range(self.fan_out)))

    def path_of(self, key: ChunkKey) -> str:
        return os.path.join(self.dir_of(key), str(key))

    @staticmethod
    def temp_path(final: str) -> str:
        """A fresh temp name beside ``final`` (the only names a tier deletes besides its keys')."""
        return f"{final}{TEMP_MARK}{os.urandom(6).hex()}"

    @staticmethod
    def is_temp_name(name: str) -> bool:
        """Whether ``name`` is exactly a temp name :meth:`temp_path` makes."""
        return _TEMP_RE.match(name) is not None


@dataclass
class ScanResult:
    """What :func:`scan_files` found: ``(key, file bytes, atime ns)`` per file, and what it did."""

    entries: list[tuple[ChunkKey, int, int]] = field(default_factory=list)
    temp_removed: int = 0
    short_removed: int = 0
    moved: int = 0


def scan_files(layout: FileLayout, *, min_bytes: int = 0) -> ScanResult:
    """Index the chunk files under ``layout.root``; blocking (run it on a thread).

    Deletes only names a tier makes: leftover temp files of a crashed writer (matched exactly) and
    key files shorter than ``min_bytes`` (a header at least). Files found at another fan-out
    depth than ``layout``'s (the option changed, or another transport wrote them) are moved into
    place. Anything else is left alone.
    """
    result = ScanResult()
    with os.scandir(layout.root) as top:
        namespaces = [e for e in top if e.is_dir(follow_symlinks=False) and _NS_RE.match(e.name)]
    for ns in namespaces:
        for entry in _walk(ns.path, 0):
            _scan_entry(layout, ns.name, entry, min_bytes, result)
    return result


def _walk(path: str, depth: int) -> Iterator[os.DirEntry[str]]:
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if depth < _MAX_FAN_OUT and _FAN_RE.match(entry.name):
                yield from _walk(entry.path, depth + 1)
        elif entry.is_file(follow_symlinks=False):
            yield entry


def _scan_entry(layout: FileLayout, namespace: str, entry: os.DirEntry[str], min_bytes: int,
                result: ScanResult) -> None:
    if FileLayout.is_temp_name(entry.name):
        _unlink_quietly(entry.path)
        result.temp_removed += 1
        return
    try:
        key = ChunkKey.parse(entry.name)
    except InvalidArgumentError:
        return
    if key.namespace != namespace:
        return
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:  # removed meanwhile
        return
    if st.st_size < min_bytes:
        _unlink_quietly(entry.path)
        result.short_removed += 1
        return
    want = layout.path_of(key)
    if entry.path != want:
        os.makedirs(os.path.dirname(want), exist_ok=True)
        os.replace(entry.path, want)
        result.moved += 1
    result.entries.append((key, st.st_size, st.st_atime_ns))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def normalize_prefix(prefix: str) -> str:
    """An object prefix without leading or trailing ``/`` (``"lmtier/"`` -> ``"lmtier"``)."""
    return prefix.strip("/")


def object_name(prefix: str, key: ChunkKey) -> str:
    """The object key of ``key`` under ``prefix`` (normalised): ``<prefix>/<str(key)>``."""
    prefix = normalize_prefix(prefix)
    return f"{prefix}/{key}" if prefix else str(key)


def legacy_object_name(prefix: str, key: ChunkKey) -> str:
    """The name NIXL's ``obj`` plugin used before the shared scheme: ``<prefix><namespace>/<key>``
    (``prefix`` exactly as configured, usually ending in ``/``)."""
    return f"{prefix}{key.namespace}/{key}"


def migrate_object_names(client: Any, bucket: str, prefix: str, *,
                         progress: Callable[[int], None] | None = None) -> int:
    """Rename objects stored under :func:`legacy_object_name` to :func:`object_name`, once.

    ``client`` is a boto3 S3 client (``list_objects_v2`` paginator, ``copy_object``,
    ``delete_object``); ``prefix`` is the ``obj.prefix`` the old tier was configured with. Only
    names of exactly the old form are touched: each is copied to its new name (replacing a value
    stored there meanwhile: the same chunk) and then deleted. Returns how many objects were
    moved; ``progress(n)`` is called after each. Safe to re-run, and to run while tiers use the
    bucket (a read racing a move is a miss).
    """
    old_re = re.compile(rf"^{re.escape(prefix)}([0-9a-f]{{16}})/(\1-[0-9a-f]{{32}})$")
    moved = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            m = old_re.match(obj["Key"])
            if m is None:
                continue
            key = ChunkKey.parse(m.group(2))
            new = object_name(prefix, key)
            if new == obj["Key"]:
                continue
            client.copy_object(Bucket=bucket, Key=new, CopySource={"Bucket": bucket, "Key": obj["Key"]})
            client.delete_object(Bucket=bucket, Key=obj["Key"])
            moved += 1
            if progress is not None:
                progress(moved)
    return moved
