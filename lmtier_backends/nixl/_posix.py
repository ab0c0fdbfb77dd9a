"""Chunks as files, moved by NIXL's POSIX plugin between staging memory and FILE_SEG descriptors.

Layout: :class:`lmtier.kit.FileLayout`, the ``disk`` tier's (``root/<namespace>/<d0d1>/<d2d3>/
<str(key)>`` at the default ``fan_out`` of 2), each file the :mod:`lmtier.framing` header
followed by the payload, so either tier reads the other's files. A put writes a temp file
(``<final>.tmp-<random>``) beside the final name through NIXL and publishes it with an atomic
rename, so readers see the old file, the new one, or none. A reader's open fd keeps the file it
opened even if it is replaced meanwhile.

The index (key -> file size, oldest first) is rebuilt at open by :func:`lmtier.kit.scan_files`
(stale temp files of a crashed writer are deleted; files of an older layout, such as this
plugin's one-level fan-out before version 2 of the header, are moved into place) and bounds the
tier at ``max_bytes``. :meth:`PosixStore.usable` reads each file's header, not the index, so files
written by another process count, and damaged or newer-format ones do not.

All methods block; the tier calls them on worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmtier.errors import CapacityError, ConfigError, CorruptDataError
from lmtier.framing import HEADER_BYTES, READABLE_CODECS, NewerFormatError, decode_header
from lmtier.keys import ChunkKey
from lmtier.kit import (
    FileLayout,
    ForeignRootError,
    claim_root,
    create_temp_file,
    describe,
    remove_stored_file,
    scan_files,
)
from lmtier.memory import HostBuffer, release_all
from lmtier_backends.nixl._staging import StagingPool
from lmtier_backends.nixl._xfer import CallerBuffer, Outcome, move_registered, outs_registered
from lmtier_backends.nixl.config import PosixOptions

__all__ = ["PosixStore"]

log = logging.getLogger(__name__)
PLUGIN = "POSIX"


class PosixStore:
    """The file side of the ``posix`` flavour of the nixl tier."""

    plugin = PLUGIN

    def __init__(self, agent: Any, peer: str, options: PosixOptions, staging: StagingPool, *,
                 timeout_s: float) -> None:
        self._agent = agent
        self._peer = peer
        self._opts = options
        self._staging = staging
        self._timeout_s = timeout_s
        self.root = options.root
        self._layout = FileLayout(options.root, options.fan_out)
        self._index: OrderedDict[ChunkKey, int] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0
        try:
            claim_root(self.root)  # the disk tier's marker: a root either tier made is the other's too
        except ForeignRootError as exc:
            raise ConfigError(f"nixl tier: posix.root: {exc}") from None
        except OSError as exc:
            raise ConfigError(
                f"nixl tier: posix.root {os.fspath(self.root)!r} is not a writable directory "
                f"({describe(exc)}); set it to a directory this process can create and write"
            ) from None
        self._rebuild_index()

    @property
    def max_bytes(self) -> int | None:
        return None if self._opts.max_bytes is None else int(self._opts.max_bytes)

    def path(self, key: ChunkKey) -> Path:
        return Path(self._layout.path_of(key))

    # -- queries ---------------------------------------------------------------------------------
    def usable(self, keys: Sequence[ChunkKey]) -> list[bool | OSError]:
        """Whether each key's file holds a header this reader accepts (64 bytes read per key); the
        ``OSError`` of a file that cannot be read (the tier settles it: :class:`lmtier.kit.KeyFaults`)."""
        out: list[bool | OSError] = []
        for key in keys:
            try:
                fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                out.append(False)
                continue
            except OSError as exc:
                out.append(exc)
                continue
            try:
                decode_header(key, os.pread(fd, HEADER_BYTES, 0), codecs=READABLE_CODECS)
                out.append(True)
            except (CorruptDataError, NewerFormatError):
                out.append(False)
            except OSError as exc:
                out.append(exc)
            finally:
                os.close(fd)
        return out

    def read(self, keys: Sequence[ChunkKey]) -> list[HostBuffer | bytes | BaseException | None]:
        """Each file's bytes in a staging buffer; ``None`` if absent; ``bytes`` if too short to hold
        a header (the caller's decode rejects it); the exception of a file that could not be read
        (a fault of that key alone, settled by the tier: :class:`lmtier.kit.KeyFaults`)."""
        out: list[HostBuffer | bytes | BaseException | None] = [None] * len(keys)
        fds: list[int] = []
        todo: list[tuple[int, int, int]] = []  # (index, fd, size)
        try:
            for i, key in enumerate(keys):
                opened = self._open(key, out, i, fds)
                if opened is None:
                    continue
                fd, size = opened
                out[i] = self._staging.allocate(size)
                todo.append((i, fd, size))
            if todo:
                outcome = self._transfer("READ", [(_addr(out[i]), size, fd, 0, _buf(out[i])) for i, fd, size in todo])
                for j, error in enumerate(outcome.errors):
                    if error is not None:
                        i = todo[j][0]
                        buf, out[i] = out[i], error
                        if isinstance(buf, HostBuffer):
                            buf.release()
            with self._lock:
                for key, got in zip(keys, out, strict=True):
                    if isinstance(got, (HostBuffer, bytes)) and key in self._index:
                        self._index.move_to_end(key)
            return out
        except BaseException:
            release_all(out, shared=True)
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def read_into(self, keys: Sequence[ChunkKey], outs: Sequence[CallerBuffer]
                  ) -> list[HostBuffer | bytes | BaseException | None]:
        """Read each file's payload straight into ``outs[i]`` and its header into a 64-byte staging
        buffer (returned). ``None``: absent, or the file's size does not match ``outs[i]``;
        ``bytes``: too short for a header; an exception: the file could not be read (as in
        :meth:`read`). Caller memory is registered for the call and never abandoned: this returns
        only once NIXL is done writing it."""
        out: list[HostBuffer | bytes | BaseException | None] = [None] * len(keys)
        fds: list[int] = []
        todo: list[tuple[int, int]] = []  # (index, fd)
        try:
            for i, key in enumerate(keys):
                opened = self._open(key, out, i, fds)
                if opened is None:
                    continue
                fd, size = opened
                if size == HEADER_BYTES + outs[i].nbytes:
                    out[i] = self._staging.allocate(HEADER_BYTES)
                    todo.append((i, fd))
            if todo:
                jobs: list[tuple[int, int, int, int, HostBuffer | None]] = []
                owners: list[int] = []  # owners[j]: the todo entry job j belongs to
                for t, (i, fd) in enumerate(todo):
                    jobs.append((_addr(out[i]), HEADER_BYTES, fd, 0, _buf(out[i])))
                    if outs[i].nbytes:
                        jobs.append((outs[i].address, outs[i].nbytes, fd, HEADER_BYTES, None))
                    owners.extend([t] * (len(jobs) - len(owners)))
                with outs_registered(self._agent, PLUGIN, [outs[i] for i, _ in todo]):
                    outcome = self._transfer("READ", jobs, timeout_s=math.inf)
                failed: dict[int, BaseException] = {}
                for j, error in enumerate(outcome.errors):
                    if error is not None:
                        failed.setdefault(owners[j], error)
                for t, error in failed.items():
                    i = todo[t][0]
                    buf, out[i] = out[i], error
                    if isinstance(buf, HostBuffer):
                        buf.release()
            return out
        except BaseException:
            release_all(out, shared=True)
            raise
        finally:
            for fd in fds:
                os.close(fd)

    # -- updates ---------------------------------------------------------------------------------
    def write(self, items: Sequence[tuple[ChunkKey, HostBuffer, CallerBuffer | None]]) -> None:
        """Publish each item as its key's file: the staging buffer's bytes, then - when given - the
        caller's payload, which NIXL reads in place (registered for the call, never abandoned).
        Raises after publishing the others if some failed."""
        opened: list[tuple[ChunkKey, int, int, Path]] = []  # (key, file size, fd, temp path)
        jobs: list[tuple[int, int, int, int, HostBuffer | None]] = []
        owners: list[int] = []
        try:
            for key, buf, payload in items:
                final = self.path(key)
                tmp = Path(FileLayout.temp_path(os.fspath(final)))
                fd = create_temp_file(tmp, self.root)  # never recreates an unmounted or deleted root
                size = buf.nbytes + (payload.nbytes if payload is not None else 0)
                opened.append((key, size, fd, tmp))
                jobs.append((buf.data_ptr, buf.nbytes, fd, 0, buf))
                if payload is not None and payload.nbytes:
                    jobs.append((payload.address, payload.nbytes, fd, buf.nbytes, None))
                owners.extend([len(opened) - 1] * (len(jobs) - len(owners)))
            callers = [p for _, _, p in items if p is not None]
            with outs_registered(self._agent, PLUGIN, callers):
                outcome = self._transfer("WRITE", jobs, timeout_s=math.inf if callers else None)
            errors: list[BaseException | None] = [None] * len(opened)
            for j, error in enumerate(outcome.errors):
                if error is not None and errors[owners[j]] is None:
                    errors[owners[j]] = error
            first: BaseException | None = None
            for (key, size, fd, tmp), error in zip(opened, errors, strict=True):
                if error is None:
                    try:
                        if self._opts.fsync:
                            os.fsync(fd)
                        os.replace(tmp, self.path(key))
                    except OSError as exc:
                        error = exc
                    else:
                        self._indexed(key, size)
                        continue
                first = first or self._write_error(error, size)
            if first is not None:
                raise first
        finally:
            for _, _, fd, tmp in opened:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        self._evict()

    def remove(self, keys: Sequence[ChunkKey]) -> None:
        """Unlink each key's file; an absent one is fine, unless the index holds it and the root
        itself is gone (unmounted): nothing was deleted, and RootGoneError says so."""
        for key in keys:
            with self._lock:
                indexed = key in self._index
            remove_stored_file(self.path(key), self.root if indexed else None)
            self._forget(key)

    def close(self) -> None:
        """Nothing to release: the files are the tier's persistent state."""

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"objects": len(self._index), "bytes": self._bytes, "evictions": self.evictions}

    # -- machinery -------------------------------------------------------------------------------
    def _open(self, key: ChunkKey, out: list[Any], i: int, fds: list[int]) -> tuple[int, int] | None:
        """``key``'s file opened for reading (its fd added to ``fds``) and its size, or None with
        ``out[i]`` set: absent (None, a miss), too short for a header (its bytes, which the tier
        refuses), or not readable (the error: a fault of that key)."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            out[i] = exc
            return None
        fds.append(fd)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                out[i] = os.pread(fd, size, 0)
                return None
        except OSError as exc:
            out[i] = exc
            return None
        return fd, size

    def _transfer(self, op: str, jobs: Sequence[tuple[int, int, int, int, HostBuffer | None]], *,
                  timeout_s: float | None = None) -> Outcome:
        """Move each ``(address, nbytes, fd, file offset, staging buffer or None)`` job as its own
        request, the fds registered as FILE_SEG meanwhile. Staging buffers of abandoned requests
        are quarantined; jobs on caller memory pass ``timeout_s=inf`` (never abandoned)."""
        fds = list(dict.fromkeys(fd for _, _, fd, _, _ in jobs))
        return move_registered(
            self._agent, op, PLUGIN, "FILE", [(0, 0, fd, "") for fd in fds],
            [(addr, n, off, fd, buf) for addr, n, fd, off, buf in jobs],
            peer=self._peer, timeout_s=self._timeout_s if timeout_s is None else timeout_s, staging=self._staging)

    def _write_error(self, error: BaseException, nbytes: int) -> BaseException:
        # NIXL only says a write failed; a full filesystem is the likely cause worth naming.
        try:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize < nbytes:
                return CapacityError(f"nixl tier: the filesystem of {os.fspath(self.root)} is full")
        except OSError:
            pass
        return error

    def _indexed(self, key: ChunkKey, size: int) -> None:
        with self._lock:
            old = self._index.pop(key, None)
            self._bytes += size - (old or 0)
            self._index[key] = size

    def _forget(self, key: ChunkKey) -> None:
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._bytes -= old

    def _evict(self) -> None:
        limit = self.max_bytes
        if limit is None:
            return
        while True:
            with self._lock:
                if self._bytes <= limit or not self._index:
                    return
                key, size = self._index.popitem(last=False)
                self._bytes -= size
                self.evictions += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(key))

    def _rebuild_index(self) -> None:
        found = scan_files(self._layout)
        found.entries.sort(key=lambda e: e[2])  # least recently used first
        with self._lock:
            for key, size, _ in found.entries:
                self._index[key] = size
                self._bytes += size
        if found.moved:
            log.info("nixl posix: moved %d files of another layout into place under %s", found.moved, self.root)
        self._evict()


def _addr(buf: object) -> int:
    assert isinstance(buf, HostBuffer)
    return buf.data_ptr


def _buf(buf: object) -> HostBuffer:
    assert isinstance(buf, HostBuffer)
    return buf
