"""Chunks as S3 objects, moved by NIXL's OBJ plugin between staging memory and OBJ_SEG descriptors.

Object key: :func:`lmtier.kit.object_name` (``<prefix>/<str(key)>``, the ``s3`` tier's names, so
either tier reads the other's objects); each object is the :mod:`lmtier.framing` header followed
by the payload. Before version 2 of the header this plugin named objects
``<prefix><namespace>/<str(key)>``: :func:`lmtier.kit.migrate_object_names` renames them. An OBJ_SEG descriptor names its object through ``metaInfo`` at registration and is
addressed by a device id unique within this store; registering one is a map insertion, so it is
done per call (the DRAM side is the expensive registration, done once per staging slab).

Reads need a size before the object is fetched, and NIXL's HEAD does not return one, so a read
uses the size this handle last saw for the key, else the last size it saw for any key, else
``expected_item_bytes``; a ranged GET past the end returns the whole object. When the header
says the object is bigger than what was read, the object is read again at its exact size.

A ranged GET past the end also says nothing of how many bytes came: a truncated object would
leave the end of the buffer as it was. So each read of ``n`` bytes goes with a *probe*, a 1-byte
GET of byte ``n - 1``, which fails exactly when the object is shorter than ``n``; a read is
trusted only at the size its header announces, with the probe passed. An object the probe
finds shorter than its header says, or longer, is returned cut to its header (which the tier
then refuses as corrupt).

A present key whose GET fails is re-checked: gone meanwhile is a miss, still there is a fault of
that key alone (its exception is returned in its place; the tier settles it with
:class:`lmtier.kit.KeyFaults`, serving the batch's other keys).
Deletes go through :class:`~lmtier_backends.nixl._s3rest.S3Rest` (NIXL has no delete).
All methods block; the tier calls them on worker threads.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from lmtier.errors import CorruptDataError
from lmtier.framing import HEADER_BYTES, READABLE_CODECS, NewerFormatError, decode_header
from lmtier.keys import ChunkKey
from lmtier.kit import object_name
from lmtier.memory import HostBuffer, release_all
from lmtier_backends.nixl._errors import TransferFailed
from lmtier_backends.nixl._s3rest import S3Rest
from lmtier_backends.nixl._staging import StagingPool
from lmtier_backends.nixl._xfer import CallerBuffer, Outcome, move_registered, outs_registered
from lmtier_backends.nixl.config import ObjOptions

__all__ = ["ObjStore"]

PLUGIN = "OBJ"
_SIZE_CACHE_ENTRIES = 65536
_SHRINK_SLACK = 1 << 20


class ObjStore:
    """The object side of the ``obj`` flavour of the nixl tier."""

    plugin = PLUGIN

    def __init__(self, agent: Any, peer: str, options: ObjOptions, staging: StagingPool, rest: S3Rest,
                 *, timeout_s: float) -> None:
        self._agent = agent
        self._peer = peer
        self._opts = options
        self._staging = staging
        self._rest = rest
        self._timeout_s = timeout_s
        self._dev_ids = itertools.count(1)
        self._sizes: OrderedDict[ChunkKey, int] = OrderedDict()
        self._last_size = int(options.expected_item_bytes)
        self._lock = threading.Lock()
        self.rereads = 0

    def name(self, key: ChunkKey) -> str:
        return object_name(self._opts.prefix, key)

    # -- queries ---------------------------------------------------------------------------------
    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """HEAD each object through NIXL; raises (nixlBackendError) when the store cannot answer."""
        if not keys:
            return []
        answers = self._agent.query_memory([(0, 0, 0, self.name(k)) for k in keys], PLUGIN, "OBJ")
        return [a is not None for a in answers]

    def usable(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether each object holds a header this reader accepts: a HEAD, then 64 bytes read per
        present object."""
        present = [i for i, p in enumerate(self.exists(keys)) if p]
        out = [False] * len(keys)
        if not present:
            return out
        headers = [self._staging.allocate(HEADER_BYTES) for _ in present]
        try:
            for buf in headers:
                buf.tensor.zero_()
            outcome = self._transfer("READ", [(self.name(keys[i]), buf.data_ptr, HEADER_BYTES, 0, buf)
                                              for i, buf in zip(present, headers, strict=True)])
            for i, buf, error in zip(present, headers, outcome.errors, strict=True):
                if error is not None:
                    continue  # gone since the HEAD, or shorter than a header: not usable either way
                try:
                    decode_header(keys[i], buf.tensor.numpy().data, codecs=READABLE_CODECS)
                    out[i] = True
                except (CorruptDataError, NewerFormatError):
                    pass
        finally:
            for buf in headers:
                buf.release()
        return out

    def read(self, keys: Sequence[ChunkKey]) -> list[HostBuffer | bytes | BaseException | None]:
        """Each object's bytes (exactly header + payload, when its size matches its header) in a
        staging buffer; ``None`` if absent; ``bytes`` (the header alone, or less) for an object
        whose size contradicts its header: the caller's check refuses it as corrupt; the exception
        of an object the store failed to serve."""
        present = self.exists(keys)
        want = [i for i, p in enumerate(present) if p]
        out: list[HostBuffer | bytes | BaseException | None] = [None] * len(keys)
        try:
            short = self._fetch(keys, want, out, exact=False)
            # read again, at the size the header announces, what was not read at exactly that size
            again = [i for i in want if isinstance(out[i], HostBuffer)
                     and self._announced(keys[i], out[i]) not in (0, _nbytes(out[i]))
                     and (i in short or self._announced(keys[i], out[i]) > _nbytes(out[i]))]
            if again:
                self.rereads += len(again)
                short = (short - set(again)) | self._fetch(keys, again, out, exact=True)
            for i in want:
                buf = out[i]
                if not isinstance(buf, HostBuffer):
                    continue
                announced = self._announced(keys[i], buf)
                if i in short or (announced and announced < buf.nbytes):
                    out[i] = bytes(buf.tensor[:HEADER_BYTES].numpy())  # its size contradicts its header
                    buf.release()
                else:
                    self._shrink(keys[i], out, i)
            return out
        except BaseException:
            release_all(out, shared=True)
            raise

    def read_into(self, keys: Sequence[ChunkKey], outs: Sequence[CallerBuffer]
                  ) -> list[HostBuffer | bytes | BaseException | None]:
        """Read each object's payload straight into ``outs[i]`` (a ranged GET from byte 64) and its
        header into a 64-byte staging buffer, both at once. Returns the header buffer (payload in
        ``outs[i]``), or - where a GET failed and the cause is unclear (a short object, a failing
        server) - the whole value read through staging as :meth:`read` does, or ``None`` for a miss.
        Caller memory is never abandoned: this returns only once NIXL is done writing it."""
        present = self.exists(keys)
        todo = [i for i, p in enumerate(present) if p]
        out: list[HostBuffer | bytes | BaseException | None] = [None] * len(keys)
        probes = self._staging.allocate(max(1, len(todo)))
        try:
            jobs: list[tuple[str, int, int, int, HostBuffer | None]] = []
            owners: list[int] = []
            for j, i in enumerate(todo):
                out[i] = header = self._staging.allocate(HEADER_BYTES)
                header.tensor.zero_()
                name = self.name(keys[i])
                jobs.append((name, header.data_ptr, HEADER_BYTES, 0, header))
                if outs[i].nbytes:
                    jobs.append((name, outs[i].address, outs[i].nbytes, HEADER_BYTES, None))
                    # the probe: fails if the object ends before the payload the caller expects
                    jobs.append((name, probes.data_ptr + j, 1, HEADER_BYTES + outs[i].nbytes - 1, probes))
                owners.extend([i] * (len(jobs) - len(owners)))
            if jobs:
                with outs_registered(self._agent, PLUGIN, [outs[i] for i in todo]):
                    outcome = self._transfer("READ", jobs, timeout_s=math.inf)
                unclear = sorted({owners[j] for j, e in enumerate(outcome.errors) if e is not None})
                for i in unclear:
                    buf, out[i] = out[i], None
                    if isinstance(buf, HostBuffer):
                        buf.release()
                if unclear:  # gone, short, or a failing store: read() tells them apart
                    whole = self.read([keys[i] for i in unclear])
                    for i, got in zip(unclear, whole, strict=True):
                        out[i] = got
            return out
        except BaseException:
            release_all(out, shared=True)
            raise
        finally:
            probes.release()

    # -- updates ---------------------------------------------------------------------------------
    def write(self, items: Sequence[tuple[ChunkKey, HostBuffer, CallerBuffer | None]]) -> None:
        """PUT each item's staging bytes (header and payload: an object is written whole, so the
        payload cannot come from elsewhere) as its key's object; raises if any PUT failed."""
        if any(payload is not None for _, _, payload in items):
            raise ValueError("the obj store writes whole objects from staging")
        outcome = self._transfer("WRITE", [(self.name(k), buf.data_ptr, buf.nbytes, 0, buf) for k, buf, _ in items])
        for (key, buf, _), error in zip(items, outcome.errors, strict=True):
            if error is None:
                self._remember(key, buf.nbytes)
        failed = [e for e in outcome.errors if e is not None]
        if failed:
            raise failed[0]

    def remove(self, keys: Sequence[ChunkKey]) -> None:
        statuses = self._rest.delete([self.name(k) for k in keys])
        with self._lock:
            for key in keys:
                self._sizes.pop(key, None)
        bad = [s for s in statuses if s not in (200, 204, 404)]
        if bad:
            raise TransferFailed(f"S3 DELETE answered HTTP {bad[0]}")

    def close(self) -> None:
        """Nothing to release: the objects are the tier's persistent state."""

    def stats(self) -> dict[str, Any]:
        return {"rereads": self.rereads}

    # -- machinery -------------------------------------------------------------------------------
    def _fetch(self, keys: Sequence[ChunkKey], which: Sequence[int], out: list[HostBuffer | bytes | BaseException | None], *,
               exact: bool) -> set[int]:
        """Read ``keys[i]`` for ``i`` in ``which`` into fresh buffers in ``out`` (releasing old ones),
        each with its probe; returns the ``i`` whose object is shorter than the bytes read."""
        if not which:
            return set()
        jobs: list[tuple[str, int, int, int, HostBuffer | None]] = []
        probes = self._staging.allocate(len(which))
        try:
            for j, i in enumerate(which):
                old = out[i]
                size = self._announced(keys[i], old) if exact and isinstance(old, HostBuffer) else self._guess(keys[i])
                out[i] = None
                if isinstance(old, HostBuffer):
                    old.release()
                out[i] = buf = self._staging.allocate(size)
                # a short object leaves the rest of the buffer as it was: never let an old header stand
                buf.tensor[:HEADER_BYTES].zero_()
                name = self.name(keys[i])
                jobs.append((name, buf.data_ptr, buf.nbytes, 0, buf))
                jobs.append((name, probes.data_ptr + j, 1, buf.nbytes - 1, probes))
            outcome = self._transfer("READ", jobs)
        finally:
            probes.release()
        failed: dict[int, BaseException] = {}
        for j, i in enumerate(which):
            error = outcome.errors[2 * j]
            if error is not None:
                failed[i] = error
        short = {i for j, i in enumerate(which) if outcome.errors[2 * j + 1] is not None}
        for i in failed:
            failed_buf, out[i] = out[i], None
            if isinstance(failed_buf, HostBuffer):
                failed_buf.release()
        if failed:
            self._settle_failed_reads(keys, failed, out)
        return short - set(failed)

    def _settle_failed_reads(self, keys: Sequence[ChunkKey], failed: dict[int, BaseException],
                             out: list[HostBuffer | bytes | BaseException | None]) -> None:
        """A GET from byte 0 failed: the object is gone (a miss: ``None``), empty (corrupt:
        ``b""``), or the store failed to serve it (its error, in its place: a fault of that key).
        Asked of the server directly (a HEAD that gives the size)."""
        for i, error in failed.items():
            try:
                size = self._rest.object_size(self.name(keys[i]))
            except Exception:  # the server does not answer a HEAD either: the GET's error stands
                out[i] = error
                continue
            if size is not None:
                # there and long enough to read: the store failed; shorter than a header: refused
                out[i] = error if size >= HEADER_BYTES else b""

    def _transfer(self, op: str, jobs: Sequence[tuple[str, int, int, int, HostBuffer | None]], *,
                  timeout_s: float | None = None) -> Outcome:
        """Move each ``(object name, address, nbytes, object offset, staging buffer or None)`` job
        as its own request; OBJ descriptors are registered meanwhile. Staging buffers of abandoned
        requests are quarantined; jobs on caller memory pass ``timeout_s=inf`` (never abandoned)."""
        ids = [next(self._dev_ids) for _ in jobs]
        return move_registered(
            self._agent, op, PLUGIN, "OBJ", [(0, 0, dev, job[0]) for dev, job in zip(ids, jobs, strict=True)],
            [(addr, n, off, dev, buf) for dev, (_, addr, n, off, buf) in zip(ids, jobs, strict=True)],
            peer=self._peer, timeout_s=self._timeout_s if timeout_s is None else timeout_s, staging=self._staging)

    def _shrink(self, key: ChunkKey, out: list[HostBuffer | bytes | BaseException | None], i: int) -> None:
        """Move a small object read into a big guessed buffer to a buffer of its size: callers
        may keep the returned view (and so the buffer) for long."""
        buf = out[i]
        size = self._announced(key, buf)
        if not isinstance(buf, HostBuffer) or not size or buf.nbytes - size < _SHRINK_SLACK or size > buf.nbytes // 2:
            return
        small = self._staging.allocate(size)
        small.tensor.copy_(buf.tensor[:size])
        out[i] = small
        buf.release()

    def _announced(self, key: ChunkKey, buf: object) -> int:
        """Header + payload bytes the stored header announces (0 if the header is bad)."""
        if not isinstance(buf, HostBuffer):
            return 0
        try:
            size = HEADER_BYTES + decode_header(key, buf.tensor[:HEADER_BYTES].numpy().data,
                                                codecs=READABLE_CODECS).payload_length
        except (CorruptDataError, NewerFormatError):
            return 0
        self._remember(key, size)
        return size

    def _guess(self, key: ChunkKey) -> int:
        with self._lock:
            return max(HEADER_BYTES, self._sizes.get(key, self._last_size))  # the header, at least

    def _remember(self, key: ChunkKey, size: int) -> None:
        with self._lock:
            self._sizes[key] = size
            self._sizes.move_to_end(key)
            self._last_size = size
            while len(self._sizes) > _SIZE_CACHE_ENTRIES:
                self._sizes.popitem(last=False)


def _nbytes(buf: object) -> int:
    return buf.nbytes if isinstance(buf, HostBuffer) else 0
