"""The ``s3`` tier: one object per chunk, ``<prefix>/<str(key)>``, in an S3 bucket.

Each object is the 64-byte :mod:`lmtier.framing` header (key, length, xxh3 checksum) followed by
the payload; a read that fails the check is a miss, the object is deleted and counted
(``stats()["corrupt"]``).

boto3 is blocking, so every request runs on a bounded thread pool (``max_concurrency`` workers,
as many pooled HTTP connections) and a batch's requests run concurrently on it. Objects from
``multipart_threshold`` up are uploaded in parts, concurrently, from the event loop (no worker
ever waits on another, so the pool cannot deadlock). Bodies stream the header then the caller's
buffer without concatenating them, and reads land in the destination buffer directly
(:mod:`._io`). ``get`` receives payloads of 256 KiB or more into a reused host slab
(``recv_pool_bytes``) and returns read-only lease views of it: fresh memory would cost a page
fault per 4 KiB, which made big gets 1.5-2x slower than reads into warm memory where measured.

Overwrites always win (the contract), but chunk keys name their content, so re-putting a chunk
usually means identical bytes. With ``skip_identical_puts`` a put is conditional
(``If-None-Match: *``); a 412 says the key exists, and the upload is skipped only if the stored
header equals the new one (same key, length and checksum); otherwise it is rewritten
unconditionally. With ``Expect: 100-continue`` the server refuses before the body is sent.

Cancellation (e.g. the manager's ``timeout_s``) returns at once, except that a ``get_into``
caught while writing the caller's buffer first shuts its socket and waits for the worker to
stop, so no thread writes caller memory after the call has unwound (:class:`._io.CallGuard`).

Errors are translated in one place, :mod:`._errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import SecretStr

from lmtier.buffers import as_bytes_view
from lmtier.errors import (
    BackendError,
    CapacityError,
    ConfigError,
    CorruptDataError,
    InvalidArgumentError,
)
from lmtier.framing import HEADER_BYTES, checksum, decode, decode_header, encode_header
from lmtier.keys import ChunkKey
from lmtier.protocol import Buffer, Capabilities
from lmtier_backends.s3._errors import (
    error_status,
    is_not_found,
    is_not_implemented,
    is_precondition_failed,
    translate,
    translate_open,
)
from lmtier_backends.s3._io import CallGuard, HeaderedBody, finish_response, read_exact_into, response_socket

if TYPE_CHECKING:
    from types import TracebackType

    from lmtier.memory import HostBuffer, HostMemoryPool
    from lmtier_backends.s3.config import S3Config

__all__ = ["S3Backend", "open_s3_backend"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
_POOLED_MIN = 256 << 10  # get() receives payloads from this size into the warm slab
_DELETE_BATCH = 1000  # S3's limit on keys per DeleteObjects
_CONTENT_RANGE_TOTAL = re.compile(r"/(\d+)$")


class _Credentials:
    """Keys read from the environment variables the config names; never printed."""

    __slots__ = ("access_key", "secret_key", "session_token")

    def __init__(self, config: S3Config) -> None:
        def read(var: str | None, what: str) -> SecretStr | None:
            if var is None:
                return None
            value = os.environ.get(var)
            if not value:
                raise ConfigError(f"s3 tier: environment variable {var} (the {what}) is not set or empty")
            return SecretStr(value)

        self.access_key = read(config.access_key_env, "access key id named by access_key_env")
        self.secret_key = read(config.secret_key_env, "secret key named by secret_key_env")
        self.session_token = read(config.session_token_env, "session token named by session_token_env")

    def __repr__(self) -> str:
        return "_Credentials(<hidden>)"


@functools.cache
def _shared_loader() -> Any:
    """One botocore model loader for the process.

    Why shared: every new session parses botocore's S3 service model again (~1 s on a 2-core
    machine, per tier opened); the parsed model is immutable data, so sharing it is safe.
    """
    import botocore.loaders

    return botocore.loaders.create_loader(os.environ.get("AWS_DATA_PATH"))


def _make_client(config: S3Config) -> Any:
    """A thread-safe boto3 S3 client configured from ``config`` (blocking: run it in a thread)."""
    import boto3
    import botocore.exceptions as bce
    import botocore.session
    from botocore.config import Config

    creds = _Credentials(config)
    region = config.region or (None if config.endpoint_url is None else "us-east-1")
    s3_options: dict[str, Any] = {"addressing_style": config.addressing_style}
    if config.sign_payload is not None:
        s3_options["payload_signing_enabled"] = config.sign_payload
    client_config = Config(
        signature_version="s3v4",
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        retries={"max_attempts": config.max_attempts, "mode": config.retry_mode},
        max_pool_connections=config.max_concurrency + 2,
        request_checksum_calculation="when_required",  # the codec checksums values; faster
        response_checksum_validation="when_required",
        s3=s3_options,  # type: ignore[arg-type]
        user_agent_extra="lmtier",
    )
    secret = lambda s: None if s is None else s.get_secret_value()  # noqa: E731
    try:
        core = botocore.session.Session(profile=config.profile)
        core.register_component("data_loader", _shared_loader())
        session = boto3.session.Session(
            botocore_session=core,
            region_name=region,
            aws_access_key_id=secret(creds.access_key),
            aws_secret_access_key=secret(creds.secret_key),
            aws_session_token=secret(creds.session_token),
        )
        return session.client("s3", endpoint_url=config.endpoint_url, config=client_config)
    except (bce.ProfileNotFound, bce.NoRegionError, bce.InvalidRegionError) as exc:
        raise ConfigError(f"s3 tier: {exc}; check `profile` and `region`") from None
    except ValueError as exc:  # botocore rejects malformed endpoint URLs with ValueError
        raise ConfigError(f"s3 tier: invalid endpoint_url {config.endpoint_url!r}: {exc}") from None


async def open_s3_backend(config: S3Config) -> S3Backend:
    """Build the tier and check the bucket (the registry awaits this factory).

    Raises:
        ConfigError: credentials missing or rejected, bucket missing (and ``create_bucket`` is
            false), bad region/endpoint.
        BackendUnavailableError: the endpoint cannot be reached now.
    """
    client = await asyncio.to_thread(_make_client, config)
    backend = S3Backend(config, client)
    try:
        await backend._run(backend._check_bucket, op="open", where=f"bucket {config.bucket!r}")
        if config.recv_pool_bytes:  # now, not on the first get: it imports torch (seconds, once)
            await asyncio.to_thread(backend._receive_pool)
    except BaseException:
        await backend.aclose()
        raise
    return backend


class S3Backend:
    """Chunks as S3 objects; persistent and shared between processes and hosts.

    Build it with :func:`open_s3_backend` (checks the bucket); the constructor does no I/O.
    """

    def __init__(self, config: S3Config, client: Any) -> None:
        self.config = config
        self._client = client
        self._bucket = config.bucket
        self._prefix = f"{config.prefix}/" if config.prefix else ""
        self._pool = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="lmtier-s3")
        self._conditional_puts = config.skip_identical_puts
        self._max_item_bytes = int(config.multipart_part_size) * _MAX_PARTS - HEADER_BYTES
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            ("gets", "hits", "misses", "corrupt", "puts", "skipped_identical", "multipart_puts",
             "deletes", "bytes_read", "bytes_written", "errors", "writing_caller_buffers",
             "recv_pool_fallbacks"), 0)
        self._closed = False
        self._recv_pool: HostMemoryPool | None = None  # made at open (imports torch)
        self._recv_pool_lock = threading.Lock()

    # -- contract ----------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=True, shared=True, evicts=False, max_item_bytes=self._max_item_bytes)

    def object_name(self, key: ChunkKey) -> str:
        """The S3 key under which ``key`` is stored."""
        return f"{self._prefix}{key}"

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        self._check_open()
        _check_keys(keys)
        unique = list(dict.fromkeys(keys))
        found = await self._run_many("head", [(self._head, (k,), self.object_name(k)) for k in unique])
        answer = dict(zip(unique, found, strict=True))
        return [answer[k] for k in keys]

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        self._check_open()
        _check_keys(keys)
        unique = list(dict.fromkeys(keys))
        values = await self._run_many("get", [(self._get_one, (k,), self.object_name(k)) for k in unique])
        answer = dict(zip(unique, values, strict=True))
        return [answer[k] for k in keys]

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        """Stream each object straight into ``outs[i]`` (writable, exactly the payload size)."""
        self._check_open()
        _check_keys(keys)
        if len(keys) != len(outs):
            raise InvalidArgumentError(f"get_into: {len(keys)} keys but {len(outs)} output buffers")
        views = [as_bytes_view(o) for o in outs]
        for v in views:
            if v.readonly:
                raise InvalidArgumentError("get_into: output buffers must be writable")
        return await self._run_many(
            "get", [(self._get_into_one, (k, v), self.object_name(k)) for k, v in zip(keys, views, strict=True)]
        )

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        self._check_open()
        _check_keys([k for k, _ in items])
        latest: dict[ChunkKey, memoryview] = {}
        for key, value in items:  # validate the whole batch before any I/O; the last duplicate wins
            view = as_bytes_view(value)
            if view.nbytes > self._max_item_bytes:
                raise CapacityError(
                    f"s3 tier: a {view.nbytes}-byte value needs more than {_MAX_PARTS} parts of "
                    f"{int(self.config.multipart_part_size)} bytes; raise multipart_part_size"
                )
            latest[key] = view
        threshold = int(self.config.multipart_threshold)
        small = [(self._put_single, (k, v), self.object_name(k))
                 for k, v in latest.items() if HEADER_BYTES + v.nbytes < threshold]
        big = [self._put_multipart(k, v) for k, v in latest.items() if HEADER_BYTES + v.nbytes >= threshold]
        if not big:
            await self._run_many("put", small)
            return
        await _gather_all([self._run_many("put", small), *big])

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check_open()
        _check_keys(keys)
        names = list(dict.fromkeys(self.object_name(k) for k in keys))
        batches = [names[i : i + _DELETE_BATCH] for i in range(0, len(names), _DELETE_BATCH)]
        await self._run_many("delete", [(self._delete_batch, (b,), f"{len(b)} objects") for b in batches])

    def stats(self) -> dict[str, Any]:
        """Counters since open: gets/hits/misses, puts/skipped_identical, corrupt, errors, bytes."""
        with self._lock:
            return dict(self._counts)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # in-flight workers finish (or time out) before the client's connections are closed
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        with contextlib.suppress(Exception):
            self._client.close()
        if self._recv_pool is not None:
            self._recv_pool.close()  # the slab is freed once the last returned view is dropped

    async def __aenter__(self) -> S3Backend:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"S3Backend(bucket={self._bucket!r}, prefix={self.config.prefix!r}, endpoint={self.config.endpoint_url!r})"

    # -- running blocking calls ------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any, op: str, where: str,
                   guard: CallGuard | None = None) -> T:
        """One blocking call on the pool (see :meth:`_run_many`)."""
        (result,) = await self._run_many(op, [(fn, args, where)], [guard or CallGuard()])
        return result  # type: ignore[no-any-return]

    async def _run_many(self, op: str, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], str]],
                        guards: Sequence[CallGuard] | None = None) -> list[Any]:
        """Run each ``fn(guard, *args)`` on the pool; results in order, or the first error.

        Every call finishes before this returns or raises (so no worker still holds a caller's
        buffer), and errors are translated here, in one place. The event loop is woken once per
        batch, not once per item: with small objects, per-item wake-ups cost as much CPU (and
        GIL) as the requests themselves.

        On cancellation every guard stops its worker; workers writing into a caller's buffer are
        waited for (promptly: their socket is shut down), the others are left to finish alone
        (they touch no caller memory; their outcome is dropped).
        """
        if not calls:
            return []
        loop = asyncio.get_running_loop()
        batch_done: asyncio.Future[None] = loop.create_future()
        guards = list(guards) if guards is not None else [CallGuard() for _ in calls]
        lock = threading.Lock()
        finished, submitted = 0, -1  # submitted stays -1 until every call is on the pool

        def on_done(_: Future[Any]) -> None:
            nonlocal finished
            with lock:
                finished += 1
                last = finished == submitted
            if last:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                    loop.call_soon_threadsafe(_resolve, batch_done)

        futures: list[Future[Any]] = []
        # Why results travel through `slots`, not the futures: a worker thread still holds its
        # future (and the result) for a moment after the batch has resolved, so a returned view
        # of the receive slab would outlive the caller's last reference to it.
        slots: dict[int, Any] = {}
        for i, ((fn, args, _), guard) in enumerate(zip(calls, guards, strict=True)):
            try:
                cf = self._pool.submit(_into_slot, slots, i, fn, guard, *args)
            except RuntimeError:  # aclose() shut the pool down meanwhile
                break
            futures.append(cf)
            cf.add_done_callback(on_done)
        with lock:
            submitted = len(futures)
            last = finished == submitted
        if last:
            _resolve(batch_done)
        try:
            await batch_done
        except asyncio.CancelledError:
            await self._abandon(futures, guards)
            raise
        results: list[Any] = []
        first: BaseException | None = None
        finished_slots = dict(slots)
        slots.clear()  # every worker has finished; their work items may still hold the dict
        for i, (_, _, where) in enumerate(calls):
            cf_or_none = futures[i] if i < len(futures) else None
            if cf_or_none is None or cf_or_none.cancelled():  # never started: aclose() dropped it
                error: BaseException | None = BackendError(f"s3 {op} {where}: the tier was closed")
            else:
                exc = cf_or_none.exception()
                error = None if exc is None else translate(exc, op=op, where=f"s3://{self._bucket}/{where}")
                if error is not None and error is not exc:
                    error.__cause__ = exc
            if error is None:
                results.append(finished_slots.pop(i))
            else:
                self._count(errors=1)
                first = first or error
        if first is not None:
            raise first
        return results

    @staticmethod
    async def _abandon(futures: Sequence[Future[Any]], guards: Sequence[CallGuard]) -> None:
        """Stop the workers of a cancelled batch; wait for those writing caller buffers."""
        waits = []
        for cf, guard in zip(futures, guards, strict=False):
            must_wait = guard.abort()
            if not cf.cancel() and must_wait:
                waits.append(asyncio.wrap_future(cf))
        for fut in waits:
            await _wait_uninterrupted(fut)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"s3 tier (bucket {self._bucket!r}) is closed")

    # -- worker functions (run on the pool; the first argument is the call's CallGuard) -----------
    def _check_bucket(self, guard: CallGuard) -> None:
        import botocore.exceptions as bce

        endpoint = self.config.endpoint_url or "AWS"
        try:
            self._client.head_bucket(Bucket=self._bucket)
            return
        except (bce.ClientError, bce.BotoCoreError) as exc:
            if not (self.config.create_bucket and is_not_found(exc)):
                raise translate_open(exc, bucket=self._bucket, endpoint=endpoint, config=self.config) from exc
        try:
            kwargs: dict[str, Any] = {"Bucket": self._bucket}
            region = self._client.meta.region_name
            if self.config.endpoint_url is None and region not in (None, "us-east-1"):
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            self._client.create_bucket(**kwargs)
            log.info("s3 tier: created bucket %r at %s", self._bucket, endpoint)
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise translate_open(exc, bucket=self._bucket, endpoint=endpoint, config=self.config) from exc

    def _head(self, guard: CallGuard, key: ChunkKey) -> bool:
        try:
            self._client.head_object(Bucket=self._bucket, Key=self.object_name(key))
            return True
        except Exception as exc:
            if is_not_found(exc):
                return False
            raise

    def _get_object(self, name: str, **kwargs: Any) -> dict[str, Any] | None:
        """GetObject, or None if the object does not exist."""
        try:
            return self._client.get_object(Bucket=self._bucket, Key=name, **kwargs)  # type: ignore[no-any-return]
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise

    def _get_one(self, guard: CallGuard, key: ChunkKey) -> memoryview | None:
        name = self.object_name(key)
        self._count(gets=1)
        resp = self._get_object(name)
        if resp is None:
            self._count(misses=1)
            return None
        body, size = resp["Body"], int(resp["ContentLength"])
        if size - HEADER_BYTES >= _POOLED_MIN and self.config.recv_pool_bytes:
            return self._get_pooled(guard, key, name, body, size)
        # numpy: an uninitialised buffer (bytearray would zero it first)
        buf = memoryview(np.empty(size, dtype=np.uint8))  # type: ignore[arg-type]
        consumed = False
        try:
            read_exact_into(body, buf, guard)
            consumed = True
        finally:
            finish_response(body, consumed=consumed)
        try:
            payload = decode(key, buf, verify=self.config.verify_checksum)
        except CorruptDataError as exc:
            self._discard_corrupt(name, exc)
            return None
        self._count(hits=1, bytes_read=size)
        return payload.toreadonly()

    def _get_pooled(self, guard: CallGuard, key: ChunkKey, name: str, body: Any, size: int) -> memoryview | None:
        """Header into a small buffer, payload into a range of the warm slab (or a fresh buffer
        when the slab is full); returns a read-only lease view of exactly the payload."""
        header = bytearray(HEADER_BYTES)
        host = self._recv_buffer(size - HEADER_BYTES)
        payload = host.view() if host is not None else memoryview(np.empty(size - HEADER_BYTES, dtype=np.uint8))  # type: ignore[arg-type]
        try:
            consumed = False
            try:
                read_exact_into(body, memoryview(header), guard)
                read_exact_into(body, payload, guard)
                consumed = True
            finally:
                finish_response(body, consumed=consumed)
            if not self._intact(key, name, header, payload):
                return None
            self._count(hits=1, bytes_read=size)
            return payload.toreadonly() if host is None else host.lease_view()
        finally:
            if host is not None:
                host.release()  # a returned lease view holds its own reference

    def _recv_buffer(self, nbytes: int) -> HostBuffer | None:
        """A range of the warm receive slab, or None when it is full (or the tier closed)."""
        pool = self._receive_pool()
        buf = pool.try_allocate(nbytes) if pool is not None and not pool.closed else None
        if buf is None:
            self._count(recv_pool_fallbacks=1)
        return buf

    def _receive_pool(self) -> HostMemoryPool | None:
        """The receive slab, made on first use (unpinned: the socket writes it, not a DMA engine)."""
        if self._recv_pool is None:
            with self._recv_pool_lock:
                if self._recv_pool is None and not self._closed:
                    from lmtier.memory import HostMemoryPool

                    self._recv_pool = HostMemoryPool(int(self.config.recv_pool_bytes), pin=False, name="s3-recv")
        return self._recv_pool

    def _get_into_one(self, guard: CallGuard, key: ChunkKey, out: memoryview) -> bool:
        name = self.object_name(key)
        self._count(gets=1)
        resp = self._get_object(name)
        if resp is None:
            self._count(misses=1)
            return False
        body, size = resp["Body"], int(resp["ContentLength"])
        if size != HEADER_BYTES + out.nbytes:  # not the size the caller expects: a miss, body unread
            finish_response(body, consumed=False)
            self._count(misses=1)
            return False
        header = bytearray(HEADER_BYTES)
        consumed = False
        try:
            with guard.writing_caller_buffer(response_socket(body)):
                self._count(writing_caller_buffers=1)
                try:
                    read_exact_into(body, memoryview(header), guard)
                    read_exact_into(body, out, guard)
                finally:
                    self._count(writing_caller_buffers=-1)
            consumed = True
        finally:
            finish_response(body, consumed=consumed)
        if not self._intact(key, name, header, out):
            return False
        self._count(hits=1, bytes_read=size)
        return True

    def _intact(self, key: ChunkKey, name: str, header: bytearray, payload: memoryview) -> bool:
        """Whether a received object's header matches its payload; a corrupt one is discarded."""
        try:
            length, csum = decode_header(key, header)
            if length != payload.nbytes:
                raise CorruptDataError(f"{key}: header says {length} bytes, object holds {payload.nbytes}")
            if self.config.verify_checksum and checksum(payload) != csum:
                raise CorruptDataError(f"{key}: checksum mismatch")
        except CorruptDataError as exc:
            self._discard_corrupt(name, exc)
            return False
        return True

    def _discard_corrupt(self, name: str, exc: CorruptDataError) -> None:
        """A bad object is a miss: count it, delete it (best effort), say so once in the log."""
        self._count(corrupt=1, misses=1)
        log.warning("s3 tier: deleting corrupt object s3://%s/%s (%s)", self._bucket, name, exc)
        try:
            self._client.delete_object(Bucket=self._bucket, Key=name)
        except Exception as del_exc:  # the miss stands either way; the next read retries the delete
            log.warning("s3 tier: could not delete corrupt object %s: %s", name, del_exc)

    def _put_single(self, guard: CallGuard, key: ChunkKey, view: memoryview) -> None:
        name = self.object_name(key)
        header = encode_header(key, view)
        if self._conditional_puts:
            try:
                self._client.put_object(Bucket=self._bucket, Key=name, IfNoneMatch="*",
                                        Body=HeaderedBody(header, view, guard))
                self._count(puts=1, bytes_written=len(header) + view.nbytes)
                return
            except Exception as exc:
                if is_not_implemented(exc):
                    log.info("s3 tier: the server lacks conditional PUT; identical chunks are rewritten")
                    self._conditional_puts = False
                elif not is_precondition_failed(exc):
                    raise
                elif self._stored_header_matches(name, header, view.nbytes):
                    self._count(skipped_identical=1)
                    return
        self._client.put_object(Bucket=self._bucket, Key=name, Body=HeaderedBody(header, view, guard))
        self._count(puts=1, bytes_written=len(header) + view.nbytes)

    def _stored_header_matches(self, name: str, header: bytes, payload_bytes: int) -> bool:
        """Whether the stored object has exactly this header and size (so identical content)."""
        try:
            resp = self._get_object(name, Range=f"bytes=0-{HEADER_BYTES - 1}")
        except Exception as exc:
            if error_status(exc) == 416:  # an empty object: certainly not ours
                return False
            raise
        if resp is None:
            return False
        body = resp["Body"]
        try:
            stored = body.read()
        finally:
            body.close()
        total = _CONTENT_RANGE_TOTAL.search(str(resp.get("ContentRange", "")))
        return stored == header and total is not None and int(total.group(1)) == HEADER_BYTES + payload_bytes

    def _delete_batch(self, guard: CallGuard, names: list[str]) -> None:
        resp = self._client.delete_objects(
            Bucket=self._bucket, Delete={"Objects": [{"Key": n} for n in names], "Quiet": True}
        )
        errors = [e for e in resp.get("Errors", []) if e.get("Code") not in ("NoSuchKey", "NotFound")]
        if errors:
            first = errors[0]
            raise BackendError(f"s3 delete: {len(errors)} objects not deleted, e.g. {first.get('Key')}: "
                               f"{first.get('Code')} {first.get('Message', '')}")
        self._count(deletes=len(names))

    # -- multipart (orchestrated on the loop: workers never wait on each other) --------------------
    async def _put_multipart(self, key: ChunkKey, view: memoryview) -> None:
        name = self.object_name(key)
        guard = CallGuard()
        run = lambda fn, *a: self._run(fn, *a, op="put", where=name, guard=guard)  # noqa: E731
        header: bytes = await run(lambda _guard: encode_header(key, view))
        if self._conditional_puts:
            same = await run(lambda _guard: self._stored_header_matches(name, header, view.nbytes))
            if same:
                self._count(skipped_identical=1)
                return
        upload_id: str = await run(
            lambda _guard: self._client.create_multipart_upload(Bucket=self._bucket, Key=name)["UploadId"]
        )
        total, part = HEADER_BYTES + view.nbytes, int(self.config.multipart_part_size)
        spans = [(s, min(s + part, total)) for s in range(0, total, part)]
        try:
            etags = await self._run_many("put", [
                (self._upload_part, (name, upload_id, i + 1, header, view, s, e), f"{name} part {i + 1}")
                for i, (s, e) in enumerate(spans)
            ], [guard] * len(spans))
            parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(etags)]
            await run(lambda _guard: self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except BaseException:
            self._abort_upload_later(name, upload_id)
            raise
        self._count(puts=1, multipart_puts=1, bytes_written=total)

    def _upload_part(self, guard: CallGuard, name: str, upload_id: str, number: int,
                     header: bytes, view: memoryview, start: int, end: int) -> str:
        resp = self._client.upload_part(
            Bucket=self._bucket, Key=name, UploadId=upload_id, PartNumber=number,
            Body=HeaderedBody(header, view, guard, start, end),
        )
        return str(resp["ETag"])

    def _abort_upload_later(self, name: str, upload_id: str) -> None:
        """Abort a failed multipart upload in the background (it touches no caller buffer)."""
        def abort_upload() -> None:
            try:
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=name, UploadId=upload_id)
            except Exception as exc:  # a leftover upload costs storage only; lifecycle rules clean it
                log.warning("s3 tier: could not abort multipart upload of %s: %s", name, exc)

        with contextlib.suppress(RuntimeError):  # pool already shut down
            self._pool.submit(abort_upload)


def _into_slot(slots: dict[int, Any], i: int, fn: Callable[..., Any], *args: Any) -> None:
    slots[i] = fn(*args)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _gather_all(calls: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await every call (none left running), then raise the first error."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


async def _wait_uninterrupted(fut: asyncio.Future[Any]) -> None:
    """Wait for ``fut`` even if this task is cancelled again meanwhile; ignore its outcome."""
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            continue
        except BaseException:
            break


def _check_keys(keys: Sequence[object]) -> None:
    for k in keys:
        if not isinstance(k, ChunkKey):
            raise InvalidArgumentError(f"keys must be lmtier.ChunkKey, got {type(k).__name__}: {k!r}")

