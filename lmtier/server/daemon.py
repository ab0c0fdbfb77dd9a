"""``lmtier serve``: one process, one StorageManager, every engine process on the node as a client.

::

    lmtier serve --config tiers.yaml --socket /run/lmtier/lmtier.sock --http 127.0.0.1:9477

The first tier of ``tiers.yaml`` must be a cpu tier: its ``max_bytes`` sizes the shared-memory slab
that holds it and that clients map (:mod:`lmtier.server.slab`). Colder tiers sit behind it as in
a single process. Clients speak :mod:`lmtier.server.protocol` on the Unix socket; HTTP serves
health, metrics and status (:mod:`lmtier.server.http`).

Start: the socket path is claimed under a lock file (``PATH.lock``): a path held by a live process
is refused, naming its pid; a stale socket file (its server died) is replaced. The socket is
created owner-only (0600) unless ``--socket-mode`` says otherwise. Then one log line::

    lmtier serve ready: pid=… socket=… (mode 0600) http=http://127.0.0.1:9477 slab=8.0 GiB tiers=hot(cpu) -> …

SIGTERM (or SIGINT) drains: stop accepting, let requests in flight finish, close every
connection (releasing its slots), wait for background tier writes, close the tiers, exit 0.

Bad input from a client is answered with a typed error, logged with the client's pid (from the
kernel, ``SO_PEERCRED``); the connection stays usable unless its framing is broken.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtier.errors import ConfigError, LmtierError
from lmtier.server import protocol as p
from lmtier.server.protocol import ServerError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from lmtier.server.cache import SlabCache
    from lmtier.server.holdings import Holdings

__all__ = ["DEFAULT_HTTP", "Server", "claim_socket", "parse_http", "serve"]

log = logging.getLogger("lmtier.server")
DEFAULT_HTTP = "127.0.0.1:9477"
#: How long a drain waits for requests in flight before it closes their connections anyway.
DRAIN_REQUESTS_S = 10.0


def parse_http(text: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); ``[::1]:PORT`` for IPv6. ConfigError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9477 (port 0 picks a free one)")
    return host.strip("[]"), int(port)


def _peer_pid(sock: socket.socket) -> int:
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return int(pid)
    except OSError:
        return 0


@contextlib.contextmanager
def claim_socket(path: Path, mode: int = 0o600) -> Iterator[socket.socket]:
    """A listening Unix socket at ``path`` (mode ``mode``), held under ``PATH.lock`` until exit.

    Refuses (LmtierError, naming the pid) when another lmtier serve holds the lock or a live
    process listens on ``path``; replaces a stale socket file; never removes anything that is not
    a socket. On exit the socket file is removed (the lock file stays, harmless).
    """
    path = path.expanduser().absolute()
    if not path.parent.is_dir():
        raise ConfigError(f"--socket {path}: the directory {path.parent} does not exist; create it (owner-only)")
    lock_path = path.with_name(path.name + ".lock")
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    listener: socket.socket | None = None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(lock_fd)
        raise LmtierError(f"{path} is already served by lmtier serve pid {holder} (it holds {lock_path}); "
                          "stop that server or pick another --socket") from None
    try:
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise LmtierError(f"{path} exists and is not a socket; not touching it: remove it or pick "
                                  "another --socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(path))
                pid = _peer_pid(probe)
                raise LmtierError(f"{path} is live: process {pid or 'unknown'} is listening on it; stop it or "
                                  "pick another --socket")
            except (ConnectionRefusedError, FileNotFoundError):
                log.warning("lmtier serve: replacing the stale socket %s (its server is gone)", path)
                path.unlink(missing_ok=True)
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is created 0600: never briefly wider than asked
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        listener.listen(128)
        listener.setblocking(False)
        yield listener
    finally:
        if listener is not None:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # the lock file stays: unlinking it would let a starter that opened it just before lock a
        # file nobody else sees, next to a third server locking a new one
        os.close(lock_fd)


class _BadFrame(Exception):
    pass


class _FrameReader:
    """Frames off a non-blocking socket with the loop's sock_recv."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock
        self._buf = bytearray()

    async def read(self) -> bytes | None:
        """The next frame's body; None at end of stream. _BadFrame when the length is impossible."""
        buf = self._buf
        while True:
            if len(buf) >= p.FRAME_HEADER.size:
                (n,) = p.FRAME_HEADER.unpack_from(buf)
                if not 0 < n <= p.MAX_FRAME_BYTES:
                    raise _BadFrame(f"frame length {n} is outside [1, {p.MAX_FRAME_BYTES}]; closing the connection")
                end = p.FRAME_HEADER.size + n
                if len(buf) >= end:
                    body = bytes(buf[p.FRAME_HEADER.size: end])
                    del buf[:end]
                    return body
            data = await self._loop.sock_recv(self._sock, 1 << 16)
            if not data:
                return None
            buf += data


