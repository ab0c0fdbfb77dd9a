"""Blocking file operations of the disk tier; each runs on one of the tier's worker threads.

Every stored file is ``header (64 bytes, lmtier.framing) ‖ payload`` at
:meth:`lmtier.kit.FileLayout.path_of`. Writes go to ``<final>.tmp-<random>`` in the same directory
and are published by ``os.replace`` (atomic on POSIX), so a reader sees the old file, the new one,
or none: never a partial one. Recency lives
in the backend's memory; it is also stamped on each file's atime (ns resolution, monotonic stamps
from the backend) so the LRU order survives a restart even on ``noatime`` / ``relatime`` mounts.
A read stamps only on a best-effort basis: reads never depend on being able to write.

The root is the tier's own (:func:`lmtier.kit.claim_root`: a marker file written at the first
open; a non-empty directory without one is refused), and its scan at open
(:func:`lmtier.kit.scan_files`) deletes only names a tier creates, matched exactly. Both are shared
with the nixl tier's posix plugin, so either tier opens a root the other wrote.

Functions raise ``OSError`` (mapped by the caller in one place) and
:class:`~lmtier.errors.CorruptDataError`; a corrupt file is unlinked here before raising.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import TYPE_CHECKING

from lmtier.errors import CorruptDataError
from lmtier.framing import CODEC_NONE, HEADER_BYTES, READABLE_CODECS, Header, checksum_stream, decode_header
from lmtier.keys import ChunkKey
from lmtier.kit import (
    MARKER,
    FileLayout,
    Payload,
    StoreItem,
    check_stored,
    create_temp_file,
    stored_value,
)

if TYPE_CHECKING:

    from lmtier_backends.disk._buffers import BufferRecycler

__all__ = ["MARKER", "evict_file", "read_file", "read_file_into", "write_file"]

#: Payload bytes read per syscall. The checksum of each piece is computed while the kernel's
#: readahead is already fetching the next one, so hashing hides behind the device.
PIECE_BYTES = 4 << 20
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_file(layout: FileLayout, item: StoreItem, *, fsync: bool, stamp: int) -> int:
    """Atomically store ``header ‖ payload`` for ``item``; return the file's size in bytes.

    The header's checksum is the one the item carries, or computed here and left on the item for
    the next tier it goes to."""
    key, payload = item.key, item.view
    header = item.header()
    directory = layout.dir_of(key)
    final = os.path.join(directory, str(key))
    tmp = FileLayout.temp_path(final)
    fd = create_temp_file(tmp, layout.root)  # never recreates a deleted or unmounted root
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


def read_file(path: str, key: ChunkKey, stamp: int, buffers: BufferRecycler) -> object:
    """The validated payload of ``key``'s file, as a read-only view of a private buffer (a
    :class:`~lmtier.kit.Payload` with its codec facts if it is encoded: :func:`lmtier.kit.stored_value`).

    Raises FileNotFoundError for a miss and CorruptDataError (after unlinking) for a bad file.
    """
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        st = os.fstat(fd)
        header, head = _read_header(fd, path, key, st)
        out = buffers.take(head.payload_length)
        try:
            view = out.data
            _read_payload(fd, path, key, view, header)
            view.release()
        except BaseException:
            buffers.give_back(out)
            raise
        _stamp_quietly(fd, stamp, st)
    finally:
        os.close(fd)
    return stored_value(buffers.lend(out), head)


def read_file_into(path: str, key: ChunkKey, out: memoryview, stamp: int) -> bool:
    """Fill ``out`` with ``key``'s payload; ``False`` (file kept) if the sizes differ.

    Raises FileNotFoundError for a miss and CorruptDataError (after unlinking) for a bad file.
    """
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        st = os.fstat(fd)
        header, head = _read_header(fd, path, key, st)
        if head.payload_length != out.nbytes or head.codec != CODEC_NONE:  # an encoded value: get serves it
            return False
        _read_payload(fd, path, key, out, header)
        _stamp_quietly(fd, stamp, st)
        return True
    finally:
        os.close(fd)


def evict_file(path: str, key: ChunkKey, want_payload: bool) -> Payload | None:
    """Remove ``key``'s file; with ``want_payload``, first map and validate it and return its payload.

    The returned :class:`~lmtier.kit.Payload` (carrying the checksum just verified, so the tier it
    is demoted to need not hash it again) is backed by a private read-only mapping of the (now
    unlinked) file: it stays valid for as long as it, or a view derived from it, is referenced, and
    the kernel frees the blocks when the last reference dies.
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
        whole = memoryview(mapped)
        payload = whole[HEADER_BYTES:]
        head = check_stored(key, whole[:HEADER_BYTES], payload, codecs=READABLE_CODECS)
    finally:  # evicted whatever it holds: a corrupt or newer-format file goes too (its bytes counted)
        _discard(path, st)
    return Payload.of(payload, checksum=head.checksum, codec=head.codec, raw_length=head.raw_length)




# -- machinery -------------------------------------------------------------------------------------
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


def _read_header(fd: int, path: str, key: ChunkKey, st: os.stat_result) -> tuple[bytes, Header]:
    """The file's header bytes, decoded; the file's size must be what the header announces."""
    try:
        if st.st_size < HEADER_BYTES:
            raise CorruptDataError(f"{key}: file is {st.st_size} bytes, shorter than its header")
        header = os.pread(fd, HEADER_BYTES, 0)
        head = decode_header(key, header, codecs=READABLE_CODECS)
        if st.st_size != HEADER_BYTES + head.payload_length:
            raise CorruptDataError(
                f"{key}: file is {st.st_size} bytes, header says {HEADER_BYTES + head.payload_length} (truncated?)"
            )
    except CorruptDataError:
        _discard(path, st)
        raise
    return header, head


def _read_payload(fd: int, path: str, key: ChunkKey, out: memoryview, header: bytes) -> None:
    """Fill ``out`` with the payload, hashing each piece as it lands (the kernel reads ahead
    meanwhile), then validate it with the header (:func:`lmtier.kit.check_stored`)."""
    hasher = checksum_stream()
    pos, n = 0, out.nbytes
    while pos < n:
        got = os.preadv(fd, [out[pos : pos + PIECE_BYTES]], HEADER_BYTES + pos)
        if got == 0:
            _discard(path, os.fstat(fd))
            raise CorruptDataError(f"{key}: file ended after {pos} of {n} payload bytes")
        hasher.update(out[pos : pos + got])
        pos += got
    try:
        check_stored(key, header, out, payload_checksum=hasher.intdigest(), codecs=READABLE_CODECS)
    except CorruptDataError:
        _discard(path, os.fstat(fd))
        raise


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
