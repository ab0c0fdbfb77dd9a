"""The ``disk`` tier: one checksummed file per chunk on a local filesystem, byte-bounded LRU.

Layout: :class:`lmtier.kit.FileLayout`, ``root/<namespace>/<d0d1>/<d2d3>/<str(key)>`` (``fan_out``
levels of two digest hex characters), each file ``header ‖ payload`` (:mod:`lmtier.framing`); the
nixl tier's posix plugin shares it, root marker included, so either tier opens what the other
wrote. Puts write a temp file in the same directory and publish it with an atomic rename; reads
validate header and checksum, and a file that fails is a miss: deleted and counted
(``stats()["corrupt"]``). A file of a newer format is a miss left on disk
(``stats()["newer_format"]``) and never counted by ``contains``: the scan at open reads each
file's header (64 bytes) and marks such files, and a ``get`` that meets one marks it too.

The index (key -> file size, in LRU order) lives in this process: it is rebuilt at open by
scanning the root (recency comes from atimes the tier sets itself; stale temp files of a crashed
writer are deleted), so the tier survives restarts (``persistent``). It is not shared: one
process owns a root at a time. All file I/O runs on a :class:`lmtier.kit.WorkerPool` of
``max_concurrency`` threads (a cancelled call returns once its running file operations are done:
they read or fill caller buffers); the index is touched only on the event loop, so it needs no
lock.

Faults, key by key: a file that cannot be read (EIO from a bad sector, a directory where the file
should be) is a miss for that key only, counted in ``stats()["read_errors"]``, and after
:data:`MAX_READ_FAILURES` failures in a row it leaves the index; the other keys of the batch are
served. Only a tier-wide failure (the root or its marker gone: deleted, unmounted) raises
:class:`BackendUnavailableError`, and nothing is written into a root that lost its marker (a bare
mount point); once a call has found the root gone, ``contains`` checks the marker (off the loop)
instead of answering from the index, until the root is back. A read-only filesystem
serves reads and skips writes. A full filesystem (ENOSPC) evicts least recently used files and
retries the write once.

Concurrent operations on the *same* key are unordered (as the protocol allows): the worst a race
can do is turn a later ``get`` into a miss; the key inside every header makes a wrong value
impossible.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtier.errors import BackendError, BackendUnavailableError, CorruptDataError, LmtierError
from lmtier.framing import HEADER_BYTES, READABLE_CODECS, NewerFormatError
from lmtier.keys import ChunkKey
from lmtier.kit import (
    AsyncClosing,
    CancelToken,
    FileLayout,
    ForeignRootError,
    Rejections,
    RootGoneError,
    StoreItem,
    WorkerPool,
    check_root,
    claim_root,
    into_views,
    put_items,
    remove_stored_file,
    scan_files,
)
from lmtier.protocol import Buffer, Capabilities
from lmtier_backends.disk import _files
from lmtier_backends.disk._buffers import BufferRecycler
from lmtier_backends.disk._errors import foreign_root_error, map_os_error, root_config_error

if TYPE_CHECKING:

    from lmtier_backends.disk.config import DiskConfig

__all__ = ["DiskBackend", "EvictionListener", "open_disk_backend"]

log = logging.getLogger(__name__)
#: Failed reads in a row after which a key leaves the index (its file stays for the next open).
MAX_READ_FAILURES = 3
EvictionListener = Callable[[ChunkKey, memoryview], None]
#: ``(True, value)`` or ``(False, exception)`` of one file operation.
Outcome = tuple[bool, Any]
#: Bytes evicted beyond a failed write's size when the filesystem is full: block rounding and
#: the directory's own blocks mean freeing exactly the file's size may not be enough.
_FS_SLACK_BYTES = 64 << 10


async def open_disk_backend(config: DiskConfig) -> DiskBackend:
    """The registry's factory: check the root and scan it on a thread, off the event loop."""
    return await asyncio.to_thread(DiskBackend, config)


class _Entry:
    __slots__ = ("failures", "gen", "newer", "size")

    def __init__(self, size: int, gen: int, *, newer: bool = False) -> None:
        self.size = size
        self.gen = gen  # bumped by every put, so a late corrupt/missing report never drops a newer file
        self.failures = 0  # failed reads in a row
        # a newer lmtier's file: kept (its bytes count, it can be evicted) but never served or counted
        self.newer = newer


