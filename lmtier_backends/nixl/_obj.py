"""Chunks as S3 objects, moved by NIXL's OBJ plugin between staging memory and OBJ_SEG descriptors.

Object key: ``<prefix><namespace>/<str(key)>``; each object is the codec header followed by the
payload. An OBJ_SEG descriptor names its object through ``metaInfo`` at registration and is
addressed by a device id unique within this store; registering one is a map insertion, so it is
done per call (the DRAM side is the expensive registration, done once per staging slab).

Reads need a size before the object is fetched, and NIXL's HEAD does not return one, so a read
uses the size this handle last saw for the key, else the last size it saw for any key, else
``expected_item_bytes``; a ranged GET past the end returns the whole object. When the header
says the object is bigger than what was read, the object is read again at its exact size.

A present key whose GET fails is re-checked: gone meanwhile is a miss, still there is a fault.
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
from lmtier.framing import HEADER_BYTES, decode_header
from lmtier.keys import ChunkKey
from lmtier.memory import HostBuffer
from lmtier_backends.nixl._errors import TransferFailed
from lmtier_backends.nixl._s3rest import S3Rest
from lmtier_backends.nixl._staging import StagingPool
from lmtier_backends.nixl._xfer import CallerBuffer, Outcome, outs_registered, transfer_each
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
        return f"{self._opts.prefix}{key.namespace}/{key}"

    # -- queries ---------------------------------------------------------------------------------
    def exists(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """HEAD each object through NIXL; raises (nixlBackendError) when the store cannot answer."""
        if not keys:
            return []
        answers = self._agent.query_memory([(0, 0, 0, self.name(k)) for k in keys], PLUGIN, "OBJ")
        return [a is not None for a in answers]

    def read(self, keys: Sequence[ChunkKey]) -> list[HostBuffer | None]:
        """Each object's bytes (at least header + payload) in a staging buffer; ``None`` if absent."""
        present = self.exists(keys)
        want = [i for i, p in enumerate(present) if p]
        out: list[HostBuffer | None] = [None] * len(keys)
        try:
            self._fetch(keys, want, out, exact=False)
            # a header announcing more bytes than were read: read that object again, exactly
            again = [i for i in want if self._announced(keys[i], out[i]) > _nbytes(out[i])]
            if again:
                self.rereads += len(again)
                self._fetch(keys, again, out, exact=True)
            for i in want:
                self._shrink(keys[i], out, i)
            return out
        except BaseException:
            for buf in out:
                if buf is not None:
                    buf.release()
            raise

    def read_into(self, keys: Sequence[ChunkKey], outs: Sequence[CallerBuffer]) -> list[HostBuffer | None]:
        """Read each object's payload straight into ``outs[i]`` (a ranged GET from byte 64) and its
        header into a 64-byte staging buffer, both at once. Returns the header buffer (payload in
        ``outs[i]``), or - where a GET failed and the cause is unclear (a short object, a failing
        server) - the whole value read through staging as :meth:`read` does, or ``None`` for a miss.
        Caller memory is never abandoned: this returns only once NIXL is done writing it."""
        present = self.exists(keys)
        todo = [i for i, p in enumerate(present) if p]
        out: list[HostBuffer | None] = [None] * len(keys)
        try:
            jobs: list[tuple[str, int, int, int, HostBuffer | None]] = []
            owners: list[int] = []
            for i in todo:
                out[i] = header = self._staging.allocate(HEADER_BYTES)
                header.tensor.zero_()
                jobs.append((self.name(keys[i]), header.data_ptr, HEADER_BYTES, 0, header))
                if outs[i].nbytes:
                    jobs.append((self.name(keys[i]), outs[i].address, outs[i].nbytes, HEADER_BYTES, None))
                owners.extend([i] * (len(jobs) - len(owners)))
            if jobs:
                with outs_registered(self._agent, PLUGIN, [outs[i] for i in todo]):
                    outcome = self._transfer("READ", jobs, timeout_s=math.inf)
                unclear = sorted({owners[j] for j, e in enumerate(outcome.errors) if e is not None})
                for i in unclear:
                    buf, out[i] = out[i], None
                    if buf is not None:
                        buf.release()
                if unclear:
                    whole = self.read([keys[i] for i in unclear])
                    for i, got in zip(unclear, whole, strict=True):
                        out[i] = got
            return out
        except BaseException:
            for buf in out:
                if buf is not None:
                    buf.release()
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
    def _fetch(self, keys: Sequence[ChunkKey], which: Sequence[int], out: list[HostBuffer | None], *,
               exact: bool) -> None:
        """Read ``keys[i]`` for ``i`` in ``which`` into fresh buffers in ``out`` (releasing old ones)."""
        if not which:
            return
        jobs: list[tuple[str, int, int, int, HostBuffer | None]] = []
        for i in which:
            size = self._announced(keys[i], out[i]) if exact else self._guess(keys[i])
            old, out[i] = out[i], None
            if old is not None:
                old.release()
            out[i] = buf = self._staging.allocate(size)
            # a short object leaves the rest of the buffer as it was: never let an old header stand
            buf.tensor[:HEADER_BYTES].zero_()
            jobs.append((self.name(keys[i]), buf.data_ptr, buf.nbytes, 0, buf))
        outcome = self._transfer("READ", jobs)
        failed = [i for i, e in zip(which, outcome.errors, strict=True) if e is not None]
        for i in failed:
            failed_buf, out[i] = out[i], None
            if failed_buf is not None:
                failed_buf.release()
        if failed:
            # gone since the HEAD (deleted, expired) is a miss; still there means the store failed
            still = self.exists([keys[i] for i in failed])
            if any(still):
                errors = [e for e in outcome.errors if e is not None]
                raise errors[0]

    def _transfer(self, op: str, jobs: Sequence[tuple[str, int, int, int, HostBuffer | None]], *,
                  timeout_s: float | None = None) -> Outcome:
        """Move each ``(object name, address, nbytes, object offset, staging buffer or None)`` job
        as its own request; OBJ descriptors are registered meanwhile. Staging buffers of abandoned
        requests are quarantined; jobs on caller memory pass ``timeout_s=inf`` (never abandoned)."""
        agent = self._agent
        ids = [next(self._dev_ids) for _ in jobs]
        registration = agent.register_memory(
            [(0, 0, dev, job[0]) for dev, job in zip(ids, jobs, strict=True)], "OBJ", backends=[PLUGIN]
        )
        try:
            pairs = [
                (agent.get_xfer_descs([(addr, n, 0)], "DRAM"), agent.get_xfer_descs([(off, n, dev)], "OBJ"))
                for dev, (_, addr, n, off, _) in zip(ids, jobs, strict=True)
            ]
            outcome = transfer_each(agent, op, pairs, peer=self._peer,
                                    timeout_s=self._timeout_s if timeout_s is None else timeout_s)
        finally:
            agent.deregister_memory(registration, backends=[PLUGIN])
        for j in outcome.abandoned:
            buf = jobs[j][4]
            if buf is not None:
                self._staging.quarantine(buf)
        return outcome

    def _shrink(self, key: ChunkKey, out: list[HostBuffer | None], i: int) -> None:
        """Move a small object read into a big guessed buffer to a buffer of its size: callers
        may keep the returned view (and so the buffer) for long."""
        buf = out[i]
        size = self._announced(key, buf)
        if buf is None or not size or buf.nbytes - size < _SHRINK_SLACK or size > buf.nbytes // 2:
            return
        small = self._staging.allocate(size)
        small.tensor.copy_(buf.tensor[:size])
        out[i] = small
        buf.release()

    def _announced(self, key: ChunkKey, buf: HostBuffer | None) -> int:
        """Header + payload bytes the stored header announces (0 if the header is bad)."""
        if buf is None:
            return 0
        try:
            length, _ = decode_header(key, buf.tensor[:HEADER_BYTES].numpy().data)
        except CorruptDataError:
            return 0
        size = HEADER_BYTES + length
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


def _nbytes(buf: HostBuffer | None) -> int:
    return 0 if buf is None else buf.nbytes
