"""Blocking file operations of the disk tier; each runs on one of the tier's worker threads.

Every stored file is ``codec header (64 bytes) ‖ payload`` at ``Layout.path_of(key)``. Writes go
to ``<final>.tmp-<random>`` in the same directory and are published by ``os.replace`` (atomic on
POSIX), so a reader sees the old file, the new one, or none: never a partial one. Recency lives
in the backend's memory; it is also stamped on each file's atime (ns resolution, monotonic stamps
from the backend) so the LRU order survives a restart even on ``noatime`` / ``relatime`` mounts.
A read stamps only on a best-effort basis: reads never depend on being able to write.

The root is the tier's own: a marker file (:data:`MARKER`) written at the first open claims it,
and a non-empty directory without one is refused. Cleanup deletes only names this module creates,
matched exactly: ``<key>.tmp-<12 hex>`` temp files in namespace directories, ``.probe.tmp-<12
hex>`` probes at the top, and key-named files too short to hold a header.

Functions raise ``OSError`` (mapped by the caller in one place) and
:class:`~lmtier.errors.CorruptDataError`; a corrupt file is unlinked here before raising.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from lmtier.errors import CorruptDataError, InvalidArgumentError
from lmtier.framing import HEADER_BYTES, decode, decode_header, encode_header
from lmtier.keys import ChunkKey

if TYPE_CHECKING:
    from lmtier_backends.disk._buffers import BufferRecycler

__all__ = [
    "MARKER",
    "ForeignRootError",
    "Layout",
    "RootGoneError",
    "ScanResult",
    "check_root",
    "claim_root",
    "evict_file",
    "read_file",
    "read_file_into",
    "remove_file",
    "scan",
    "write_file",
]

#: Payload bytes read per syscall. The checksum of each piece is computed while the kernel's
#: readahead is already fetching the next one, so hashing hides behind the device.
PIECE_BYTES = 4 << 20
TMP_MARK = ".tmp-"
#: The file that makes a directory a disk tier's root (written at the first open).
MARKER = ".lmtier_disk_root"
_MARKER_TEXT = b"lmtier disk tier root: every file below is the tier's own and may be deleted by it\n"
_NS_RE = re.compile(r"[0-9a-f]{16}")
_FAN_RE = re.compile(r"[0-9a-f]{2}")
_TMP_RE = re.compile(r"[0-9a-f]{16}-[0-9a-f]{32}\.tmp-[0-9a-f]{12}")  # write_file's temp names
_TOP_TMP_RE = re.compile(r"\.(probe|lmtier_disk_root)\.tmp-[0-9a-f]{12}")  # claim_root's temp names
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Layout:
    """Where a key's file lives: ``root/<namespace>/<d0d1>/<d2d3>/<str(key)>`` for fan_out=2."""

    root: Path
    fan_out: int

    def dir_of(self, key: ChunkKey) -> str:
        hexd = key.digest.hex()
        parts = [hexd[2 * i : 2 * i + 2] for i in range(self.fan_out)]
        return os.path.join(self.root, key.namespace, *parts)

    def path_of(self, key: ChunkKey) -> str:
        return os.path.join(self.dir_of(key), str(key))


@dataclass
class ScanResult:
    """What a start-up scan found: ``(key, file bytes, atime ns)`` per file, and what it cleaned."""

    entries: list[tuple[ChunkKey, int, int]] = field(default_factory=list)
    tmp_removed: int = 0
    corrupt_removed: int = 0
    moved: int = 0


class ForeignRootError(Exception):
    """The root is a non-empty directory without the tier's marker: not ours to write or clean."""

    def __init__(self, root: Path, names: list[str]) -> None:
        super().__init__(root, names)
        self.root, self.names = root, names


class RootGoneError(FileNotFoundError):
    """The root (or its marker) vanished while the tier was open: deleted, or unmounted."""


