"""Blocking file operations of the disk tier; each runs on one of the tier's worker threads.

Every stored file is ``codec header (64 bytes) ‖ payload`` at ``Layout.path_of(key)``. Writes go
to ``<final>.tmp-<random>`` in the same directory and are published by ``os.replace`` (atomic on
POSIX), so a reader sees the old file, the new one, or none: never a partial one. Recency lives
in the file's atime, which this module sets explicitly (ns resolution, monotonic stamps from the
backend) so the LRU order survives a restart even on ``noatime`` / ``relatime`` mounts.

Functions raise ``OSError`` (mapped by the caller in one place) and
:class:`~lmtier.errors.CorruptDataError`; a corrupt file is unlinked here before raising.
"""

from __future__ import annotations

import contextlib
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
    "Layout",
    "ScanResult",
    "evict_file",
    "probe_root",
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
_NS_RE = re.compile(r"^[0-9a-f]{16}$")
_FAN_RE = re.compile(r"^[0-9a-f]{2}$")
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


def probe_root(root: Path) -> None:
    """Create ``root`` and prove a file can be created and removed in it (raises OSError)."""
    os.makedirs(root, exist_ok=True)
    probe = os.path.join(root, f".probe{TMP_MARK}{os.urandom(6).hex()}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
    try:
        os.write(fd, b"lmtier")
    finally:
        os.close(fd)
        os.unlink(probe)


def scan(layout: Layout) -> ScanResult:
    """Index every stored file under the root; delete stale temp files and headerless files.

    Files found at another fan-out depth than ``layout`` wants (the option changed) are moved to
    their place. Names that are neither keys nor temp files are left alone.
    """
    result = ScanResult()
    with os.scandir(layout.root) as top:
        for entry in top:
            if entry.is_dir(follow_symlinks=False) and _NS_RE.match(entry.name):
                _scan_dir(layout, entry.path, entry.name, 0, result)
            elif entry.is_file(follow_symlinks=False) and TMP_MARK in entry.name:
                _unlink_quietly(entry.path)
                result.tmp_removed += 1
    return result


def _scan_dir(layout: Layout, path: str, namespace: str, depth: int, result: ScanResult) -> None:
    with os.scandir(path) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if depth < 4 and _FAN_RE.match(entry.name):
                _scan_dir(layout, entry.path, namespace, depth + 1, result)
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        if TMP_MARK in entry.name:
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
        if st.st_size < HEADER_BYTES:
            _unlink_quietly(entry.path)
            result.corrupt_removed += 1
            continue
        want = layout.path_of(key)
        if entry.path != want:
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
    except FileNotFoundError:  # first file of this fan-out directory (or the root was wiped)
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
        os.utime(fd, ns=(stamp, st.st_mtime_ns))
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
        os.utime(fd, ns=(stamp, st.st_mtime_ns))
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
        length, csum = decode_header(key, os.pread(fd, HEADER_BYTES, 0))
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