@dataclass
class _Conn:
    """One client connection."""

    id: int
    sock: socket.socket
    pid: int
    loop: asyncio.AbstractEventLoop
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    held: Holdings | None = None
    name: str = ""

    def who(self) -> str:
        return f"client pid {self.pid}" + (f" ({self.name})" if self.name else "")

    async def send(self, data: bytes) -> None:
        async with self.lock:
            await self.loop.sock_sendall(self.sock, data)


class _ServerMetrics:
    """The server's own Prometheus series: requests and refusals (counters), state (gauges at scrape)."""

    def __init__(self, registry: CollectorRegistry, cache: SlabCache) -> None:
        from prometheus_client import Counter
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.registry import Collector

        self.requests = Counter("lmtier_server_requests", "Requests handled, by op", ["op"], registry=registry)
        self.refused = Counter("lmtier_server_refused_requests", "Requests answered with an error, by code",
                               ["code"], registry=registry)

        class _State(Collector):
            def collect(self) -> Iterator[GaugeMetricFamily]:
                s = cache.status()
                for name, doc, value in (
                        ("clients", "Connected clients", s["clients"]),
                        ("leases", "Slab ranges leased to clients", s["leases"]),
                        ("reservations", "Slab ranges reserved by clients", s["reservations"]),
                        ("slab_bytes", "Size of the shared slab", s["slab"]["bytes"]),
                        ("slab_used_bytes", "Slab bytes in use (stored, leased or reserved)",
                         s["slab"]["used_bytes"])):
                    yield GaugeMetricFamily(f"lmtier_server_{name}", doc, value=value)

            def describe(self) -> list[Any]:
                return []

        registry.register(_State())


