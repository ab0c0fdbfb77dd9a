"""Where a chunk lives: one naming scheme for files, one for objects, shared by every transport.

A store written by one transport is read by the other: the ``disk`` tier and NIXL's ``posix``
plugin use :class:`FileLayout`, the ``s3`` tier and NIXL's ``obj`` plugin use
:func:`object_name`. Both use ``str(key)`` (lowercase hex and ``-`` only) as the last path part.

Files (``fan_out=2``, the default)::

    <root>/.lmtier_disk_root                              the marker: this root is a tier's own
    <root>/<namespace>/<d0d1>/<d2d3>/<str(key)>           d0d1: the digest's first two hex digits
    <root>/<namespace>/<d0d1>/<d2d3>/<str(key)>.tmp-<12 hex>   a write in progress (renamed over)

A root is claimed by :func:`claim_root` (the marker written at the first open; a non-empty
directory without it is refused), and a tier only ever deletes names it makes, matched exactly.

Objects::

    <prefix>/<str(key)>      (``str(key)`` alone when the prefix is empty)

Since ``str(key)`` starts with the namespace, ``<prefix>/<namespace>-`` lists one model's chunks.

Older names: NIXL's ``posix`` plugin fanned out one level (``<root>/<ns>/<d0d1>/<key>``) and wrote
no marker; :func:`scan_files` moves files found at another depth into place when a tier opens,
and docs/backends/nixl.md says how to claim such a root. NIXL's ``obj`` plugin stored
``<prefix><namespace>/<str(key)>``; :func:`migrate_object_names` renames such objects once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtier.errors import CorruptDataError, InvalidArgumentError
from lmtier.framing import CODEC_NONE, HEADER_BYTES, NewerFormatError, decode_header
from lmtier.keys import ChunkKey
from lmtier.kit.options import DEFAULT_FAN_OUT, MAX_FAN_OUT

__all__ = [
    "MARKER",
    "TEMP_MARK",
    "FileLayout",
    "ForeignRootError",
    "RootGoneError",
    "ScanResult",
    "check_root",
    "claim_root",
    "create_temp_file",
    "legacy_object_name",
    "migrate_object_names",
    "normalize_prefix",
    "object_name",
    "remove_stored_file",
    "scan_files",
]

#: What a temp file's name adds to its final name, before 12 random hex digits.
TEMP_MARK = ".tmp-"
#: The file that makes a directory a tier's root (written at the first open).
MARKER = ".lmtier_disk_root"
_MARKER_TEXT = b"lmtier tier root: every file below is the tier's own and may be deleted by it\n"
_NS_RE = re.compile(r"[0-9a-f]{16}")
_FAN_RE = re.compile(r"[0-9a-f]{2}")
_TEMP_RE = re.compile(r"[0-9a-f]{16}-[0-9a-f]{32}\.tmp-[0-9a-f]{12}")  # temp_path's names
_TOP_TEMP_RE = re.compile(r"\.(probe|lmtier_disk_root)\.tmp-[0-9a-f]{12}")  # claim_root's names
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class FileLayout:
    """Paths of chunk files under ``root`` (see the module docstring)."""

    root: Path
    fan_out: int = DEFAULT_FAN_OUT

    def __post_init__(self) -> None:
        if not 0 <= self.fan_out <= MAX_FAN_OUT:
            raise InvalidArgumentError(f"fan_out must be 0 to {MAX_FAN_OUT}, got {self.fan_out}")

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
        return _TEMP_RE.fullmatch(name) is not None


class ForeignRootError(Exception):
    """The root is a non-empty directory without the marker: not a tier's, so not ours to write
    or clean. The message says what to do."""

    def __init__(self, root: Path, names: list[str]) -> None:
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        super().__init__(
            f"root {os.fspath(root)!r} is not empty ({shown}) and has no {MARKER} marker, so it is not a "
            "tier's directory; a tier deletes files in its root and never adopts a directory it did not "
            f"create. Use a new or empty directory (e.g. {os.fspath(root / 'lmtier')!r}); if this is a "
            f"tier's root made by an older lmtier, create the marker: touch {os.fspath(root / MARKER)!r}"
        )
        self.root, self.names = root, names


class RootGoneError(FileNotFoundError):
    """The root (or its marker) vanished while the tier was open: deleted, or unmounted."""


def claim_root(root: Path) -> bool:
    """Create or adopt ``root``; ``False`` when it is a tier's but on a read-only filesystem.

    A new or empty directory gets the marker; a directory holding the marker is a tier's own;
    anything else raises :class:`ForeignRootError`. Proves a file can be created in the root
    (raises OSError, except EROFS on a root that holds the marker). Blocking.
    """
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, MARKER)
    ours = os.path.isfile(marker)
    if not ours:
        with os.scandir(root) as it:  # another opener's probe or marker temp file is not foreign
            names = sorted(e.name for e in it if not _TOP_TEMP_RE.fullmatch(e.name))
        if names:
            raise ForeignRootError(root, names)
    try:
        _write_new(os.path.join(root, f".probe{TEMP_MARK}{os.urandom(6).hex()}"), b"lmtier", keep=False)
    except OSError as exc:
        if ours and exc.errno == errno.EROFS:
            return False
        raise
    if not ours:
        tmp = os.path.join(root, f"{MARKER}{TEMP_MARK}{os.urandom(6).hex()}")
        _write_new(tmp, _MARKER_TEXT, keep=True)
        os.replace(tmp, marker)
    return True


def check_root(root: Path) -> None:
    """Raise :class:`RootGoneError` unless the root still holds its marker (OSError if unreadable)."""
    if not os.path.isfile(os.path.join(root, MARKER)):
        raise RootGoneError(errno.ENOENT, "the tier's root or its marker file is gone", os.fspath(root))


def create_temp_file(tmp: str | os.PathLike[str], root: Path) -> int:
    """Open a new temporary file ``tmp`` (:meth:`FileLayout.temp_path`) for writing, exclusively;
    its directory is made on first use, never the root: a root that is gone (deleted or
    unmounted) raises :class:`RootGoneError` instead of being recreated (files written into a
    bare mount point would vanish at the next mount)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(tmp, flags, 0o644)
    except FileNotFoundError:  # first file of its directory, or the root is gone
        check_root(root)
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        return os.open(tmp, flags, 0o644)


