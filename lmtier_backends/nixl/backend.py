"""The ``nixl`` tier: KV chunks moved by NVIDIA NIXL from registered host memory to storage.

One NIXL agent per tier instance, with exactly one storage plugin:

* ``posix`` - one file per chunk under a root (FILE_SEG), index rebuilt at open, persistent
  (:mod:`lmtier_backends.nixl._posix`);
* ``obj`` - one object per chunk in an S3 bucket (OBJ_SEG), persistent and shared
  (:mod:`lmtier_backends.nixl._obj`).

Data path: a put stages each value's codec header (magic, version, length, checksum, key) in a
buffer carved from NIXL-registered staging slabs (:mod:`._staging`); posix has NIXL write a big
payload straight from the caller's buffer behind it, while small payloads and obj objects are
copied behind the header into staging (an object is one PUT). A get has NIXL read into staging,
checks header and checksum, and returns a read-only zero-copy view of the payload that holds its
staging range until the view is garbage collected.
A value that fails the check is a miss: deleted and counted (``stats()["corrupt"]``); a value of
a newer format is a miss left in place (``stats()["newer_format"]``). ``contains`` reads headers
(64 bytes per key), so it counts neither. Values keep their codec id and raw length
(:class:`~lmtier.protocol.SupportsCodecs`): the header a put writes carries them, ``get`` returns
an encoded value as a :class:`~lmtier.kit.Payload` carrying them, ``get_into`` serves raw values
only (an encoded one is a plain miss there; the manager reads a codec tier with ``get``).

Names follow :mod:`lmtier.kit.naming`: posix files are laid out as the ``disk`` tier's, and obj
objects named as the ``s3`` tier's, so a store written by one transport is read by the other.

Concurrency: every NIXL call runs on a :class:`lmtier.kit.WorkerPool` of ``io_threads`` worker
threads, which post the requests and poll them (:mod:`._xfer`); the event loop only awaits
those threads. A batch is split into up to ``io_threads`` pieces, so checksums run on several
cores. Cancelling a call never frees memory a transfer still uses: the worker finishes, releases
handles, fds and buffers itself (a cancelled ``put`` or ``get_into`` returns once nothing uses
the caller's buffers), and :meth:`NixlBackend.aclose` waits for every worker before
deregistering the slabs. Failures are mapped to the lmtier error tree in one place
(:mod:`._errors`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from lmtier.errors import BackendError, BackendUnavailableError, ConfigError, CorruptDataError
from lmtier.framing import (
    CODEC_NONE,
    HEADER_BYTES,
    READABLE_CODECS,
    Header,
    NewerFormatError,
    checksum,
    decode_header,
)
from lmtier.keys import ChunkKey
from lmtier.kit import (
    AsyncClosing,
    CancelToken,
    KeyFaults,
    Rejections,
    StoreItem,
    WorkerPool,
    check_stored,
    into_views,
    put_items,
    stored_value,
)
from lmtier.memory import HostBuffer, release_all
from lmtier.protocol import Buffer, Capabilities
from lmtier_backends.nixl import _nixl
from lmtier_backends.nixl._batched import Batched
from lmtier_backends.nixl._errors import map_error
from lmtier_backends.nixl._staging import StagingPool
from lmtier_backends.nixl._xfer import CallerBuffer, RegistrationRefused

if TYPE_CHECKING:

    from lmtier_backends.nixl.config import NixlConfig, ObjOptions

__all__ = ["NixlBackend", "open_nixl_backend"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_S3_MAX_OBJECT = 5 << 30  # a single S3 PUT
# Why a floor: below it one memcpy into staging costs less than the second NIXL request that an
# in-place payload needs (the header is always its own request then).
_DIRECT_PUT_MIN_BYTES = 256 << 10


async def open_nixl_backend(config: NixlConfig) -> NixlBackend:
    """Open a tier (the registry's factory): start the agent and plugin, and probe the store.

    Raises:
        PluginError: NIXL is not installed (the message carries ``pip install 'lmtier[nixl]'``).
        ConfigError: the plugin cannot load on this host (the message lists those that can), the
            posix root is not writable, or the S3 endpoint rejects the credentials / lacks the
            bucket.
        BackendUnavailableError: the S3 endpoint cannot be reached.
    """
    backend = NixlBackend(config)
    try:
        await backend._run("open", lambda _token: backend._open_sync())
    except BaseException:
        await backend.aclose()
        raise
    return backend


class NixlBackend(AsyncClosing):
    """A NIXL-backed tier; open it with :func:`open_nixl_backend`."""

    # Why one lock for the class: the AWS SDK inside NIXL's OBJ plugin reads its retry settings
    # from os.environ (the process's) while the plugin starts, so the process's NIXL tiers take
    # turns setting them: two tiers opening at once must not see each other's values.
    _env_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: NixlConfig) -> None:
        self.config = config
        self.tier = f"nixl/{config.plugin}"
        self._workers = WorkerPool(config.io_threads, f"nixl-{config.plugin}")
        self._rejects = Rejections(self.tier)
        self._faults = KeyFaults(self.tier, lambda exc, op: map_error(exc, tier=self.tier, op=op))
        self._agent: Any = None
        self._staging: StagingPool | None = None
        self._store: Batched | None = None
        self._opened = False
        self._closed = False
        self._counts = {"gets": 0, "hits": 0, "puts": 0, "bytes_read": 0, "bytes_written": 0,
                        "get_into_direct": 0}
        self._counts_lock = threading.Lock()

    #: values keep their codec id and raw length (lmtier.protocol.SupportsCodecs)
    carries_codecs = True

    # -- protocol --------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        limit = int(self.config.max_staging_bytes) - HEADER_BYTES
        if self.config.plugin == "obj":
            return Capabilities(persistent=True, shared=True, evicts=False,
                                max_item_bytes=min(limit, _S3_MAX_OBJECT - HEADER_BYTES))
        assert self.config.posix is not None
        return Capabilities(persistent=True, shared=False, evicts=self.config.posix.max_bytes is not None,
                            max_item_bytes=limit)

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether a ``get`` would serve each key: headers are read and checked (64 bytes per
        key), so a damaged or newer-format value is not counted."""
        if not keys:
            self._check_open()
            return []
        unique = list(dict.fromkeys(keys))
        usable = self._faults.settle("contains", unique, await self._run("contains", self._usable_sync, unique), False)
        found = dict(zip(unique, usable, strict=True))
        return [found[k] for k in keys]

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        if not keys:
            self._check_open()
            return []
        unique = list(dict.fromkeys(keys))
        values = await self._read_pieces("get", self._get_sync, unique, lambda lo, hi: (unique[lo:hi],), None)
        found = dict(zip(unique, values, strict=True))
        return [found[k] for k in keys]

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        """Fill ``outs[i]`` with ``keys[i]``'s payload (one copy out of staging); False on a miss,
        a size mismatch or corrupt data."""
        views = into_views(keys, outs)
        if not keys:
            self._check_open()
            return []
        # buffers that overlap go through staging on one worker (two reads into one buffer would
        # fail each other's check), so they must not be split across workers either
        whole = _overlapping([CallerBuffer.of(v) for v in views])
        return await self._read_pieces("get_into", self._get_into_sync, keys,
                                       lambda lo, hi: (list(keys[lo:hi]), views[lo:hi]), False, split=not whole)

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        # the whole batch is checked first; the last value of a key wins
        batch = put_items(items, tier=f"{self.tier} (max_staging_bytes)",
                          max_item_bytes=self.capabilities.max_item_bytes)
        if not batch:
            self._check_open()
            return
        await self._run_pieces("put", self._put_sync, len(batch), lambda lo, hi: (batch[lo:hi],))

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        if not keys:
            self._check_open()
            return
        await self._run("delete", self._remove_sync, list(dict.fromkeys(keys)))

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            out: dict[str, Any] = dict(self._counts)
        out.update(self._rejects.stats())
        out.update(self._faults.stats())
        if self._store is not None:
            out.update(self._store.stats())
        if self._staging is not None:
            out["staging_slabs"] = self._staging.slabs
            out["staging_bytes"] = self._staging.registered_bytes
            out["staging_outstanding"] = self._staging.outstanding()
            out["quarantined_bytes"] = self._staging.quarantined_bytes
        return out

    async def aclose(self) -> None:
        """Wait for running transfers, then release the store, deregister staging, drop the agent."""
        if self._closed:
            return
        self._closed = True
        # workers may hold NIXL handles and staging: never tear down under them
        await self._workers.aclose(warn_after_s=self.config.xfer_timeout_s + 10, last=self._teardown_sync)


    # -- the event-loop side ---------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self.tier}: the tier is closed")

    async def _run(self, op: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(token, *args)`` on a worker thread; map its failures to lmtier errors."""
        (value,) = await self._run_calls(op, [functools.partial(_call, fn, args)])
        return value  # type: ignore[no-any-return]

    async def _run_pieces(self, op: str, fn: Callable[..., T], n: int,
                          args: Callable[[int, int], tuple[Any, ...]], *, split: bool = True) -> list[T]:
        """Split a batch of ``n`` items into up to ``io_threads`` contiguous pieces (one unless
        ``split``), each run as ``fn(token, *args(lo, hi))`` on its own worker; their results in
        order.

        Why: NIXL serialises calls on the agent, but checksums (xxh3 releases the GIL) and header
        encoding then run on several cores, overlapping the next piece's transfer (puts of 37.7
        MB chunks 1.2-1.4x faster on 2 busy cores; see docs/backends/nixl.md). Every piece
        finishes (or, cancelled, lets go of caller memory) before this returns or raises the
        first error: no worker outlives the call on the caller's buffers.
        """
        k = max(1, min(self.config.io_threads, n)) if split else 1
        bounds = [n * i // k for i in range(k + 1)]
        return await self._run_calls(op, [functools.partial(_call, fn, args(lo, hi))
                                          for lo, hi in itertools.pairwise(bounds)])

    async def _read_pieces(self, op: str, fn: Callable[..., list[Any]], keys: Sequence[ChunkKey],
                           args: Callable[[int, int], tuple[Any, ...]], miss: Any, *, split: bool = True) -> list[Any]:
        """:meth:`_run_pieces` for reads, settled key by key (:class:`lmtier.kit.KeyFaults`): a key
        whose file or object could not be read, or whose piece failed, is a miss while the other
        keys are served; only a batch of which no key was answered raises."""
        self._check_open()
        k = max(1, min(self.config.io_threads, len(keys))) if split else 1
        bounds = [len(keys) * i // k for i in range(k + 1)]
        outcomes = await self._workers.run([functools.partial(_call, fn, args(lo, hi))
                                            for lo, hi in itertools.pairwise(bounds)])
        if self._closed:  # closed under the batch: its pieces not yet run failed, and so does it
            outcomes.clear()  # (staging views go back now, not with the traceback)
            self._check_open()
        answers: list[Any] = []
        for (lo, hi), outcome in zip(itertools.pairwise(bounds), outcomes, strict=True):
            answers.extend(outcome.value if outcome.ok else [outcome.error] * (hi - lo))  # type: ignore[arg-type]
        outcomes.clear()
        return self._faults.settle(op, keys, answers, miss)

    async def _run_calls(self, op: str, calls: list[Callable[[CancelToken], T]]) -> list[T]:
        self._check_open()
        outcomes = await self._workers.run(calls)
        failed = next((o.error for o in outcomes if not o.ok), None)
        if failed is not None:
            outcomes.clear()  # the views of pieces that did finish go back now, not with the traceback
            raise map_error(failed, tier=self.tier, op=op) from failed
        return [o.value for o in outcomes]  # type: ignore[misc]

    # -- the worker side -------------------------------------------------------------------------
    def _open_sync(self) -> None:
        cfg = self.config
        api = _nixl.load_api()
        name = f"lmtier-{cfg.plugin}-{os.getpid()}-{os.urandom(4).hex()}"
        if cfg.plugin == "posix":
            from lmtier_backends.nixl._posix import PLUGIN, PosixStore

            assert cfg.posix is not None
            self._agent = _posix_agent(api, name, PLUGIN, cfg.posix.params)
            self._staging = self._new_staging(PLUGIN)
            self._store = Batched(PosixStore(self._agent, name, cfg.posix, self._staging, timeout_s=cfg.xfer_timeout_s),
                                  cfg.batch_descriptors)
        else:
            assert cfg.obj is not None
            self._open_obj(api, name, cfg.obj)
        self._opened = True

    def _open_obj(self, api: Any, name: str, opts: ObjOptions) -> None:
        from lmtier_backends.nixl._obj import PLUGIN, ObjStore
        from lmtier_backends.nixl._s3rest import S3Rest, S3Target

        try:
            creds = opts.credentials()
        except ValueError as exc:
            raise ConfigError(f"{self.tier}: {exc}") from None
        access, secret = creds if creds is not None else (None, None)
        assert opts.scheme is not None
        target = S3Target(opts.bucket, opts.region, opts.scheme, opts.endpoint_override,
                          opts.use_virtual_addressing, access, secret)
        rest = S3Rest(target)
        _probe_bucket(rest)
        params = {
            "bucket": opts.bucket, "region": opts.region, "scheme": opts.scheme,
            "use_virtual_addressing": "true" if opts.use_virtual_addressing else "false",
            "num_threads": str(opts.num_threads),
        }
        if opts.endpoint_override:
            params["endpoint_override"] = opts.endpoint_override
        env = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": str(opts.max_attempts)}
        if access is not None and secret is not None:
            params.update(access_key=access, secret_key=secret)
            env["AWS_EC2_METADATA_DISABLED"] = "true"  # explicit keys: never wait on an IMDS lookup
        params.update(opts.params)
        self._agent = _nixl.create_agent(api, name, PLUGIN, params, env=env, env_lock=self._env_lock)
        self._staging = self._new_staging(PLUGIN)
        store = ObjStore(self._agent, name, opts, self._staging, rest, timeout_s=self.config.xfer_timeout_s)
        self._store = Batched(store, self.config.batch_descriptors)
        try:
            store.exists([ChunkKey("0" * 16, bytes(16))])
        except Exception as exc:
            raise ConfigError(
                f"{self.tier}: {target.url} answers HEAD on bucket {opts.bucket!r}, but NIXL's OBJ plugin "
                f"cannot query it with these options ({type(exc).__name__}: {exc}); check region, scheme, "
                "use_virtual_addressing and params"
            ) from None

    def _new_staging(self, plugin: str) -> StagingPool:
        cfg = self.config
        staging = StagingPool(self._agent, plugin, slab_bytes=int(cfg.staging_slab_bytes),
                              max_bytes=int(cfg.max_staging_bytes), pinned=cfg.pinned, name=self.tier)
        staging.prime()
        return staging

    def _live_store(self) -> Batched:
        store = self._store
        if store is None or self._closed:
            raise BackendError(f"{self.tier}: the tier is closed")
        return store

    def _usable_sync(self, token: CancelToken, keys: list[ChunkKey]) -> list[bool | OSError]:
        return self._live_store().usable(keys)

    def _get_sync(self, token: CancelToken, keys: list[ChunkKey]) -> list[Buffer | BaseException | None]:
        raw = self._live_store().read(keys)
        out: list[Buffer | BaseException | None] = []
        corrupt: list[ChunkKey] = []
        try:
            for key, got in zip(keys, raw, strict=True):
                if got is None or isinstance(got, BaseException):
                    out.append(got)  # a miss, or the fault of this key
                    continue
                try:
                    out.append(_payload_view(key, got))
                except (CorruptDataError, NewerFormatError) as exc:
                    if self._rejects.note(key, exc) == "corrupt":
                        corrupt.append(key)
                    out.append(None)
        finally:
            release_all(raw, shared=True)
        values = [v for v in out if v is not None and not isinstance(v, BaseException)]
        self._count(gets=len(keys), hits=len(values), bytes_read=sum(memoryview(v).nbytes for v in values))
        self._drop_corrupt(corrupt)
        return out

    def _get_into_sync(self, token: CancelToken, keys: list[ChunkKey], outs: list[memoryview]
                       ) -> list[bool | BaseException]:
        """NIXL reads payloads straight into the caller's buffers (registered for the call) and
        headers into staging; the checksum is then verified in place."""
        with token.touching_caller_memory():  # until NIXL and this thread are done with ``outs``
            store = self._live_store()
            callers = [CallerBuffer.of(o) for o in outs]
            raw: list[HostBuffer | bytes | BaseException | None]
            try:
                if _overlapping(callers):  # two reads into one buffer would fail each other's check
                    raise RegistrationRefused("caller buffers overlap")
                raw = list(store.read_into(keys, callers))
                self._count(get_into_direct=len(keys))
            except RegistrationRefused as exc:
                log.debug("%s: get_into through staging (%s)", self.tier, exc)
                raw = self._read_shared(store, keys)
            filled, corrupt, recheck = self._fill_all(keys, outs, raw)
            if recheck:  # a payload failed its check in the caller's buffer: verify in staging first
                again = self._read_shared(store, [keys[i] for i in recheck])
                redo, more, _ = self._fill_all([keys[i] for i in recheck], [outs[i] for i in recheck], again)
                for i, ok in zip(recheck, redo, strict=True):
                    filled[i] = ok
                corrupt += [k for k in more if k not in corrupt]
            self._count(gets=len(keys), hits=sum(f is True for f in filled),
                        bytes_read=sum(o.nbytes for o, f in zip(outs, filled, strict=True) if f is True))
            self._drop_corrupt(corrupt)
            return filled

    def _read_shared(self, store: Batched, keys: list[ChunkKey]) -> list[HostBuffer | bytes | BaseException | None]:
        """Whole values through staging, one read per distinct key (a repeated key shares it)."""
        unique = list(dict.fromkeys(keys))
        found = dict(zip(unique, store.read(unique), strict=True))
        return [found[k] for k in keys]

    def _fill_all(self, keys: list[ChunkKey], outs: list[memoryview], raw: list[HostBuffer | bytes | BaseException | None]
                  ) -> tuple[list[bool | BaseException], list[ChunkKey], list[int]]:
        """Finish get_into for each key; returns (filled or the key's fault, corrupt keys, indices to
        recheck). Releases every buffer in ``raw``."""
        filled: list[bool | BaseException] = []
        corrupt: list[ChunkKey] = []
        recheck: list[int] = []
        try:
            for i, (key, dest, got) in enumerate(zip(keys, outs, raw, strict=True)):
                if isinstance(got, BaseException):
                    filled.append(got)
                    continue
                try:
                    filled.append(got is not None and _fill(key, got, dest))
                except _Recheck:
                    recheck.append(i)
                    filled.append(False)
                except (CorruptDataError, NewerFormatError) as exc:
                    if self._rejects.note(key, exc) == "corrupt" and key not in corrupt:
                        corrupt.append(key)
                    filled.append(False)
        finally:
            release_all(raw, shared=True)
        return filled, corrupt, recheck

    def _put_sync(self, token: CancelToken, items: list[StoreItem]) -> None:
        """Write the batch; returns (or is let go of when cancelled) once the caller's buffers
        are no longer read."""
        try:
            self._write(token, items, direct=self.config.plugin == "posix")
        except RegistrationRefused as exc:  # NIXL would not take the caller's memory: copy it
            log.debug("%s: put through staging (%s)", self.tier, exc)
            self._write(token, items, direct=False)
        self._count(puts=len(items), bytes_written=sum(it.nbytes for it in items))

    def _write(self, token: CancelToken, items: list[StoreItem], *, direct: bool) -> None:
        """posix (``direct``): a payload of at least ``_DIRECT_PUT_MIN_BYTES`` is written by NIXL
        from the caller's buffer in place, behind a header staged on its own. Otherwise header and
        payload are copied into one staging buffer (obj: an object is one PUT, whole)."""
        staged: list[tuple[ChunkKey, HostBuffer, CallerBuffer | None]] = []
        in_place = False
        try:
            with token.touching_caller_memory():  # a cancelled put waits until the caller's bytes are copied
                for item in items:
                    view = item.view
                    if direct and view.nbytes >= _DIRECT_PUT_MIN_BYTES:
                        buf = self._staging_pool().allocate(HEADER_BYTES)
                        staged.append((item.key, buf, CallerBuffer.of(view)))
                        in_place = True
                        # summed over the caller's bytes (or carried): the caller must not change
                        # them until put returns
                        buf.tensor.numpy()[:] = np.frombuffer(item.header(), dtype=np.uint8)
                        continue
                    buf = self._staging_pool().allocate(HEADER_BYTES + view.nbytes)
                    staged.append((item.key, buf, None))
                    arr = buf.tensor.numpy()
                    payload = arr[HEADER_BYTES:]
                    payload[:] = np.frombuffer(view, dtype=np.uint8)
                    # without a carried checksum, the staged copy is summed: what is stored is what was
                    # summed (unless another tier of the value is summing it right now: its pass is used)
                    csum = item.settle_checksum(functools.partial(checksum, payload.data))
                    arr[:HEADER_BYTES] = np.frombuffer(item.header(csum), dtype=np.uint8)
                if in_place:  # NIXL reads the caller's buffers: still inside
                    self._live_store().write(staged)
            if not in_place:
                self._live_store().write(staged)
        finally:
            for _, buf, _ in staged:
                buf.release()

    def _remove_sync(self, token: CancelToken, keys: list[ChunkKey]) -> None:
        self._live_store().remove(keys)

    def _drop_corrupt(self, keys: list[ChunkKey]) -> None:
        if not keys:
            return
        try:
            self._live_store().remove(keys)
        except Exception as exc:  # the miss stands; the entry is retried next time it is read
            log.warning("%s: could not delete %d corrupt entries: %s", self.tier, len(keys), exc)

    def _staging_pool(self) -> StagingPool:
        if self._staging is None:
            raise BackendError(f"{self.tier}: the tier is closed")
        return self._staging

    def _teardown_sync(self) -> None:
        store, staging, agent = self._store, self._staging, self._agent
        self._store = self._staging = self._agent = None
        try:
            if store is not None:
                store.close()
        finally:
            if staging is not None:
                try:
                    staging.close()
                except Exception as exc:
                    log.warning("%s: deregistering staging memory failed: %s", self.tier, exc)
            del agent  # the last reference: NIXL destroys the agent and its plugin here

    def _count(self, **deltas: int) -> None:
        with self._counts_lock:
            for name, delta in deltas.items():
                self._counts[name] += delta


def _call(fn: Callable[..., Any], args: tuple[Any, ...], token: CancelToken) -> Any:
    return fn(token, *args)


_POSIX_QUEUE_KEYS = frozenset({"use_uring", "use_aio", "use_posix_aio"})


def _posix_agent(api: Any, name: str, plugin: str, params: dict[str, str]) -> Any:
    """An agent with the POSIX plugin on io_uring unless ``params`` choose a queue; NIXL's
    default (Linux AIO) where io_uring cannot start (old kernels, seccomp-filtered containers).

    Why io_uring: with AIO, buffered file I/O happens inside io_submit, so a tier's requests run
    one by one under the agent's lock; io_uring hands them to kernel workers (docs/backends/nixl.md).
    """
    if _POSIX_QUEUE_KEYS & params.keys():
        return _nixl.create_agent(api, name, plugin, params)
    try:
        return _nixl.create_agent(api, name, plugin, {**params, "use_uring": "true"})
    except ConfigError as exc:
        log.info("nixl/posix: io_uring unavailable (%s); using NIXL's default I/O queue", exc)
        return _nixl.create_agent(api, name, plugin, params)


def _probe_bucket(rest: Any) -> None:
    """HEAD the bucket once, so a wrong endpoint, key or bucket fails at open with a clear message."""
    import http.client

    t = rest.target
    try:
        status = rest.head_bucket()
    except (OSError, http.client.HTTPException) as exc:
        raise BackendUnavailableError(
            f"nixl/obj: cannot reach the S3 endpoint {t.url} ({exc}); is the server running?"
        ) from None
    if status in (401, 403):
        raise ConfigError(
            f"nixl/obj: the S3 endpoint {t.url} rejected the credentials for bucket {t.bucket!r} "
            f"(HTTP {status}, access_key={t.access_key!r}); check obj.access_key and obj.secret_key"
        )
    if status == 404:
        raise ConfigError(f"nixl/obj: bucket {t.bucket!r} does not exist at {t.url}; create it first")
    if status >= 300:
        raise ConfigError(
            f"nixl/obj: {t.url} answered HTTP {status} to HEAD on bucket {t.bucket!r}; check region, "
            "scheme, endpoint_override and use_virtual_addressing"
        )


class _Recheck(Exception):
    """A payload read into caller memory failed its checksum; verify the stored value in staging."""


def _overlapping(buffers: Sequence[CallerBuffer]) -> bool:
    spans = sorted((b.address, b.address + b.nbytes) for b in buffers if b.nbytes)
    return any(start < prev_end for (_, prev_end), (start, _) in itertools.pairwise(spans))


def _fill(key: ChunkKey, got: HostBuffer | bytes, dest: memoryview) -> bool:
    """Complete a get_into for one key: ``got`` is the stored header (payload already in ``dest``)
    or the whole stored value (copied into ``dest``). False on a size mismatch; CorruptDataError
    when the stored bytes fail validation."""
    if isinstance(got, HostBuffer) and got.nbytes == HEADER_BYTES:
        header = got.tensor.numpy().data
        head = decode_header(key, header, codecs=READABLE_CODECS)
        if head.payload_length != dest.nbytes or head.codec != CODEC_NONE:  # an encoded value: get serves it
            return False
        try:
            check_stored(key, header, dest)
        except CorruptDataError:
            raise _Recheck from None  # real corruption, or the caller wrote its buffer meanwhile
        return True
    payload, head = _checked_payload(key, got)
    if payload.nbytes != dest.nbytes or head.codec != CODEC_NONE:
        return False
    dest[:] = payload
    return True


def _checked_payload(key: ChunkKey, got: HostBuffer | bytes) -> tuple[memoryview, Header]:
    """The validated payload of a stored value (a view of ``got``) and its header;
    CorruptDataError otherwise (NewerFormatError for a format or codec this reader lacks)."""
    data = got.tensor.numpy().data if isinstance(got, HostBuffer) else memoryview(got)
    head = decode_header(key, data, codecs=READABLE_CODECS)
    if HEADER_BYTES + head.payload_length > data.nbytes:
        raise CorruptDataError(f"{key}: value is {data.nbytes} bytes, its header announces "
                               f"{HEADER_BYTES + head.payload_length}")
    payload = data[HEADER_BYTES: HEADER_BYTES + head.payload_length]
    check_stored(key, data[:HEADER_BYTES], payload, codecs=READABLE_CODECS)
    return payload, head


def _payload_view(key: ChunkKey, got: HostBuffer | bytes) -> Buffer:
    """A read-only view of the validated payload that keeps its staging range alive (a
    :class:`~lmtier.kit.Payload` carrying codec id and raw length when it is encoded).

    The view is a fresh numpy array over a lease of the buffer, so
    :func:`lmtier.memory.host_tensor_of` does not mistake it for the whole buffer (header
    included) and callers copy through the buffer protocol.
    """
    payload, head = _checked_payload(key, got)
    if not isinstance(got, HostBuffer) or payload.nbytes == 0:
        return stored_value(memoryview(bytes(payload)), head)
    lease = got.lease_view()
    return stored_value(np.frombuffer(lease, dtype=np.uint8, count=payload.nbytes, offset=HEADER_BYTES).data, head)