def claim_root(root: Path) -> bool:
    """Create or adopt ``root``; ``False`` when it is the tier's but on a read-only filesystem.

    A new or empty directory gets the marker; a directory holding the marker is the tier's own;
    anything else raises :class:`ForeignRootError`. Proves a file can be created in the root
    (raises OSError, except EROFS on a root that holds the marker).
    """
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, MARKER)
    ours = os.path.isfile(marker)
    if not ours:
        with os.scandir(root) as it:  # another opener's probe or marker temp file is not foreign
            names = sorted(e.name for e in it if not _TOP_TMP_RE.fullmatch(e.name))
        if names:
            raise ForeignRootError(root, names)
    try:
        _write_new(os.path.join(root, f".probe{TMP_MARK}{os.urandom(6).hex()}"), b"lmtier", keep=False)
    except OSError as exc:
        if ours and exc.errno == errno.EROFS:
            return False
        raise
    if not ours:
        tmp = os.path.join(root, f"{MARKER}{TMP_MARK}{os.urandom(6).hex()}")
        _write_new(tmp, _MARKER_TEXT, keep=True)
        os.replace(tmp, marker)
    return True


def check_root(root: Path) -> None:
    """Raise :class:`RootGoneError` unless the root still holds its marker (OSError if unreadable)."""
    if not os.path.isfile(os.path.join(root, MARKER)):
        raise RootGoneError(errno.ENOENT, "the tier's root or its marker file is gone", os.fspath(root))


def scan(layout: Layout, *, clean: bool = True) -> ScanResult:
    """Index every stored file under the root; with ``clean``, delete stale temp files and
    headerless files, and move files found at another fan-out depth than ``layout`` wants (the
    option changed) to their place. Without ``clean`` (a read-only root) such files are skipped.
    Names the tier does not create are left alone.
    """
    result = ScanResult()
    with os.scandir(layout.root) as top:
        for entry in top:
            if entry.is_dir(follow_symlinks=False) and _NS_RE.fullmatch(entry.name):
                _scan_dir(layout, entry.path, entry.name, 0, result, clean)
            elif clean and entry.is_file(follow_symlinks=False) and _TOP_TMP_RE.fullmatch(entry.name):
                _unlink_quietly(entry.path)
                result.tmp_removed += 1
    return result


def _scan_dir(layout: Layout, path: str, namespace: str, depth: int, result: ScanResult, clean: bool) -> None:
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if depth < 4 and _FAN_RE.fullmatch(entry.name):
                _scan_dir(layout, entry.path, namespace, depth + 1, result, clean)
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        if _TMP_RE.fullmatch(entry.name):
            if clean:
                _unlink_quietly(entry.path)
                result.tmp_removed += 1
            continue
        try:
            key = ChunkKey.parse(entry.name)
        except InvalidArgumentError:
            continue
        if key.namespace != namespace:
            continue
        st = entry.stat(follow_symlinks=False)
        want = layout.path_of(key)
        if st.st_size < HEADER_BYTES or entry.path != want:
            if not clean:
                continue
            if st.st_size < HEADER_BYTES:
                _unlink_quietly(entry.path)
                result.corrupt_removed += 1
                continue
            os.makedirs(os.path.dirname(want), exist_ok=True)
            os.replace(entry.path, want)
            result.moved += 1
        result.entries.append((key, st.st_size, st.st_atime_ns))


