"""The ``s3`` tier: one object per chunk, ``<prefix>/<str(key)>``, in an S3 bucket.

Object names follow :func:`lmtier.kit.object_name`, the scheme NIXL's ``obj`` plugin shares, so
either transport reads what the other wrote. Each object is the 64-byte :mod:`lmtier.framing`
header (key, length, xxh3 checksum, codec) followed by the payload; a read that fails the check is
a miss, the object is deleted and counted (``stats()["corrupt"]``). An object of a newer format
is a miss left in place (``stats()["newer_format"]``), and ``contains`` reads the header (a
ranged GET of 64 bytes) so it counts neither.

boto3 is blocking, so every request runs on a :class:`lmtier.kit.WorkerPool`
(``max_concurrency`` workers, as many pooled HTTP connections) and a batch's requests run
concurrently on it. Objects from
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
stop, so no thread writes caller memory after the call has unwound
(:meth:`lmtier.kit.CancelToken.touching_caller_memory`).

Errors are translated in one place, :mod:`._errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import SecretStr

from lmtier.errors import BackendError, ConfigError, CorruptDataError
from lmtier.framing import CODEC_NONE, HEADER_BYTES, READABLE_CODECS, Header, NewerFormatError, decode_header
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
    object_name,
    put_items,
    stored_value,
)
from lmtier.protocol import Buffer, Capabilities
from lmtier_backends.s3._errors import (
    error_status,
    is_not_found,
    is_not_implemented,
    is_precondition_failed,
    translate,
    translate_open,
)
from lmtier_backends.s3._io import HeaderedBody, finish_response, read_exact_into, response_socket

if TYPE_CHECKING:

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
        # botocore's "max_attempts" counts retries after the first request; ours counts the first
        # too (as its "total_max_attempts" does): 2 was 3 requests, 30 s against a frozen server
        retries={"total_max_attempts": config.max_attempts, "mode": config.retry_mode},
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
        await backend._run_one(backend._check_bucket, op="open", where=f"bucket {config.bucket!r}")
        if config.recv_pool_bytes:  # now, not on the first get: it imports torch (seconds, once)
            await asyncio.to_thread(backend._receive_pool)
    except BaseException:
        await backend.aclose()
        raise
    return backend


class S3Backend(AsyncClosing):
    """Chunks as S3 objects; persistent and shared between processes and hosts.

    Build it with :func:`open_s3_backend` (checks the bucket); the constructor does no I/O.
    """

    def __init__(self, config: S3Config, client: Any) -> None:
        self.config = config
        self._client = client
        self._bucket = config.bucket
        self._workers = WorkerPool(config.max_concurrency, "s3")
        self._rejects = Rejections(f"s3 tier (bucket {config.bucket!r})")
        self._faults = KeyFaults(f"s3 tier (bucket {config.bucket!r})",
                                 lambda exc, op: translate(exc, op=op, where=f"s3://{self._bucket}"))
        self._conditional_puts = config.skip_identical_puts
        self._max_item_bytes = int(config.multipart_part_size) * _MAX_PARTS - HEADER_BYTES
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            ("gets", "hits", "misses", "puts", "skipped_identical", "multipart_puts",
             "deletes", "bytes_read", "bytes_written", "errors", "writing_caller_buffers",
             "recv_pool_fallbacks"), 0)
        self._closed = False
        self._recv_pool: HostMemoryPool | None = None  # made at open (imports torch)
        self._recv_pool_lock = threading.Lock()

    #: values keep their codec id and raw length (lmtier.protocol.SupportsCodecs)
    carries_codecs = True

    # -- contract ----------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(persistent=True, shared=True, evicts=False, max_item_bytes=self._max_item_bytes)

    def object_name(self, key: ChunkKey) -> str:
        """The S3 key under which ``key`` is stored (:func:`lmtier.kit.object_name`)."""
        return object_name(self.config.prefix, key)

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether a ``get`` would serve each key: the object's header is read (a 64-byte ranged
        GET) and checked, so a damaged or newer-format object is not counted."""
        self._check_open()
        unique = list(dict.fromkeys(keys))
        found = await self._read_many("contains", unique, self._has_usable_header, False)
        answer = dict(zip(unique, found, strict=True))
        return [answer[k] for k in keys]

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        self._check_open()
        unique = list(dict.fromkeys(keys))
        values = await self._read_many("get", unique, self._get_one, None)
        answer = dict(zip(unique, values, strict=True))
        return [answer[k] for k in keys]

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        """Stream each object straight into ``outs[i]`` (writable, exactly the payload size)."""
        self._check_open()
        views = into_views(keys, outs)
        return await self._read_many("get_into", keys, self._get_into_one, False, views)

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        self._check_open()
        # every value checked before any I/O; a key given twice is stored once, with its last value
        latest = put_items(items, max_item_bytes=self._max_item_bytes,
                           tier=f"s3 tier ({_MAX_PARTS} parts of multipart_part_size at most)")
        threshold = int(self.config.multipart_threshold)
        small = [(self._put_single, (it,), self.object_name(it.key))
                 for it in latest if HEADER_BYTES + it.nbytes < threshold]
        big = [self._put_multipart(it) for it in latest if HEADER_BYTES + it.nbytes >= threshold]
        if not big:
            await self._run_many("put", small)
            return
        await _gather_all([self._run_many("put", small), *big])

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check_open()
        names = list(dict.fromkeys(self.object_name(k) for k in keys))
        batches = [names[i : i + _DELETE_BATCH] for i in range(0, len(names), _DELETE_BATCH)]
        await self._run_many("delete", [(self._delete_batch, (b,), f"{len(b)} objects") for b in batches])

    def stats(self) -> dict[str, Any]:
        """Counters since open: gets/hits/misses, puts/skipped_identical, corrupt, errors, bytes."""
        with self._lock:
            out = dict(self._counts)
        out.update(self._rejects.stats())
        out.update(self._faults.stats())
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # in-flight workers finish (or time out) before the client's connections are closed
        await self._workers.aclose()
        with contextlib.suppress(Exception):
            self._client.close()
        if self._recv_pool is not None:
            self._recv_pool.close()  # the slab is freed once the last returned view is dropped


    def __repr__(self) -> str:
        return f"S3Backend(bucket={self._bucket!r}, prefix={self.config.prefix!r}, endpoint={self.config.endpoint_url!r})"

    # -- running blocking calls ------------------------------------------------------------------
    async def _run_one(self, fn: Callable[..., T], *args: Any, op: str, where: str) -> T:
        """One blocking call on the pool (see :meth:`_run_many`)."""
        (result,) = await self._run_many(op, [(fn, args, where)])
        return result  # type: ignore[no-any-return]

    async def _run_many(self, op: str, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], str]]) -> list[Any]:
        """Run each ``fn(token, *args)`` on the pool; results in order, or the first error.

        Every call finishes before this returns or raises (so no worker still holds a caller's
        buffer), and errors are translated here, in one place. A cancellation returns once the
        calls writing into a caller's buffer have stopped (:class:`lmtier.kit.WorkerPool`).
        """
        answers = await self._answers(op, calls)
        first = next((a for a in answers if isinstance(a, BaseException)), None)
        if first is not None:
            raise first
        return answers

    async def _read_many(self, op: str, keys: Sequence[ChunkKey], fn: Callable[..., Any], miss: Any,
                         outs: Sequence[memoryview] | None = None) -> list[Any]:
        """``fn(token, key)`` (or ``fn(token, key, outs[i])``) for each key on the pool, settled key
        by key (:class:`lmtier.kit.KeyFaults`): an object the server fails to serve (or a request
        that times out) is a ``miss`` for its key while the others are served; only a batch in
        which no request was answered raises. Returns as :meth:`_run_many` does: every call done."""
        answers = await self._answers(op, [(fn, (k,) if outs is None else (k, outs[i]), self.object_name(k))
                                           for i, k in enumerate(keys)])
        if self._closed:  # closed under the batch: its calls not yet run failed, and so does it
            answers.clear()  # (lease views go back now, not with the traceback)
            self._check_open()
        return self._faults.settle(op, keys, answers, miss)

    async def _answers(self, op: str, calls: Sequence[tuple[Callable[..., Any], tuple[Any, ...], str]]) -> list[Any]:
        """Each call's value, or its error translated to the lmtier tree (and counted), in order."""
        if not calls:
            return []
        outcomes = await self._workers.run([functools.partial(_call, fn, args) for fn, args, _ in calls])
        answers: list[Any] = []
        for outcome, (_, _, where) in zip(outcomes, calls, strict=True):
            if outcome.ok:
                answers.append(outcome.value)
                continue
            assert outcome.error is not None
            self._count(errors=1)
            answers.append(translate(outcome.error, op=op, where=f"s3://{self._bucket}/{where}"))
        return answers

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"s3 tier (bucket {self._bucket!r}) is closed")

    # -- worker functions (run on the pool; the first argument is the call's CancelToken) ---------
    def _check_bucket(self, token: CancelToken) -> None:
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

    def _has_usable_header(self, token: CancelToken, key: ChunkKey) -> bool:
        header = self._read_header(self.object_name(key))
        if header is None:
            return False
        try:
            decode_header(key, header, codecs=READABLE_CODECS)
        except (CorruptDataError, NewerFormatError):
            return False
        return True

    def _read_header(self, name: str) -> bytes | None:
        """The first 64 bytes of an object (fewer if it is shorter), or None if it is absent."""
        try:
            resp = self._get_object(name, Range=f"bytes=0-{HEADER_BYTES - 1}")
        except Exception as exc:
            if error_status(exc) == 416:  # an empty object: no header at all
                return b""
            raise
        if resp is None:
            return None
        body = resp["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def _get_object(self, name: str, **kwargs: Any) -> dict[str, Any] | None:
        """GetObject, or None if the object does not exist."""
        try:
            return self._client.get_object(Bucket=self._bucket, Key=name, **kwargs)  # type: ignore[no-any-return]
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise

    def _get_one(self, token: CancelToken, key: ChunkKey) -> memoryview | None:
        name = self.object_name(key)
        self._count(gets=1)
        resp = self._get_object(name)
        if resp is None:
            self._count(misses=1)
            return None
        body, size = resp["Body"], int(resp["ContentLength"])
        if size - HEADER_BYTES >= _POOLED_MIN and self.config.recv_pool_bytes:
            return self._get_pooled(token, key, name, body, size)
        # numpy: an uninitialised buffer (bytearray would zero it first)
        buf = memoryview(np.empty(size, dtype=np.uint8))  # type: ignore[arg-type]
        consumed = False
        try:
            read_exact_into(body, buf, token)
            consumed = True
        finally:
            finish_response(body, consumed=consumed)
        head = self._intact(key, name, buf[:HEADER_BYTES], buf[HEADER_BYTES:], codecs=READABLE_CODECS)
        if head is None:
            return None
        self._count(hits=1, bytes_read=size)
        return stored_value(buf[HEADER_BYTES:].toreadonly(), head)  # type: ignore[return-value]

    def _get_pooled(self, token: CancelToken, key: ChunkKey, name: str, body: Any, size: int) -> memoryview | None:
        """Header into a small buffer, payload into a range of the warm slab (or a fresh buffer
        when the slab is full); returns a read-only lease view of exactly the payload."""
        header = bytearray(HEADER_BYTES)
        host = self._recv_buffer(size - HEADER_BYTES)
        payload = host.view() if host is not None else memoryview(np.empty(size - HEADER_BYTES, dtype=np.uint8))  # type: ignore[arg-type]
        try:
            consumed = False
            try:
                read_exact_into(body, memoryview(header), token)
                read_exact_into(body, payload, token)
                consumed = True
            finally:
                finish_response(body, consumed=consumed)
            head = self._intact(key, name, header, payload, codecs=READABLE_CODECS)
            if head is None:
                return None
            self._count(hits=1, bytes_read=size)
            return stored_value(payload.toreadonly() if host is None else host.lease_view(), head)  # type: ignore[return-value]
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

    def _get_into_one(self, token: CancelToken, key: ChunkKey, out: memoryview) -> bool:
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
        sock = response_socket(body)
        # a cancellation shuts the socket (the blocked read ends at once) and waits for this block
        shut = (lambda: sock.shutdown(socket.SHUT_RDWR)) if sock is not None else None
        try:
            with token.touching_caller_memory(abort=shut):
                self._count(writing_caller_buffers=1)
                try:
                    read_exact_into(body, memoryview(header), token)
                    read_exact_into(body, out, token)
                finally:
                    self._count(writing_caller_buffers=-1)
            consumed = True
        finally:
            finish_response(body, consumed=consumed)
        if self._intact(key, name, header, out) is None:
            return False
        self._count(hits=1, bytes_read=size)
        return True

    def _intact(self, key: ChunkKey, name: str, header: Buffer, payload: memoryview,
                codecs: Container[int] = (CODEC_NONE,)) -> Header | None:
        """The header of a received object if it matches its payload; a corrupt one is discarded.
        ``codecs``: the codec ids passed on (get: all readable; get_into: none, raw values only)."""
        try:
            return check_stored(key, header, payload, verify=self.config.verify_checksum, codecs=codecs)
        except (CorruptDataError, NewerFormatError) as exc:
            self._refused(key, name, exc)
            return None

    def _refused(self, key: ChunkKey, name: str, exc: CorruptDataError | NewerFormatError) -> None:
        """A refused object is a miss: counted and logged; a corrupt one is deleted (best
        effort), a newer-format one left for the readers that understand it."""
        self._count(misses=1)
        if self._rejects.note(key, exc) != "corrupt":
            return
        try:
            self._client.delete_object(Bucket=self._bucket, Key=name)
        except Exception as del_exc:  # the miss stands either way; the next read retries the delete
            log.warning("s3 tier: could not delete corrupt object %s: %s", name, del_exc)

    def _put_single(self, token: CancelToken, item: StoreItem) -> None:
        name, view = self.object_name(item.key), item.view
        header = item.header()
        if self._conditional_puts:
            try:
                self._client.put_object(Bucket=self._bucket, Key=name, IfNoneMatch="*",
                                        Body=HeaderedBody(header, view, token))
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
        self._client.put_object(Bucket=self._bucket, Key=name, Body=HeaderedBody(header, view, token))
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
        return bool(stored == header and total is not None and int(total.group(1)) == HEADER_BYTES + payload_bytes)

    def _delete_batch(self, token: CancelToken, names: list[str]) -> None:
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
    async def _put_multipart(self, item: StoreItem) -> None:
        name, view = self.object_name(item.key), item.view
        run = lambda fn, *a: self._run_one(fn, *a, op="put", where=name)  # noqa: E731
        header: bytes = await run(lambda _token: item.header())  # the checksum pass, off the loop
        if self._conditional_puts:
            same = await run(lambda _token: self._stored_header_matches(name, header, view.nbytes))
            if same:
                self._count(skipped_identical=1)
                return
        upload_id: str = await run(
            lambda _token: self._client.create_multipart_upload(Bucket=self._bucket, Key=name)["UploadId"]
        )
        total, part = HEADER_BYTES + view.nbytes, int(self.config.multipart_part_size)
        spans = [(s, min(s + part, total)) for s in range(0, total, part)]
        try:
            etags = await self._run_many("put", [
                (self._upload_part, (name, upload_id, i + 1, header, view, s, e), f"{name} part {i + 1}")
                for i, (s, e) in enumerate(spans)
            ])
            parts = [{"PartNumber": i + 1, "ETag": etag} for i, etag in enumerate(etags)]
            await run(lambda _token: self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}))
        except BaseException:
            self._abort_upload_later(name, upload_id)
            raise
        self._count(puts=1, multipart_puts=1, bytes_written=total)

    def _upload_part(self, token: CancelToken, name: str, upload_id: str, number: int,
                     header: bytes, view: memoryview, start: int, end: int) -> str:
        resp = self._client.upload_part(
            Bucket=self._bucket, Key=name, UploadId=upload_id, PartNumber=number,
            Body=HeaderedBody(header, view, token, start, end),
        )
        return str(resp["ETag"])

    def _abort_upload_later(self, name: str, upload_id: str) -> None:
        """Abort a failed multipart upload in the background (it touches no caller buffer)."""
        def abort_upload() -> None:
            try:
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=name, UploadId=upload_id)
            except Exception as exc:  # a leftover upload costs storage only; lifecycle rules clean it
                log.warning("s3 tier: could not abort multipart upload of %s: %s", name, exc)

        self._workers.spawn(abort_upload)


def _call(fn: Callable[..., Any], args: tuple[Any, ...], token: CancelToken) -> Any:
    return fn(token, *args)


async def _gather_all(calls: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await every call (none left running), then raise the first error."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