def remove_stored_file(path: str | os.PathLike[str], root: Path | None = None) -> None:
    """Unlink a stored file; an absent one is fine, unless ``root`` is given (the tier's index
    holds the file) and the root itself is gone or unmounted: then nothing was deleted, and
    :class:`RootGoneError` says so."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        if root is not None:
            check_root(root)


@dataclass
class ScanResult:
    """What :func:`scan_files` found: ``(key, file bytes, atime ns)`` per file, and what it did.

    ``newer`` holds the keys (among ``entries``) whose header is of a newer format: a tier keeps
    those files (and counts their bytes) but must not serve or count them as present."""

    entries: list[tuple[ChunkKey, int, int]] = field(default_factory=list)
    newer: set[ChunkKey] = field(default_factory=set)
    temp_removed: int = 0
    short_removed: int = 0
    corrupt_removed: int = 0
    moved: int = 0


def scan_files(layout: FileLayout, *, clean: bool = True, read_headers: bool = False,
               codecs: Container[int] = (CODEC_NONE,)) -> ScanResult:
    """Index the chunk files under ``layout.root``; blocking (run it on a thread).

    With ``clean``: delete leftover temp files of a crashed writer and key files shorter than a
    header, and move files found at another fan-out depth than ``layout``'s (the option changed,
    or another transport wrote them) into place. Without ``clean`` (a read-only root) such files
    are skipped. Names a tier does not make are left alone. With ``read_headers``, each file's
    header is read (64 bytes): a damaged one is deleted (with ``clean``) and not indexed, one of a
    newer format (or a codec not in ``codecs``) is indexed and listed in ``newer``.
    """
    result = ScanResult()
    with os.scandir(layout.root) as top:
        for entry in top:
            if entry.is_dir(follow_symlinks=False) and _NS_RE.fullmatch(entry.name):
                _scan_dir(layout, entry.path, entry.name, 0, result, clean, read_headers, codecs)
            elif clean and entry.is_file(follow_symlinks=False) and _TOP_TEMP_RE.fullmatch(entry.name):
                _unlink_quietly(entry.path)
                result.temp_removed += 1
    return result


def _scan_dir(layout: FileLayout, path: str, namespace: str, depth: int, result: ScanResult, clean: bool,
              read_headers: bool, codecs: Container[int] = (CODEC_NONE,)) -> None:
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if depth < MAX_FAN_OUT and _FAN_RE.fullmatch(entry.name):
                _scan_dir(layout, entry.path, namespace, depth + 1, result, clean, read_headers, codecs)
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        if _TEMP_RE.fullmatch(entry.name):
            if clean:
                _unlink_quietly(entry.path)
                result.temp_removed += 1
            continue
        try:
            key = ChunkKey.parse(entry.name)
        except InvalidArgumentError:
            continue
        if key.namespace != namespace:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed meanwhile
            continue
        want = layout.path_of(key)
        if st.st_size < HEADER_BYTES or entry.path != want:
            if not clean:
                continue
            if st.st_size < HEADER_BYTES:
                _unlink_quietly(entry.path)
                result.short_removed += 1
                continue
            os.makedirs(os.path.dirname(want), exist_ok=True)
            os.replace(entry.path, want)
            result.moved += 1
        if read_headers:
            verdict = _header_verdict(want, key, codecs)
            if verdict == "corrupt":
                if clean:
                    _unlink_quietly(want)
                    result.corrupt_removed += 1
                continue
            if verdict == "newer":
                result.newer.add(key)
        result.entries.append((key, st.st_size, st.st_atime_ns))


def _header_verdict(path: str, key: ChunkKey, codecs: Container[int] = (CODEC_NONE,)) -> str:
    """``"ok"``, ``"newer"`` (a newer format) or ``"corrupt"`` for the header of ``path``'s file
    (``"ok"`` as well when it cannot be read now: reads will tell)."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return "ok"
    try:
        decode_header(key, os.pread(fd, HEADER_BYTES, 0), codecs=codecs)
    except NewerFormatError:
        return "newer"
    except CorruptDataError:
        return "corrupt"
    except OSError:
        return "ok"
    finally:
        os.close(fd)
    return "ok"


def _write_new(path: str, data: bytes, *, keep: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
        if not keep:
            os.unlink(path)


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
