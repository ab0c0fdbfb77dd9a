"""The ``redis`` tier: chunks as Redis strings on a standalone server or a Redis Cluster.

Each chunk is one string ``<key_prefix><str(key)>`` holding ``header ‖ payload``
(:mod:`lmtier.framing`). Reads validate header and checksum; a value that fails is a miss,
deleted and counted (``stats()["corrupt"]``); a value of a newer format is a miss left in place
(``stats()["newer_format"]``), and ``contains`` reads headers (``GETRANGE``) so it counts neither.
A concurrent overwrite racing a delete may lose the fresh value: that costs a recompute, never
wrong data.

How the bytes move (measured; see :mod:`lmtier_backends.redis._wire` and
``benchmarks/redis_tier.py``): every batch is split by node (one node when standalone) and each
node's share runs as one pipelined exchange on a worker thread with its own connection, all
nodes in parallel. Payloads are sent without being copied or joined to their header, and large
GET replies land directly in their final buffer: the caller's for :meth:`get_into`, else a
warm receive slab (``recv_pool_bytes``) handed out as read-only lease views.

The blocking work runs on a :class:`lmtier.kit.WorkerPool` (``max_connections`` threads): a
cancelled call drops the connections its jobs use, so it returns at once, and a cancelled
``get_into`` returns only after nothing writes into the caller's buffers any more.

Faults: every redis-py/socket error is mapped in :mod:`lmtier_backends.redis._errors`; the
manager turns them into misses and skipped writes. A node that fails fails the batch; an error
the server answers for one key (``ASK`` during a slot migration, ...) is a miss for that key on
reads. In a Cluster, a ``MOVED`` reply refreshes the slot map and the affected keys are retried
once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from redis import exceptions as rex
from redis.backoff import NoBackoff
from redis.connection import ConnectionPool, parse_url
from redis.retry import Retry

from lmtier.errors import BackendUnavailableError, ConfigError, CorruptDataError, LmtierError
from lmtier.framing import (
    HEADER_BYTES,
    READABLE_CODECS,
    NewerFormatError,
    checksum,
    checksum_stream,
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
from lmtier.protocol import Buffer, Capabilities
from lmtier_backends.redis._errors import map_error
from lmtier_backends.redis._wire import FILLED, Node, ReplySink, direct_read_parser

if TYPE_CHECKING:

    from redis.cluster import RedisCluster

    from lmtier.memory import HostBuffer, HostMemoryPool
    from lmtier_backends.redis.config import RedisConfig

__all__ = ["RedisBackend", "open_redis_backend"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_DEFAULT_MAX_BULK = 512 << 20  # Redis' default proto-max-bulk-len
_POOLED_MIN = 256 << 10  # payloads from this size are received into the warm slab
_STRIPE_BYTES = 4 << 20  # a put batch is split into parallel streams of at least this many bytes


async def open_redis_backend(config: RedisConfig) -> RedisBackend:
    """The registry's factory: connect, check credentials and read the server's limits.

    Raises ConfigError for refused credentials or a ``password_env`` that is not set, and
    BackendUnavailableError when the server cannot be reached (unless ``connect_at_open`` is
    off, in which case nothing is contacted here).
    """
    backend = RedisBackend(config)
    try:
        await backend.connect()
    except BaseException:
        await backend.aclose()
        raise
    return backend


class RedisBackend(AsyncClosing):
    """Chunks in Redis (standalone or Cluster); see the module docstring for the data path.

    The constructor does no I/O; :func:`open_redis_backend` (the registry's factory) also calls
    :meth:`connect`. Usable from one event loop; the blocking work runs on
    ``max_connections`` worker threads.
    """

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.where = config.display_url()  # credential-free, safe in messages and logs
        self._prefix = config.key_prefix.encode()
        self._px = max(1, round(config.ttl_s * 1000)) if config.ttl_s is not None else None
        self.tier = f"redis tier {self.where}"  # how messages and logs name the tier
        self._sink = ReplySink()  # where each worker thread's GET replies go (_wire)
        self._conn_kwargs, self._address = _connection_kwargs(config, config.resolve_password(), self._sink)
        self._workers = WorkerPool(config.max_connections, "redis")
        self._rejects = Rejections(self.tier)
        self._faults = KeyFaults(self.tier, lambda exc, op: self._mapped(op, exc))
        self._nodes: dict[str, Node] = {}
        self._nodes_lock = threading.Lock()
        self._cluster: RedisCluster | None = None
        self._topology_lock = threading.Lock()
        self._recv_pool: HostMemoryPool | None = None
        self._recv_pool_lock = threading.Lock()
        self._max_value = _DEFAULT_MAX_BULK
        self._evicts = True
        self._closed = False
        self._typical_bytes = 0  # the size of values seen lately: how large a get batch will be
        self._counters = dict.fromkeys(
            ("gets", "hits", "misses", "puts", "deletes", "bytes_read", "bytes_written", "errors",
             "key_errors", "moved_retries", "recv_pool_fallbacks"), 0)

    # -- opening -------------------------------------------------------------------------------
    async def connect(self) -> None:
        """Discover the topology (Cluster), PING every primary, read eviction policy and limits."""
        if not self.config.connect_at_open:
            return
        (outcome,) = await self._workers.run([self._connect_blocking])
        if not outcome.ok:
            assert outcome.error is not None
            raise map_error(outcome.error, op="connect", where=self.where, at_open=True)

    def _connect_blocking(self, token: CancelToken) -> None:
        nodes = self._topology_blocking() if self.config.cluster else [self._standalone_node()]
        policies: list[str | None] = []
        limits: list[int] = []
        for node in nodes:
            node.command("PING", token=token)
            policies.append(_config_get(node, "maxmemory-policy", token))
            limit = _config_get(node, "proto-max-bulk-len", token)
            if limit is not None and limit.isdigit():
                limits.append(int(limit))
        # evicts unless every node is known to refuse writes rather than drop keys, and no TTL
        self._evicts = self._px is not None or not policies or any(p != "noeviction" for p in policies)
        if limits:
            self._max_value = min(limits)

    def _standalone_node(self) -> Node:
        with self._nodes_lock:
            node = self._nodes.get("")
            if node is None:
                pool = ConnectionPool(max_connections=self.config.max_connections,
                                      **self._address, **self._conn_kwargs)
                node = self._nodes[""] = Node(pool, self.where, self._sink)
            return node

    def _topology_blocking(self) -> list[Node]:
        """(Re)build the Cluster slot map; return a Node per primary."""
        with self._topology_lock:  # concurrent batches that all saw MOVED refresh once each, in turn
            return self._topology_locked()

    def _topology_locked(self) -> list[Node]:
        if self._cluster is None:
            from redis.cluster import RedisCluster

            kwargs = {k: v for k, v in self._conn_kwargs.items() if k not in ("parser_class", "connection_class", "db")}
            if self.config.tls:
                kwargs["ssl"] = True
            self._cluster = RedisCluster(host=self._address["host"], port=self._address["port"],
                                         require_full_coverage=False, **kwargs)
        else:
            self._cluster.nodes_manager.initialize()
        return [self._cluster_node(n) for n in self._cluster.get_primaries()]

    def _cluster_node(self, cnode: Any) -> Node:
        with self._nodes_lock:
            node = self._nodes.get(cnode.name)
            if node is None:
                pool = ConnectionPool(max_connections=self.config.max_connections, host=cnode.host,
                                      port=cnode.port, **self._conn_kwargs)
                node = self._nodes[cnode.name] = Node(pool, cnode.name, self._sink)
            return node

    #: values keep their codec id and raw length (lmtier.protocol.SupportsCodecs)
    carries_codecs = True

    # -- the StorageBackend protocol -----------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        # persistent: chunks outlive this handle (and this process); whether they outlive a
        # server restart depends on the server's RDB/AOF settings, which is the operator's call
        return Capabilities(persistent=True, shared=True, evicts=self._evicts,
                            max_item_bytes=self._max_value - HEADER_BYTES)

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Whether a ``get`` would find a value this reader can use: the stored header is read
        (``GETRANGE``, 64 bytes) and checked, so a damaged or newer-format value is not counted."""
        self._check_open()
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        outcomes = await self._per_node("contains", names, lambda node, idx, tok: node.headers_many(
            [names[i] for i in idx], tok))
        self._closed_under(outcomes)
        return self._faults.settle("contains", keys, [self._usable(k, o) for k, o in zip(keys, outcomes, strict=True)],
                                   False)

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        self._check_open()
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))  # a key asked twice is read once
        names = [self._name(k) for k in unique]
        outcomes = await self._per_node("get", names, partial(self._get_blocking, unique, names),
                                        sizes=self._expected_sizes(len(names)), streams=self.config.get_streams)
        self._closed_under(outcomes)
        corrupt: list[ChunkKey] = []
        answers = [self._settle(k, o, corrupt) if isinstance(o, BaseException) else o
                   for k, o in zip(unique, outcomes, strict=True)]
        await self._forget_corrupt(corrupt)
        values = self._faults.settle("get", unique, answers, None)  # a dead node's keys: misses
        found = {k: v for k, v in zip(unique, values, strict=True) if v is not None}
        self._counters["gets"] += len(keys)
        self._counters["hits"] += sum(1 for k in keys if k in found)
        self._counters["misses"] += sum(1 for k in keys if k not in found)
        nbytes = sum(memoryview(v).nbytes for v in found.values())
        self._counters["bytes_read"] += nbytes
        if found:
            self._typical_bytes = nbytes // len(found)
        return [found.get(k) for k in keys]

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        """Receive ``keys[i]``'s payload straight from the socket into ``outs[i]`` (no staging).

        ``outs[i]`` must be a writable C-contiguous buffer (``bytearray``, numpy array,
        :class:`~lmtier.memory.HostBuffer`, CPU torch tensor) of exactly the stored payload size;
        the checksum is verified on the filled buffer. ``False`` means a miss, a size mismatch or
        corrupt data (deleted and counted), and the buffer's content is then unspecified. If the
        call is cancelled, it returns only after its worker stopped writing into ``outs``.
        """
        views = into_views(keys, outs)
        self._check_open()
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        outcomes = await self._per_node("get", names, partial(self._get_into_blocking, list(keys), names, views),
                                        sizes=[v.nbytes for v in views], streams=self.config.get_streams)
        self._closed_under(outcomes)
        corrupt: list[ChunkKey] = []
        answers = [self._settle(k, o, corrupt) if isinstance(o, BaseException) else bool(o)
                   for k, o in zip(keys, outcomes, strict=True)]
        await self._forget_corrupt(list(dict.fromkeys(corrupt)))
        filled = [bool(a) for a in self._faults.settle("get_into", keys, answers, False)]
        self._counters["gets"] += len(keys)
        self._counters["hits"] += sum(filled)
        self._counters["misses"] += len(keys) - sum(filled)
        self._counters["bytes_read"] += sum(v.nbytes for v, f in zip(views, filled, strict=True) if f)
        return filled

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        # a key given twice is stored once, with its last value (as if stored one by one): the
        # parts of a batch go out on parallel connections, in no order between them
        unique = put_items(items, tier=f"{self.tier} (proto-max-bulk-len)",
                           max_item_bytes=self._max_value - HEADER_BYTES)
        self._check_open()
        if not unique:
            return
        names = [self._name(it.key) for it in unique]
        outcomes = await self._per_node("put", names, partial(self._put_blocking, unique, names),
                                        sizes=[it.nbytes for it in unique], streams=self.config.put_streams)
        self._typical_bytes = max(it.nbytes for it in unique)
        self._raise_first("put", outcomes)
        self._counters["puts"] += len(items)
        self._counters["bytes_written"] += sum(it.nbytes for it in unique)

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        self._check_open()
        if not keys:
            return
        names = [self._name(k) for k in dict.fromkeys(keys)]
        outcomes = await self._per_node("delete", names, lambda node, idx, tok: node.unlink_many(
            [names[i] for i in idx], tok))
        self._raise_first("delete", outcomes)
        self._counters["deletes"] += len(names)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counters)
        out.update(self._rejects.stats())
        out.update(self._faults.stats())
        out["nodes"] = len(self._nodes)
        out["jobs_running"] = self._workers.running
        pool = self._recv_pool
        out["recv_pool_used_bytes"] = pool.used_bytes if pool is not None else 0
        return out

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # wait for jobs in flight: they may still read caller buffers (put) or fill them (get_into)
        await self._workers.aclose()
        self._close_clients()


    # -- worker-thread bodies ------------------------------------------------------------------
    def _put_blocking(self, items: list[StoreItem], names: list[bytes],
                      node: Node, idx: list[int], token: CancelToken) -> list[Any]:
        # headers are made here, not on the event loop: the checksum reads every payload byte
        replies = node.set_many([names[i] for i in idx], [items[i] for i in idx], self._px, token)
        return [r if isinstance(r, BaseException) else None for r in replies]

    def _get_blocking(self, keys: list[ChunkKey], names: list[bytes],
                      node: Node, idx: list[int], token: CancelToken) -> list[Any]:
        receivers = [_Receiver(self._recv_buffer) for _ in idx]
        try:
            replies = node.get_many([names[i] for i in idx], receivers, token)
            return [rcv.result(keys[i], reply) for i, rcv, reply in zip(idx, receivers, replies, strict=True)]
        finally:
            for rcv in receivers:
                rcv.release()

    def _get_into_blocking(self, keys: list[ChunkKey], names: list[bytes], views: list[memoryview],
                           node: Node, idx: list[int], token: CancelToken) -> list[Any]:
        receivers = [_IntoReceiver(views[i]) for i in idx]
        replies = node.get_many([names[i] for i in idx], receivers, token, caller_memory=True)
        return [rcv.result(keys[i], reply) for i, rcv, reply in zip(idx, receivers, replies, strict=True)]

    def _expected_sizes(self, n: int) -> list[int] | None:
        """Bytes per key a get of ``n`` keys will likely receive (values of one model are alike)."""
        return [self._typical_bytes] * n if self._typical_bytes else None

    def _recv_buffer(self, nbytes: int) -> tuple[memoryview, HostBuffer | None]:
        """A writable buffer for a payload: from the warm slab when large and room is left."""
        if nbytes >= _POOLED_MIN and self.config.recv_pool_bytes and not self._closed:
            pool = self._recv_pool
            if pool is None:
                with self._recv_pool_lock:
                    if self._recv_pool is None:
                        from lmtier.memory import HostMemoryPool

                        self._recv_pool = HostMemoryPool(int(self.config.recv_pool_bytes), pin=False,
                                                         name="redis-recv")
                    pool = self._recv_pool
            buf = pool.try_allocate(nbytes) if not pool.closed else None
            if buf is not None:
                return buf.view(), buf
            self._counters["recv_pool_fallbacks"] += 1  # approximate under threads; a hint only
        return memoryview(bytearray(nbytes)), None

    # -- machinery -----------------------------------------------------------------------------
    def _name(self, key: ChunkKey) -> bytes:
        return self._prefix + str(key).encode()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailableError(f"redis tier {self.where} is closed")

    def _closed_under(self, outcomes: list[Any]) -> None:
        """A batch the tier was closed under failed as a whole (its calls not yet run could not
        run): drop what it received (lease views go back now) and raise."""
        if self._closed:
            outcomes.clear()
            self._check_open()

    def _mapped(self, op: str, exc: BaseException) -> LmtierError:
        self._counters["errors"] += 1
        return map_error(exc, op=op, where=self.where)

    def _settle(self, key: ChunkKey, exc: BaseException, corrupt: list[ChunkKey]) -> BaseException | None:
        """A read of ``key`` that failed: a refused value or one key's error is a miss, None (a
        corrupt value goes on ``corrupt``, to be deleted); a node's failure is returned, for
        :class:`~lmtier.kit.KeyFaults` to settle."""
        kind = self._rejects.note(key, exc)
        if kind == "corrupt":
            if key not in corrupt:
                corrupt.append(key)
        elif kind is None:
            if not isinstance(exc, rex.ResponseError):
                return exc
            self._counters["key_errors"] += 1  # e.g. ASK while a slot migrates
            log.info("%s: get %s answered %s; a miss", self.tier, key, exc)
        return None

    def _usable(self, key: ChunkKey, reply: Any) -> bool | BaseException:
        """Whether a ``GETRANGE 0 63`` reply is the header of a value a ``get`` would serve; the
        node's failure is returned, for :class:`~lmtier.kit.KeyFaults` to settle."""
        if isinstance(reply, BaseException):
            if isinstance(reply, rex.ResponseError):
                return False  # WRONGTYPE, ASK, ...: a get would not serve it either
            return reply
        if not reply:
            return False
        try:
            decode_header(key, reply, codecs=READABLE_CODECS)
        except (CorruptDataError, NewerFormatError):
            return False
        return True

    def _raise_first(self, op: str, outcomes: list[Any]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise self._mapped(op, outcome)

    async def _forget_corrupt(self, keys: list[ChunkKey]) -> None:
        """Delete values that failed validation (best effort: a failure here is only logged)."""
        if not keys:
            return
        names = [self._name(k) for k in keys]
        outcomes = await self._per_node("delete", names, lambda node, idx, tok: node.unlink_many(
            [names[i] for i in idx], tok))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.warning("redis tier %s: could not delete a corrupt value: %s", self.where,
                            map_error(outcome, op="delete", where=self.where))
                break

    async def _per_node(self, op: str, names: list[bytes],
                        work: Callable[[Node, list[int], CancelToken], list[Any]],
                        sizes: list[int] | None = None, streams: int = 1) -> list[Any]:
        """Run ``work(node, indices, token)`` for each node's share of ``names``, in parallel.

        With ``sizes`` (bytes per name), large shares are split further (:func:`_stripes`) so
        that up to ``streams`` parts run in parallel in all (at least one per node). Returns one outcome per
        name: what ``work`` produced for it, or an exception (the key's own error, or its
        node's). Cluster keys answered with MOVED are retried once after the slot map is
        refreshed.
        """
        outcomes: list[Any] = [None] * len(names)
        todo = list(range(len(names)))
        for attempt in range(2):
            groups = await self._groups(names, todo)
            per_node = streams // len(groups)  # in total, not per node: cores are the limit
            if sizes is not None and per_node > 1:
                groups = [(node, part) for node, idx in groups for part in _stripes(idx, sizes, per_node)]
            jobs = [partial(work, node, idx) for node, idx in groups]
            results = await self._workers.run(jobs)
            moved: list[int] = []
            for (_, idx), result in zip(groups, results, strict=True):
                for j, i in enumerate(idx):
                    outcomes[i] = result.value[j] if result.ok else result.error  # type: ignore[index]
                    if result.ok and type(result.value[j]) is rex.MovedError:  # type: ignore[index]
                        moved.append(i)
            if not moved or attempt or not self.config.cluster:
                break
            self._counters["moved_retries"] += len(moved)
            (refreshed,) = await self._workers.run([lambda _token: self._topology_blocking()])
            if not refreshed.ok:
                break
            todo = moved
        return outcomes

    async def _groups(self, names: list[bytes], idx: list[int]) -> list[tuple[Node, list[int]]]:
        if not self.config.cluster:
            node = self._nodes.get("") or self._standalone_node()
            return [(node, idx)]
        if self._cluster is None:  # connect_at_open was off: discover the slots now
            (found,) = await self._workers.run([lambda _token: self._topology_blocking()])
            if not found.ok:
                assert found.error is not None
                raise self._mapped("cluster discovery", found.error)
        cluster = self._cluster
        assert cluster is not None
        by_name: dict[str, tuple[Node, list[int]]] = {}
        for i in idx:
            try:
                cnode = cluster.get_node_from_key(names[i])
            except (rex.RedisError, rex.RedisClusterException) as exc:
                raise self._mapped("slot lookup", exc) from None
            entry = by_name.get(cnode.name)
            if entry is None:
                entry = by_name[cnode.name] = (self._cluster_node(cnode), [])
            entry[1].append(i)
        return list(by_name.values())

    def _close_clients(self) -> None:
        for node in list(self._nodes.values()):
            node.close()
        if self._cluster is not None:
            self._cluster.close()
        if self._recv_pool is not None:
            self._recv_pool.close()


class _PayloadHash:
    """The checksum of a reply's payload, hashed piece by piece as the socket fills it (the pieces
    are still in the CPU's cache); ``digest(payload)`` hashes whole what was not seen that way."""

    __slots__ = ("_hasher", "_seen")

    def __init__(self) -> None:
        self._hasher = checksum_stream()
        self._seen = 0

    def on_piece(self, i: int, view: memoryview) -> None:
        if i == 1:  # targets are [header, payload]
            self._hasher.update(view)
            self._seen += view.nbytes

    def digest(self, payload: memoryview) -> int:
        if self._seen == payload.nbytes:
            return self._hasher.intdigest()
        return checksum(payload)  # filled another way (redis-py's parser, no direct reads)


class _Receiver(_PayloadHash):
    """Where one GET reply goes: a 64-byte header buffer and a payload buffer, then validated."""

    __slots__ = ("_get_buffer", "header", "host", "payload")

    def __init__(self, get_buffer: Callable[[int], tuple[memoryview, HostBuffer | None]]) -> None:
        super().__init__()
        self._get_buffer = get_buffer
        self.header = memoryview(bytearray(HEADER_BYTES))
        self.payload: memoryview | None = None
        self.host: HostBuffer | None = None

    def __call__(self, n: int) -> list[memoryview]:
        if n < HEADER_BYTES:  # too short to be ours: receive it, then fail validation
            self.payload = None
            self.header = memoryview(bytearray(n))
            return [self.header]
        self.payload, self.host = self._get_buffer(n - HEADER_BYTES)
        return [self.header, self.payload]

    def result(self, key: ChunkKey, reply: Any) -> Any:
        """The payload as a read-only view, None for a miss, or the error/CorruptDataError."""
        if reply is None or isinstance(reply, BaseException):
            return _corrupt_if_wrong_type(key, reply)
        if reply is not FILLED or self.payload is None:
            return CorruptDataError(f"{key}: value shorter than the {HEADER_BYTES}-byte header")
        try:
            head = check_stored(key, self.header, self.payload, codecs=READABLE_CODECS,
                                payload_checksum=self.digest(self.payload))
        except (CorruptDataError, NewerFormatError) as exc:
            return exc
        if self.host is not None:
            view = self.host.lease_view()  # holds the slab range until the caller drops it
            self.host.release()
            self.host = None
            return stored_value(view, head)
        return stored_value(self.payload.toreadonly(), head)

    def release(self) -> None:
        if self.host is not None:
            self.host.release()
            self.host = None


class _IntoReceiver(_PayloadHash):
    """Where one ``get_into`` reply goes: header buffer + the caller's buffer, if sizes match."""

    __slots__ = ("header", "out", "took")

    def __init__(self, out: memoryview) -> None:
        super().__init__()
        self.out = out
        self.header = memoryview(bytearray(HEADER_BYTES))
        self.took = False

    def __call__(self, n: int) -> list[memoryview] | None:
        self.took = n == HEADER_BYTES + self.out.nbytes
        return [self.header, self.out] if self.took else None  # a size mismatch is a plain miss

    def result(self, key: ChunkKey, reply: Any) -> Any:
        if reply is None or isinstance(reply, BaseException):
            return _corrupt_if_wrong_type(key, reply)
        if not self.took:
            return False
        try:
            check_stored(key, self.header, self.out, payload_checksum=self.digest(self.out))
        except (CorruptDataError, NewerFormatError) as exc:
            return exc
        return True


def _stripes(idx: list[int], sizes: list[int], streams: int) -> list[list[int]]:
    """``idx`` cut into up to ``streams`` runs of about equal bytes, none under _STRIPE_BYTES.

    Why: one stream's client side (a checksum pass and the kernel's copy of every byte, on one
    thread) can be slower than a Redis server swallowing the bytes; parallel streams spread
    that work over cores. Runs stay contiguous, so a small batch is still one round trip.
    """
    total = sum(sizes[i] for i in idx)
    parts = min(streams, len(idx), total // _STRIPE_BYTES)
    if parts <= 1:
        return [idx]
    out: list[list[int]] = [[]]
    done = 0
    for i in idx:
        # start the next run once this one holds its share of the bytes
        if out[-1] and len(out) < parts and done >= total * len(out) / parts:
            out.append([])
        out[-1].append(i)
        done += sizes[i]
    return out


def _corrupt_if_wrong_type(key: ChunkKey, reply: Any) -> Any:
    """A key of ours holding a list/hash/... is corrupt (deleted), not a tier fault."""
    if isinstance(reply, rex.ResponseError) and str(reply).startswith("WRONGTYPE"):
        return CorruptDataError(f"{key}: the Redis key holds a non-string value")
    return reply


def _config_get(node: Node, name: str, token: CancelToken) -> str | None:
    """``CONFIG GET name`` or None where CONFIG is disabled/renamed (managed services)."""
    try:
        reply = node.command("CONFIG", "GET", name, token=token)
    except rex.ResponseError:
        return None
    if isinstance(reply, list) and len(reply) >= 2:
        value = reply[1]
        return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _connection_kwargs(config: RedisConfig, password: str | None, sink: ReplySink
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """redis-py connection options, split into common options and the address (host/port/path).

    Retries are off on purpose: a dead server must become a fast miss, and the manager's circuit
    breaker (not a client-side backoff loop) decides when to try again.
    """
    parsed = parse_url(config.url)
    address = {k: parsed.pop(k) for k in ("host", "port", "path") if k in parsed}
    common: dict[str, Any] = {
        "db": parsed.pop("db", 0),
        "username": config.username,
        "password": password,
        "socket_timeout": config.read_timeout_s,
        "socket_connect_timeout": config.connect_timeout_s,
        "protocol": 2,
        "retry": Retry(NoBackoff(), 0),
        "client_name": "lmtier",
    }
    parser = direct_read_parser(sink)
    if parser is not None:
        common["parser_class"] = parser
    if "connection_class" in parsed:
        common["connection_class"] = parsed.pop("connection_class")
    if config.tls:
        common.update({
            "ssl_ca_certs": config.tls_ca_file,
            "ssl_cert_reqs": "required" if config.tls_verify else "none",
            "ssl_check_hostname": config.tls_verify,
        })
    if parsed:
        raise ConfigError(f"redis tier {config.display_url()}: unsupported url options {sorted(parsed)}")
    return common, address