class DiskBackend(AsyncClosing):
    """Byte-bounded LRU store of one file per chunk under ``config.root``.

    Construction is blocking (it claims the root, then scans it); from async code use
    :func:`open_disk_backend`. A root that cannot be created or written, or a non-empty directory
    that is not a disk tier's root, raises :class:`~lmtier.errors.ConfigError` naming the path.
    A tier's root on a read-only filesystem opens read-only (reads served, writes skipped).
    """

    def __init__(self, config: DiskConfig) -> None:
        self.config = config
        self.root = Path(os.path.abspath(config.root))
        self.max_bytes = int(config.max_bytes)
        self._layout = FileLayout(self.root, config.fan_out)
        try:
            writable = claim_root(self.root)
        except ForeignRootError as exc:
            raise foreign_root_error(exc) from None
        except OSError as exc:
            raise root_config_error(exc, self.root) from None
        if not writable:
            log.warning("disk tier: root %s is on a read-only filesystem: serving reads, skipping writes",
                        self.root)
        try:
            found = scan_files(self._layout, clean=writable, read_headers=True, codecs=READABLE_CODECS)
        except OSError as exc:
            raise map_os_error(exc, op="scan of the root", path=self.root) from None
        found.entries.sort(key=lambda e: (e[2], str(e[0])))  # least recently used first
        self._index: OrderedDict[ChunkKey, _Entry] = OrderedDict(
            (key, _Entry(size, 0, newer=key in found.newer)) for key, size, _ in found.entries
        )
        self._used = sum(e.size for e in self._index.values())
        self._last_stamp = max((e[2] for e in found.entries), default=0)
        self._gen = 0
        self._short_removed = found.short_removed + found.corrupt_removed
        self._tmp_removed = found.temp_removed
        self._rejects = Rejections(f"disk tier {self.root}")
        if found.newer:  # never read (the index marks them), so counted here, once, as found
            self._rejects.newer = len(found.newer)
            log.warning("disk tier %s: %d file(s) of a newer format or codec this build cannot read: misses, "
                        "left on disk for newer readers (stats newer_format)", self.root, len(found.newer))
        self._evictions = 0
        self._read_errors = 0
        self._full_evictions = 0
        self._listeners: list[EvictionListener] = []
        self._closed = False
        # a call found the root gone (unmounted?): contains checks it, not the index, until it is back
        self._root_gone = False
        _warn_if_the_filesystem_is_smaller(self.root, self.max_bytes, self._used)
        # over budget at open (max_bytes was lowered): trim now, while nobody listens yet
        while writable and self._used > self.max_bytes and self._index:
            key, entry = self._index.popitem(last=False)
            self._used -= entry.size
            self._evictions += 1
            try:
                remove_stored_file(self._layout.path_of(key))
            except OSError as exc:
                raise map_os_error(exc, op="trim at open", path=self._layout.path_of(key)) from None
        self._buffers = BufferRecycler(int(config.get_buffer_bytes))
        self._workers = WorkerPool(config.max_concurrency, "disk")

    #: values keep their codec id and raw length (lmtier.protocol.SupportsCodecs)
    carries_codecs = True

    # -- the StorageBackend protocol -----------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=True, shared=False, evicts=True,
                            max_item_bytes=self.max_bytes - HEADER_BYTES)

    def path_of(self, key: ChunkKey) -> Path:
        """The file that holds (or would hold) ``key``."""
        return Path(self._layout.path_of(key))

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(key, payload)`` for each LRU eviction, in eviction order.

        ``payload`` is a read-only view of the validated payload, backed by a mapping of the
        already-unlinked file: keep it as long as needed (e.g. while demoting it to the next
        tier); the disk blocks are freed when the last reference dies. An evicted file that
        fails validation is counted as corrupt and not offered. Listeners run on the event loop
        and must not block; an exception in one is logged and does not fail the put.
        """
        self._listeners.append(listener)

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._check_open()
        if self._root_gone:  # the index speaks of files that may not be there: ask the root first
            ((ok, value),), _ = await self._run([partial(check_root, self.root)])
            if not ok:
                raise _as_lmtier_error(value, op="contains", path=self.root)
            self._root_gone = False
        index = self._index
        return [k in index and not index[k].newer for k in keys]

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        self._check_open()
        wanted = [k for k in dict.fromkeys(keys) if self._servable(k)]  # a key twice is read once
        gens = [self._index[k].gen for k in wanted]
        calls = [partial(_files.read_file, self._layout.path_of(k), k, self._stamp(), self._buffers)
                 for k in wanted]
        outcomes, cancelled = await self._run(calls)
        await self._check_root_after_failures(outcomes, cancelled)
        found: dict[ChunkKey, Buffer] = {}
        for key, gen, (ok, value) in zip(wanted, gens, outcomes, strict=True):
            if ok:
                found[key] = value
                self._touch(key, gen)
            else:
                self._settle_failure(key, gen, value)
        if cancelled:
            raise asyncio.CancelledError
        return [found.get(k) for k in keys]

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        """Fill ``outs[i]`` with ``keys[i]``'s payload straight from the file (no staging copy).

        ``outs[i]`` must be a writable C-contiguous buffer (``bytearray``, numpy array,
        :class:`~lmtier.memory.HostBuffer`, CPU torch tensor) of exactly the stored size; the
        checksum is verified on the filled buffer. ``False`` means a miss, a size mismatch or
        corrupt data (deleted and counted), and the buffer's content is then unspecified.
        """
        views = into_views(keys, outs)
        self._check_open()
        todo = [i for i, k in enumerate(keys) if self._servable(k)]
        gens = [self._index[keys[i]].gen for i in todo]
        calls = [partial(_files.read_file_into, self._layout.path_of(keys[i]), keys[i], views[i],
                         self._stamp()) for i in todo]
        outcomes, cancelled = await self._run(calls, caller_memory=True)
        await self._check_root_after_failures(outcomes, cancelled)
        filled = [False] * len(keys)
        for i, gen, (ok, value) in zip(todo, gens, outcomes, strict=True):
            if ok:
                filled[i] = bool(value)
                if value:
                    self._touch(keys[i], gen)
            else:
                self._settle_failure(keys[i], gen, value)
        if cancelled:
            raise asyncio.CancelledError
        return filled

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        # all checked first (max_bytes included); the last value of a key wins
        latest = {it.key: it for it in put_items(items, tier=f"disk tier {self.root} (max_bytes)",
                                                  max_item_bytes=self.max_bytes - HEADER_BYTES)}
        self._check_open()
        outcomes, cancelled = await self._write(latest)
        full = {k: latest[k] for k, (ok, value) in outcomes.items() if not ok and _is_full(value)}
        if full and not cancelled:
            # the filesystem filled before max_bytes did (it is smaller, or shared): make room by
            # evicting least recently used files, then retry those writes once
            need = sum(HEADER_BYTES + it.nbytes + _FS_SLACK_BYTES for it in full.values())
            victims, freed = self._least_recent(need, keep=latest.keys())
            await self._evict(victims)
            self._full_evictions += 1
            log.warning("disk tier: the filesystem of %s is full with %d bytes stored (max_bytes=%d); "
                        "evicted %d bytes of least recently used files and retrying %d write(s)",
                        self.root, self._used, self.max_bytes, freed, len(full))
            retried, cancelled = await self._write(full)
            outcomes.update(retried)
        self._note_root_gone(value for ok, value in outcomes.values() if not ok)
        errors = [_as_lmtier_error(value, op="write", path=self._layout.path_of(k))
                  for k, (ok, value) in outcomes.items() if not ok]
        if not cancelled:
            await self._evict(self._least_recent(self._used - self.max_bytes)[0])  # after the
            # writes: a failed put never costs an entry
        _raise_first(cancelled, errors)

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check_open()
        unique = list(dict.fromkeys(keys))
        indexed = set()
        for key in unique:
            entry = self._index.pop(key, None)
            if entry is not None:
                self._used -= entry.size
                indexed.add(key)
        # an indexed file found absent makes remove_stored_file check the root: a delete on an unmounted
        # root deletes nothing and must say so
        outcomes, cancelled = await self._run(
            [partial(remove_stored_file, self._layout.path_of(k), self.root if k in indexed else None)
             for k in unique])
        self._note_root_gone(v for ok, v in outcomes if not ok)
        errors = [_as_lmtier_error(v, op="delete", path=self._layout.path_of(k))
                  for k, (ok, v) in zip(unique, outcomes, strict=True) if not ok]
        _raise_first(cancelled, errors)

    async def clear(self, namespaces: Collection[str] | None = None) -> int:
        """Delete every file of the tier, or those of ``namespaces``
        (:class:`~lmtier.protocol.SupportsClear`): the index names them, so only files the tier
        wrote (newer-format ones included) are removed. Returns how many."""
        self._check_open()
        wanted = None if namespaces is None else set(namespaces)
        victims = [k for k in self._index if wanted is None or k.namespace in wanted]
        await self.delete(victims)
        return len(victims)

    def stats(self) -> dict[str, Any]:
        return {"objects": len(self._index), "bytes": self._used, "capacity_bytes": self.max_bytes,
                "evictions": self._evictions, "corrupt": self._rejects.corrupt + self._short_removed,
                "newer_format": self._rejects.newer, "read_errors": self._read_errors,
                "full_filesystem_evictions": self._full_evictions,
                "stale_tmp_removed": self._tmp_removed, "idle_get_buffer_bytes": self._buffers.idle_bytes}

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listeners.clear()
        # wait for writes in flight, so a handle opened next on this root sees finished files only
        await self._workers.aclose()
        self._buffers.close()


    # -- machinery -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailableError(f"disk tier at {self.root} is closed")

    def _stamp(self) -> int:
        """A recency stamp (ns since the epoch), strictly increasing within this process."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _servable(self, key: ChunkKey) -> bool:
        entry = self._index.get(key)
        return entry is not None and not entry.newer

    def _touch(self, key: ChunkKey, gen: int) -> None:
        entry = self._index.get(key)
        if entry is not None and entry.gen == gen:
            entry.failures = 0
            self._index.move_to_end(key)

    def _drop(self, key: ChunkKey, gen: int) -> None:
        entry = self._index.get(key)
        if entry is not None and entry.gen == gen:
            del self._index[key]
            self._used -= entry.size

    def _settle_failure(self, key: ChunkKey, gen: int, exc: BaseException) -> None:
        """A failed read is a miss for its key alone: corrupt files are deleted (by the reader)
        and counted, vanished ones forgotten; a file that cannot be read is counted, logged and
        forgotten after MAX_READ_FAILURES failures in a row (kept on disk: the fault may pass)."""
        if isinstance(exc, asyncio.CancelledError):
            return
        if isinstance(exc, CorruptDataError):  # the reader deleted it
            self._rejects.note(key, exc)
            self._drop(key, gen)
            return
        if isinstance(exc, NewerFormatError):  # a miss left on disk for newer readers
            self._rejects.note(key, exc)
            entry = self._index.get(key)
            if entry is not None and entry.gen == gen:
                entry.newer = True
            return
        if isinstance(exc, FileNotFoundError):
            self._drop(key, gen)
            return
        self._read_errors += 1
        error = _as_lmtier_error(exc, op="read", path=self._layout.path_of(key))
        entry = self._index.get(key)
        if entry is None or entry.gen != gen:
            return
        entry.failures += 1
        if entry.failures >= MAX_READ_FAILURES:
            self._drop(key, gen)
            log.warning("disk tier: %s failed %d reads in a row and left the index (the file stays "
                        "until the next open): %s", key, entry.failures, error)
        else:
            log.warning("disk tier: a miss for %s: %s", key, error)

    async def _check_root_after_failures(self, outcomes: list[Outcome], cancelled: bool) -> None:
        """Raise BackendUnavailableError if reads failed because the whole root is gone."""
        if cancelled or all(ok or isinstance(v, CorruptDataError) for ok, v in outcomes):
            return
        ((ok, value),), _ = await self._run([partial(check_root, self.root)])
        if not ok:
            self._note_root_gone([value])
            raise _as_lmtier_error(value, op="check of the root", path=self.root)

    def _note_root_gone(self, errors: Iterable[BaseException]) -> None:
        if any(isinstance(e, RootGoneError) for e in errors):
            self._root_gone = True

    async def _write(self, items: dict[ChunkKey, StoreItem]) -> tuple[dict[ChunkKey, Outcome], bool]:
        """Write ``items`` on the worker threads and index each file written; their outcomes."""
        calls = [partial(_files.write_file, self._layout, it, fsync=self.config.fsync, stamp=self._stamp())
                 for it in items.values()]
        outcomes, cancelled = await self._run(calls, caller_memory=True)
        for key, (ok, value) in zip(items, outcomes, strict=True):
            if ok:
                self._gen += 1
                old = self._index.pop(key, None)
                if old is not None:
                    self._used -= old.size
                self._index[key] = _Entry(value, self._gen)
                self._used += value
        return dict(zip(items, outcomes, strict=True)), cancelled

    def _least_recent(self, nbytes: int, keep: Collection[ChunkKey] = ()) -> tuple[list[ChunkKey], int]:
        """Take least recently used keys holding at least ``nbytes`` out of the index (not
        ``keep``); the caller evicts their files. Returns them and the bytes they hold."""
        victims: list[ChunkKey] = []
        taken = 0
        for key in list(self._index):
            if taken >= nbytes:
                break
            if key in keep:
                continue
            entry = self._index.pop(key)
            self._used -= entry.size
            taken += entry.size
            victims.append(key)
        return victims, taken

    async def _evict(self, victims: list[ChunkKey]) -> None:
        """Remove the files of ``victims`` (already out of the index), offering each payload to
        the eviction listeners."""
        if not victims:
            return
        self._evictions += len(victims)
        want = bool(self._listeners)
        outcomes, cancelled = await self._run(
            [partial(_files.evict_file, self._layout.path_of(k), k, want) for k in victims])
        for key, (ok, value) in zip(victims, outcomes, strict=True):
            if ok:
                if value is not None:
                    self._notify(key, value)
            elif isinstance(value, (CorruptDataError, NewerFormatError)):
                self._rejects.note(key, value)
                log.warning("disk tier: an evicted file was refused and not demoted: %s", value)
            elif not isinstance(value, FileNotFoundError):
                # the file stays on disk unindexed until the next open's scan picks it up again
                log.warning("disk tier: could not evict %s: %s", key,
                            _as_lmtier_error(value, op="evict", path=self._layout.path_of(key)))
        if cancelled:
            raise asyncio.CancelledError

    def _notify(self, key: ChunkKey, payload: memoryview) -> None:
        for listener in list(self._listeners):
            try:
                listener(key, payload)
            except Exception:
                log.exception("disk tier: eviction listener %r failed for %s", listener, key)

    async def _run(self, calls: Sequence[Callable[[], Any]], *,
                   caller_memory: bool = False) -> tuple[list[Outcome], bool]:
        """Run ``calls`` on the worker threads; return their outcomes in order and whether the
        awaiting task was cancelled meanwhile (the caller then raises CancelledError, after
        accounting for what was done).

        A batch of many small files costs a few thread hand-offs, not one per file
        (:class:`lmtier.kit.WorkerPool`). On cancellation, calls not started are skipped, but
        those already running are awaited: ``caller_memory`` ones read from or write into caller
        buffers, which must not be touched once this method returns, and the others end quickly.
        """
        wrap = _touching if caller_memory else _plain
        results, cancelled = await self._workers.run_settled([partial(wrap, call) for call in calls])
        return [(r.ok, r.value if r.ok else r.error) for r in results], cancelled


