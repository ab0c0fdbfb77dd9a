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
leave the end of the buffer as it was (stale bytes of an earlier read, which can be the very bytes
that are missing). So before each read of ``n`` bytes the buffer's byte ``n - 1`` is set to a
*sentinel*; a read that changed it reached byte ``n - 1``, so the object is at least ``n`` bytes
long. Only where the sentinel still stands - the object is shorter, or its byte ``n - 1`` is the
sentinel - does a *probe* follow, a 1-byte GET of byte ``n - 1``, which fails exactly when the
object is shorter than ``n``. The sentinel is ``0x7f`` - as the high byte of a little-endian
bf16, fp16 or fp32, a magnitude of 2^127 or more, an infinity or a NaN, so rare in KV data - or
``0x80`` where the end of the object was last seen holding ``0x7f`` (this key's object, read or
written through this handle, else the last object seen): an object read again as it was never
needs a probe.
A read is trusted only at the size its header announces, with its last byte seen written. An
object found shorter than its header says, or longer, is returned cut to its header (which the
tier then refuses as corrupt); the header's checksum still guards every payload byte.

A present key whose GET fails is re-checked: gone meanwhile is a miss, still there is a fault of
that key alone (its exception is returned in its place; the tier settles it with
:class:`lmtier.kit.KeyFaults`, serving the batch's other keys).
Deletes go through :class:`~lmtier_backends.nixl._s3rest.S3Rest` (NIXL has no delete).
All methods block; the tier calls them on worker threads.
"""

from __future__ import annotations

import ctypes
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
_SENTINEL = 0x7F


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
        # per key: (header + payload bytes, last byte) last seen, either None if not seen
        self._seen: OrderedDict[ChunkKey, tuple[int | None, int | None]] = OrderedDict()
        self._last_size = int(options.expected_item_bytes)
        self._last_tail: int | None = None
        self._lock = threading.Lock()
        self.rereads = 0
        self.probes = 0

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
            unsure, _ = self._fetch(keys, {i: self._guess(keys[i]) for i in want}, out)
            # read again, at the size the header announces, what was not read at exactly that size
            # (one round with the probes of the reads that were, but whose last byte was not seen)
            again: dict[int, int] = {}
            for i in want:
                announced = self._announced(keys[i], out[i])
                if announced not in (0, _nbytes(out[i])) and (i in unsure or announced > _nbytes(out[i])):
                    again[i] = announced
            with self._lock:
                self.rereads += len(again)
            unsure_again, short = self._fetch(keys, again, out, probes=self._to_probe(keys, unsure - set(again), out))
            if unsure_again:
                short |= self._fetch(keys, {}, out, probes=self._to_probe(keys, unsure_again, out))[1]
            for i in want:
                buf = out[i]
                if not isinstance(buf, HostBuffer):
                    continue
                announced = self._announced(keys[i], buf)
                if i in short or (announced and announced < buf.nbytes):
                    out[i] = bytes(buf.tensor[:HEADER_BYTES].numpy())  # its size contradicts its header
                    buf.release()
                else:
                    if announced == buf.nbytes:
                        self._remember(keys[i], tail=_last_byte(buf.data_ptr, buf.nbytes).value)
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
        try:
            jobs: list[tuple[str, int, int, int, HostBuffer | None]] = []
            owners: list[int] = []
            payloads: dict[int, tuple[int, int]] = {}  # i -> (its payload's job, the sentinel at its end)
            for i in todo:
                out[i] = header = self._staging.allocate(HEADER_BYTES)
                header.tensor.zero_()
                name = self.name(keys[i])
                jobs.append((name, header.data_ptr, HEADER_BYTES, 0, header))
                if outs[i].nbytes:
                    payloads[i] = (len(jobs), _set_sentinel(outs[i].address, outs[i].nbytes, self._tail(keys[i])))
                    jobs.append((name, outs[i].address, outs[i].nbytes, HEADER_BYTES, None))
                owners.extend([i] * (len(jobs) - len(owners)))
            if jobs:
                with outs_registered(self._agent, PLUGIN, [outs[i] for i in todo]):
                    outcome = self._transfer("READ", jobs, timeout_s=math.inf)
                unclear = {owners[j] for j, e in enumerate(outcome.errors) if e is not None}
                unsure = [i for i, (j, sentinel) in payloads.items() if outcome.errors[j] is None
                          and _last_byte(outs[i].address, outs[i].nbytes).value == sentinel]
                if unsure:  # the probe fails if the object ends before the payload the caller expects
                    _, probed = self._round([], [(self.name(keys[i]), HEADER_BYTES + outs[i].nbytes - 1)
                                                 for i in unsure])
                    unclear.update(i for i, error in zip(unsure, probed, strict=True) if error is not None)
                for i in payloads.keys() - unclear:
                    self._remember(keys[i], tail=_last_byte(outs[i].address, outs[i].nbytes).value)
                for i in unclear:
                    buf, out[i] = out[i], None
                    if isinstance(buf, HostBuffer):
                        buf.release()
                if unclear:  # gone, short, or a failing store: read() tells them apart
                    again = sorted(unclear)
                    for i, got in zip(again, self.read([keys[i] for i in again]), strict=True):
                        out[i] = got
            return out
        except BaseException:
            release_all(out, shared=True)
            raise

    # -- updates ---------------------------------------------------------------------------------
    def write(self, items: Sequence[tuple[ChunkKey, HostBuffer, CallerBuffer | None]]) -> None:
        """PUT each item's staging bytes (header and payload: an object is written whole, so the
        payload cannot come from elsewhere) as its key's object; raises if any PUT failed."""
        if any(payload is not None for _, _, payload in items):
            raise ValueError("the obj store writes whole objects from staging")
        outcome = self._transfer("WRITE", [(self.name(k), buf.data_ptr, buf.nbytes, 0, buf) for k, buf, _ in items])
        for (key, buf, _), error in zip(items, outcome.errors, strict=True):
            if error is None:
                self._remember(key, size=buf.nbytes, tail=_last_byte(buf.data_ptr, buf.nbytes).value)
        failed = [e for e in outcome.errors if e is not None]
        if failed:
            raise failed[0]

    def remove(self, keys: Sequence[ChunkKey]) -> None:
        statuses = self._rest.delete([self.name(k) for k in keys])
        with self._lock:
            for key in keys:
                self._seen.pop(key, None)
        bad = [s for s in statuses if s not in (200, 204, 404)]
        if bad:
            raise TransferFailed(f"S3 DELETE answered HTTP {bad[0]}")

    def close(self) -> None:
        """Nothing to release: the objects are the tier's persistent state."""

    def stats(self) -> dict[str, Any]:
        return {"rereads": self.rereads, "probes": self.probes}

    # -- machinery -------------------------------------------------------------------------------
    def _fetch(self, keys: Sequence[ChunkKey], sizes: dict[int, int],
               out: list[HostBuffer | bytes | BaseException | None], *,
               probes: Sequence[tuple[int, int]] = ()) -> tuple[set[int], set[int]]:
        """Read ``sizes[i]`` bytes of ``keys[i]`` into a fresh buffer in ``out[i]`` (releasing an
        old one), a sentinel at its last byte; in the same round, probe byte ``p`` of ``keys[i]``
        for each ``(i, p)`` in ``probes``. Returns the ``i`` read whose sentinel still stands, and
        the ``i`` probed whose object is shorter than ``p + 1`` bytes."""
        if not sizes and not probes:
            return set(), set()
        jobs: list[tuple[str, int, int, int, HostBuffer | None]] = []
        sentinels: list[int] = []
        for i, size in sizes.items():
            old = out[i]
            out[i] = None
            if isinstance(old, HostBuffer):
                old.release()
            out[i] = buf = self._staging.allocate(size)
            # a short object leaves the rest of the buffer as it was: never let an old header stand
            buf.tensor[:HEADER_BYTES].zero_()
            sentinels.append(_set_sentinel(buf.data_ptr, buf.nbytes, self._tail(keys[i])))
            jobs.append((self.name(keys[i]), buf.data_ptr, buf.nbytes, 0, buf))
        read, probed = self._round(jobs, [(self.name(keys[i]), at) for i, at in probes])
        short = {i for (i, _), error in zip(probes, probed, strict=True) if error is not None}
        failed: dict[int, BaseException] = {}
        unsure: set[int] = set()
        for i, (_, address, nbytes, _, _), sentinel, error in zip(sizes, jobs, sentinels, read, strict=True):
            if error is not None:
                failed[i] = error
            elif _last_byte(address, nbytes).value == sentinel:
                unsure.add(i)
        for i in failed:
            failed_buf, out[i] = out[i], None
            if isinstance(failed_buf, HostBuffer):
                failed_buf.release()
        if failed:
            self._settle_failed_reads(keys, failed, out)
        return unsure, short

    def _to_probe(self, keys: Sequence[ChunkKey], unsure: set[int],
                  out: list[HostBuffer | bytes | BaseException | None]) -> list[tuple[int, int]]:
        """The probes a read whose sentinel still stands needs: none where its header is bad (the
        tier refuses it whatever its size) or announces another size (read again, or refused)."""
        return [(i, _nbytes(out[i]) - 1) for i in sorted(unsure)
                if self._announced(keys[i], out[i]) == _nbytes(out[i])]

    def _round(self, reads: Sequence[tuple[str, int, int, int, HostBuffer | None]], probes: Sequence[tuple[str, int]]
               ) -> tuple[list[BaseException | None], list[BaseException | None]]:
        """One round of requests: the ``reads`` jobs, and a *probe* - a GET of byte ``p`` of object
        ``name`` - for each ``(name, p)`` in ``probes``. Returns each read's and each probe's error
        (a probe fails where the object is shorter than ``p + 1`` bytes)."""
        if not probes:
            return self._transfer("READ", reads).errors, []
        with self._lock:
            self.probes += len(probes)
        target = self._staging.allocate(len(probes))
        try:
            jobs = [*reads, *((name, target.data_ptr + j, 1, p, target) for j, (name, p) in enumerate(probes))]
            errors = self._transfer("READ", jobs).errors
        finally:
            target.release()
        return errors[:len(reads)], errors[len(reads):]

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
        self._remember(key, size=size)
        return size

    def _guess(self, key: ChunkKey) -> int:
        with self._lock:
            size = self._seen.get(key, (None, None))[0]
            return max(HEADER_BYTES, self._last_size if size is None else size)  # the header, at least

    def _tail(self, key: ChunkKey) -> int | None:
        """The last byte last seen of ``key``'s object, else of any object (None: none seen)."""
        with self._lock:
            tail = self._seen.get(key, (None, None))[1]
            return self._last_tail if tail is None else tail

    def _remember(self, key: ChunkKey, *, size: int | None = None, tail: int | None = None) -> None:
        with self._lock:
            old_size, old_tail = self._seen.get(key, (None, None))
            self._seen[key] = (old_size if size is None else size, old_tail if tail is None else tail)
            self._seen.move_to_end(key)
            if size is not None:
                self._last_size = size
            if tail is not None:
                self._last_tail = tail
            while len(self._seen) > _SIZE_CACHE_ENTRIES:
                self._seen.popitem(last=False)


def _nbytes(buf: object) -> int:
    return buf.nbytes if isinstance(buf, HostBuffer) else 0


def _last_byte(address: int, nbytes: int) -> ctypes.c_ubyte:
    """The last byte of the ``nbytes`` at ``address`` (memory the caller holds), to read or set."""
    return ctypes.c_ubyte.from_address(address + nbytes - 1)


def _set_sentinel(address: int, nbytes: int, avoid: int | None) -> int:
    """Set the last byte of a read's destination to a sentinel other than ``avoid`` (the byte
    the object's end last held); return it."""
    sentinel = _SENTINEL if avoid != _SENTINEL else _SENTINEL ^ 0xFF
    _last_byte(address, nbytes).value = sentinel
    return sentinel