def write_file(layout: Layout, key: ChunkKey, payload: memoryview, *, fsync: bool, stamp: int) -> int:
    """Atomically store ``header ‖ payload`` for ``key``; return the file's size in bytes."""
    header = encode_header(key, payload)
    directory = layout.dir_of(key)
    final = os.path.join(directory, str(key))
    tmp = f"{final}{TMP_MARK}{os.urandom(6).hex()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:  # first file of this fan-out directory, or the root is gone
        check_root(layout.root)  # never recreate a deleted or unmounted root: it is no longer ours
        os.makedirs(directory, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        try:
            _write_all(fd, header, payload)
            os.utime(fd, ns=(stamp, stamp))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if fsync:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return HEADER_BYTES + payload.nbytes


def read_file(path: str, key: ChunkKey, stamp: int, buffers: BufferRecycler) -> memoryview:
    """The validated payload of ``key``'s file, as a read-only view of a private buffer.

    Raises FileNotFoundError for a miss and CorruptDataError (after unlinking) for a bad file.
    """
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        st = os.fstat(fd)
        length, csum = _read_header(fd, path, key, st)
        out = buffers.take(length)
        try:
            view = out.data
            _read_payload(fd, path, key, view, csum)
            view.release()
        except BaseException:
            buffers.give_back(out)
            raise
        _stamp_quietly(fd, stamp, st)
    finally:
        os.close(fd)
    return buffers.lend(out)


def read_file_into(path: str, key: ChunkKey, out: memoryview, stamp: int) -> bool:
    """Fill ``out`` with ``key``'s payload; ``False`` (file kept) if the sizes differ.

    Raises FileNotFoundError for a miss and CorruptDataError (after unlinking) for a bad file.
    """
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        st = os.fstat(fd)
        length, csum = _read_header(fd, path, key, st)
        if length != out.nbytes:
            return False
        _read_payload(fd, path, key, out, csum)
        _stamp_quietly(fd, stamp, st)
        return True
    finally:
        os.close(fd)


def evict_file(path: str, key: ChunkKey, want_payload: bool) -> memoryview | None:
    """Remove ``key``'s file; with ``want_payload``, first map and validate it and return its payload.

    The returned view is backed by a private read-only mapping of the (now unlinked) file: it stays
    valid for as long as it, or a view derived from it, is referenced, and the kernel frees the
    blocks when the last reference dies.
    """
    if not want_payload:
        _unlink_quietly(path)
        return None
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_size < HEADER_BYTES:
            _discard(path, st)
            raise CorruptDataError(f"{key}: file is {st.st_size} bytes, shorter than its header")
        mapped = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    try:
        payload = decode(key, mapped)
    except CorruptDataError:
        _discard(path, st)
        raise
    _discard(path, st)
    return payload


def remove_file(path: str) -> None:
    """Unlink ``path``; an absent file is fine."""
    _unlink_quietly(path)


# -- machinery -------------------------------------------------------------------------------------
def _write_new(path: str, data: bytes, *, keep: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
        if not keep:
            os.unlink(path)


def _stamp_quietly(fd: int, stamp: int, st: os.stat_result) -> None:
    """Record a read's recency on the file for the next open's LRU order, if the filesystem lets
    us: a read-only remount (EROFS) or a file owned by another user (EPERM) must not fail a read
    whose bytes are fine. The order that counts while the tier is open lives in memory."""
    with contextlib.suppress(OSError):
        os.utime(fd, ns=(stamp, st.st_mtime_ns))


def _write_all(fd: int, header: bytes, payload: memoryview) -> None:
    buffers: list[bytes | memoryview] = [header, payload] if payload.nbytes else [header]
    while buffers:
        written = os.writev(fd, buffers)
        # a short write (signals, >2 GiB) leaves a tail: drop what went out and retry the rest
        while buffers and written >= len(buffers[0]):
            written -= len(buffers[0])
            buffers.pop(0)
        if buffers and written:
            buffers[0] = memoryview(buffers[0])[written:]


def _read_header(fd: int, path: str, key: ChunkKey, st: os.stat_result) -> tuple[int, int]:
    try:
        if st.st_size < HEADER_BYTES:
            raise CorruptDataError(f"{key}: file is {st.st_size} bytes, shorter than its header")
        header = decode_header(key, os.pread(fd, HEADER_BYTES, 0))
        length, csum = header.payload_length, header.checksum
        if st.st_size != HEADER_BYTES + length:
            raise CorruptDataError(
                f"{key}: file is {st.st_size} bytes, header says {HEADER_BYTES + length} (truncated?)"
            )
    except CorruptDataError:
        _discard(path, st)
        raise
    return length, csum


def _read_payload(fd: int, path: str, key: ChunkKey, out: memoryview, csum: int) -> None:
    hasher = xxhash.xxh3_64()  # streaming digest == codec.checksum of the whole payload
    pos, n = 0, out.nbytes
    while pos < n:
        got = os.preadv(fd, [out[pos : pos + PIECE_BYTES]], HEADER_BYTES + pos)
        if got == 0:
            _discard(path, os.fstat(fd))
            raise CorruptDataError(f"{key}: file ended after {pos} of {n} payload bytes")
        hasher.update(out[pos : pos + got])
        pos += got
    if hasher.intdigest() != csum:
        _discard(path, os.fstat(fd))
        raise CorruptDataError(f"{key}: checksum mismatch")


def _discard(path: str, st: os.stat_result) -> None:
    """Unlink ``path`` only if it is still the file we examined (a concurrent put may have
    replaced it with a good one in the meantime)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return
    if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
        _unlink_quietly(path)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