def _plain(call: Callable[[], Any], token: CancelToken) -> Any:
    return call()


def _touching(call: Callable[[], Any], token: CancelToken) -> Any:
    with token.touching_caller_memory():
        return call()


def _as_lmtier_error(exc: BaseException, *, op: str, path: str | os.PathLike[str]) -> LmtierError:
    if isinstance(exc, LmtierError):
        return exc
    if isinstance(exc, OSError):
        return map_os_error(exc, op=op, path=path)
    if isinstance(exc, asyncio.CancelledError):
        return BackendError(f"disk tier: {op} {path} was cancelled")
    return BackendError(f"disk tier: {op} {path} failed unexpectedly: {type(exc).__name__}: {exc}")


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _warn_if_the_filesystem_is_smaller(root: Path, max_bytes: int, held: int) -> None:
    """Log when ``max_bytes`` exceeds what the root's filesystem can give the tier: its free space
    plus what the tier already holds. The tier still works (a full filesystem evicts), but its
    real capacity is the smaller figure."""
    try:
        st = os.statvfs(root)
    except OSError:
        return
    room = st.f_bavail * st.f_frsize + held
    if max_bytes > room:
        log.warning("disk tier: max_bytes=%d is more than the filesystem of %s can hold for the tier "
                    "(%d bytes free + %d held); it will evict when the disk fills: lower max_bytes to at "
                    "most %d or free space", max_bytes, root, room - held, held, room)


def _raise_first(cancelled: bool, errors: list[LmtierError]) -> None:
    if cancelled:
        raise asyncio.CancelledError
    if errors:
        raise errors[0]