class Server:
    """The daemon's event-loop side: accepts clients, answers requests, serves HTTP, drains."""

    def __init__(self, cache: SlabCache, registry: CollectorRegistry) -> None:
        self.cache = cache
        self.registry = registry
        self.metrics = _ServerMetrics(registry, cache)
        self.serving = False
        self._ids = itertools.count(1)
        self._conns: dict[int, _Conn] = {}
        self._handlers: set[asyncio.Task[None]] = set()

    # -- accept --------------------------------------------------------------------------------
    async def accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            task = loop.create_task(self._serve_connection(sock))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve_connection(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn = _Conn(next(self._ids), sock, _peer_pid(sock), loop)
        self._conns[conn.id] = conn
        reader = _FrameReader(loop, sock)
        try:
            body = await reader.read()
            if body is None or not await self._hello(conn, body):
                return
            while True:
                body = await reader.read()
                if body is None:
                    break
                taken, req = None, None
                try:
                    req = p.decode_request(body)
                    if isinstance(req, p.Hello):
                        raise ServerError(p.E_BAD_MESSAGE, "a second hello on one connection", request_id=req.id)
                    if isinstance(req, p.Commit):  # taken now: a close right after must not undo it
                        assert conn.held is not None
                        taken = self.cache.take_commit(req.items, conn.held)
                except ServerError as exc:
                    await self._refuse(conn, exc, exc.request_id or (req.id if req is not None else 0))
                    continue
                assert req is not None
                task = loop.create_task(self._dispatch(conn, req, taken))
                conn.tasks.add(task)
                task.add_done_callback(conn.tasks.discard)
        except _BadFrame as exc:
            await self._refuse(conn, ServerError(p.E_BAD_FRAME, str(exc)), 0)
        except (ConnectionError, OSError):
            pass  # the client went away mid-frame: same as a close
        finally:
            self._conns.pop(conn.id, None)
            released = self.cache.disconnect(conn.id)
            if conn.held is not None:
                log.info("lmtier serve: %s disconnected; released %d slot(s)", conn.who(), released)
            sock.close()

    async def _hello(self, conn: _Conn, body: bytes) -> bool:
        from lmtier import __version__

        seen = p.decode_hello_version(body)
        if seen is None:
            try:
                p.decode_request(body)
                exc = ServerError(p.E_HELLO_FIRST, "the first request on a connection must be hello")
            except ServerError as bad:
                exc = bad
            await self._refuse(conn, exc, exc.request_id)
            return False
        rid, version = seen
        if version != p.PROTOCOL_VERSION:
            await self._refuse(conn, ServerError(
                p.E_VERSION, f"this client speaks lmtier protocol version {version}, the server (lmtier "
                f"{__version__}) speaks version {p.PROTOCOL_VERSION}; run the same lmtier version on both "
                "sides"), rid)
            return False
        try:
            hello = p.decode_request(body)
        except ServerError as exc:
            await self._refuse(conn, exc, rid)
            return False
        assert isinstance(hello, p.Hello)
        conn.name = hello.name
        who = {"id": conn.id, "pid": conn.pid, "client_pid": hello.pid, "name": hello.name,
               "namespace": hello.namespace}
        conn.held = self.cache.connect(conn.id, who)
        slab = self.cache.slab
        reply = p.encode(p.HelloReply(id=rid, version=p.PROTOCOL_VERSION, server_pid=os.getpid(),
                                      slab_bytes=slab.size, slab_id=slab.slab_id,
                                      tiers=[t.name for t in self.cache.manager.tiers]))
        await _send_with_fd(conn, reply, slab.fileno())
        self.metrics.requests.labels("hello").inc()
        log.info("lmtier serve: %s connected (namespace %s)", conn.who(), hello.namespace or "-")
        return True

    # -- requests ------------------------------------------------------------------------------
    async def _dispatch(self, conn: _Conn, req: p.Request, taken: Any = None) -> None:
        try:
            reply = await self._execute(conn, req, taken)
            self.metrics.requests.labels(type(req).__name__.lower()).inc()
        except ServerError as exc:
            await self._refuse(conn, exc, req.id)
            return
        except Exception as exc:  # never let one request take the server down
            log.exception("lmtier serve: %s: %s failed", conn.who(), type(req).__name__.lower())
            await self._refuse(conn, ServerError(p.E_INTERNAL, f"{type(exc).__name__}: {exc}"), req.id, logged=True)
            return
        with contextlib.suppress(OSError):
            await conn.send(p.encode(reply))

    async def _execute(self, conn: _Conn, req: p.Request, taken: Any) -> p.Reply:
        cache, held = self.cache, conn.held
        assert held is not None
        match req:
            case p.Lookup():
                tiers, tail_tiers = await cache.lookup(req.keys, req.tails)
                return p.LookupReply(id=req.id, hit_chunks=len(tiers), tiers=tiers, read_costs=cache.read_costs(),
                                     tail_tiers=tail_tiers)
            case p.Contains():
                return p.ContainsReply(id=req.id, present=await cache.contains(req.keys))
            case p.Reserve():
                return p.ReserveReply(id=req.id, slots=await cache.reserve(req.sizes, held, req.keys))
            case p.Commit():
                written = await cache.commit(taken)
                log.debug("lmtier serve: %s committed %d chunk(s) (%d new) for request %s", conn.who(),
                          len(req.items), written, req.request_id or "-")
                return p.CommitReply(id=req.id, written=written)
            case p.Fetch():
                return p.FetchReply(id=req.id, slots=await cache.fetch(req.keys, req.sizes, held))
            case p.Release():
                return p.ReleaseReply(id=req.id, released=held.release(req.slots))
            case p.Delete():
                await cache.delete(req.keys)
                return p.DeleteReply(id=req.id)
            case p.Flush():
                await cache.manager.flush()
                return p.FlushReply(id=req.id)
            case p.Ping():
                return p.PingReply(id=req.id, server_pid=os.getpid())
            case p.Stats():
                return p.StatsReply(id=req.id, status=cache.status())
            case p.Clear():
                per_tier = await cache.clear(req.tiers, req.namespaces)
                return p.ClearReply(id=req.id, cleared=sum(n or 0 for n in per_tier.values()), tiers=per_tier)
            case p.Namespace():
                return _register_namespace(cache, req)
            case p.Residency():
                changes, dropped = cache.take_residency(conn.id)
                return p.ResidencyReply(id=req.id, dropped=dropped, changes=[
                    (p.encode_key(c.key.namespace, c.key.digest), c.tier, c.held) for c in changes])
        raise ServerError(p.E_UNKNOWN_OP, f"no handler for {type(req).__name__}")  # pragma: no cover

    async def _refuse(self, conn: _Conn, exc: ServerError, request_id: int, *, logged: bool = False) -> None:
        self.metrics.refused.labels(exc.code).inc()
        if not logged:
            log.warning("lmtier serve: %s: refused request %d: %s [%s]", conn.who(), request_id, exc.message, exc.code)
        with contextlib.suppress(OSError):
            await conn.send(p.encode(p.Error(id=request_id, code=exc.code, message=exc.message)))

    # -- drain ---------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Let requests in flight finish (bounded), close every connection, drain and close tiers."""
        self.serving = False
        inflight = [t for c in self._conns.values() for t in c.tasks]
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=DRAIN_REQUESTS_S)
            for t in pending:
                t.cancel()
        for conn in list(self._conns.values()):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=DRAIN_REQUESTS_S)
        await self.cache.aclose()


def _register_namespace(cache: SlabCache, req: p.Namespace) -> p.NamespaceReply:
    """The ``namespace`` op: the client's KV namespace declaring this server's lossy codecs,
    registered with the manager (its lossy tiers then encode that namespace's chunks)."""
    from msgspec import structs

    from lmtier.codecs.base import LOSSY_FIELD
    from lmtier.keys import KVNamespace

    fields = structs.asdict(req)
    del fields["id"]
    fields["extra"] = tuple((str(k), str(v)) for k, v in req.extra)
    try:
        kv = cache.manager.declare_lossy(KVNamespace(**fields))
        cache.manager.register_namespace(kv)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ServerError(p.E_BAD_ARGUMENT, f"namespace: {exc}") from None
    tags = [v for k, v in kv.extra if k == LOSSY_FIELD]
    return p.NamespaceReply(id=req.id, namespace=kv.namespace, lossy_codecs=tags[-1] if tags else "")


async def _send_with_fd(conn: _Conn, data: bytes, fd: int) -> None:
    """Send ``data`` with ``fd`` attached (SCM_RIGHTS) on the non-blocking socket."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    async with conn.lock:
        sent = 0
        while sent == 0:
            try:
                sent = conn.sock.sendmsg([data], ancillary)
            except BlockingIOError:
                ready = conn.loop.create_future()
                conn.loop.add_writer(conn.sock, ready.set_result, None)
                try:
                    await ready
                finally:
                    conn.loop.remove_writer(conn.sock)
        if sent < len(data):
            await conn.loop.sock_sendall(conn.sock, data[sent:])


async def serve(config: str | os.PathLike[str], socket_path: str | os.PathLike[str], http: str = DEFAULT_HTTP,
                *, socket_mode: int = 0o600, stop: asyncio.Event | None = None,
                ready: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT (or ``stop`` is set); returns the exit status (0).

    ``ready`` is called with ``{"socket", "http", "pid"}`` once clients can connect.
    """
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from lmtier.metrics import Metrics
    from lmtier.server.cache import SlabCache
    from lmtier.server.http import make_app

    host, port = parse_http(http)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    path = Path(socket_path)
    with claim_socket(path, socket_mode) as listener:
        cache = await SlabCache.open(config, metrics=Metrics(registry))
        server = Server(cache, registry)
        runner = web.AppRunner(make_app(cache, registry, lambda: server.serving), access_log=None,
                               handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await cache.aclose()
            raise LmtierError(f"--http {http}: cannot listen ({exc.strerror}); pick another port") from None
        bound = runner.addresses[0]
        http_url = f"http://{bound[0]}:{bound[1]}" if ":" not in bound[0] else f"http://[{bound[0]}]:{bound[1]}"
        accept = loop.create_task(server.accept_forever(listener))
        server.serving = True
        tiers = " -> ".join(f"{t.name}({t.config.backend})" for t in cache.manager.tiers)
        log.info("lmtier serve ready: pid=%d socket=%s (mode %04o) http=%s slab=%s tiers=%s", os.getpid(),
                 path.expanduser().absolute(), socket_mode, http_url, _fmt_bytes(cache.slab.size), tiers)
        if ready is not None:
            ready({"socket": str(path), "http": http_url, "pid": os.getpid()})
        await stop.wait()
        log.info("lmtier serve: draining (%d client(s) connected)", len(server._conns))
        accept.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accept
        await server.drain()
        await runner.cleanup()
    log.info("lmtier serve: stopped; background writes drained")
    return 0


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover
