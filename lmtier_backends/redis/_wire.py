"""The synchronous data path of the redis tier: pipelined commands on redis-py connections.

Everything here runs on the tier's worker threads, one batch per thread and connection.

Why not ``Redis.get``/``Redis.set``: measured on the project's 2-core machines (see
``benchmarks/redis_tier.py``), redis-py's command layer copies each large value several times:
``SET`` joins header and payload (and the hiredis packer copies again), and a ``GET`` reply goes
socket -> read buffer -> hiredis buffer -> a fresh ``bytes``. For 37.7 MB values that made GETs
~2x slower than the socket allows. So we keep redis-py for what it does well (connecting, TLS,
AUTH/ACL, SELECT, timeouts, error classes) and use only its public connection methods
(``send_packed_command`` / ``read_response``) for the data:

* ``SET`` is packed here, with the 64-byte codec header and the caller's payload sent as
  separate pieces of one bulk string (RESP allows splitting a bulk string across writes), so the
  payload is never joined or copied; all SETs of a batch go out as one pipeline, each command
  with one scatter-gather ``sendmsg`` of its pieces (:func:`_send_groups`).
* ``GET`` replies are received by :class:`DirectReadParser` straight into buffers chosen per
  reply (a warm receive slab, or the caller's own buffer for ``get_into``): one copy, kernel to
  destination. Every other reply (handshake, EXISTS, errors) is parsed by hiredis as usual.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from redis import exceptions as rex
from redis._parsers import _HiredisParser
from redis.connection import ConnectionPool

from lmtier.framing import HEADER_BYTES, checksum_stream

if TYPE_CHECKING:
    from lmtier.kit import CancelToken, StoreItem
    from lmtier.protocol import Buffer

__all__ = [
    "FILLED",
    "Alloc",
    "DirectReadParser",
    "Node",
    "ReplySink",
    "direct_read_parser",
]

#: ``alloc(n)`` gets a bulk reply's length and returns writable byte views whose sizes add up to
#: ``n`` to receive it into, or ``None`` to read and drop it. An alloc with an ``on_piece(i, view)``
#: attribute is told of each piece of ``targets[i]`` as it is received (to hash it while it is
#: still in the CPU's cache: hashing a whole 1 MiB payload afterwards cost about a third as much
#: as receiving it, piece by piece far less).
Alloc = Callable[[int], Sequence[memoryview] | None]

_CRLF = b"\r\n"
_GETRANGE_HEADER = b"$1\r\n0\r\n$%d\r\n%d\r\n" % (len(str(HEADER_BYTES - 1)), HEADER_BYTES - 1)
_SMALL = 16 << 10  # payloads below this are joined into the command (one write beats two)
# large payloads are written in pieces of this size, a piece of the next one hashed between two
# writes (measured: 1 MiB pieces cost ~25 us of client CPU each in syscalls and wake-ups)
_PIECE = 4 << 20
# GET replies a pipeline may have outstanding. Measured: for values of 1 MiB and more, deeper
# pipelines were slower than one GET at a time (the server buffers and copies the extra replies);
# for small values pipelining saves a round trip per key.
_GET_WINDOW_BYTES = 4 << 20
_MAX_WINDOW = 512

class ReplySink(threading.local):
    """Where the calling thread's next GET reply goes: armed by :meth:`Node._read_into` around
    one ``read_response``, read by the :class:`DirectReadParser` of that connection.

    Why on the side, per thread: the parser is created by the connection and reached only through
    ``Connection.read_response`` (whose error handling we keep), and each worker thread drives one
    connection at a time. One sink per backend, handed to its parsers and its :class:`Node`s.
    """

    alloc: Alloc | None = None
    piece: Callable[[int, memoryview], None] | None = None


class _Filled:
    """The reply was a bulk string and now sits in the buffers ``alloc`` returned."""

    def __repr__(self) -> str:
        return "FILLED"


FILLED = _Filled()


def direct_read_parser(sink: ReplySink) -> Callable[..., Any] | None:
    """The ``parser_class`` of a backend's connections: :class:`DirectReadParser` arming from
    ``sink``; None where redis-py runs without hiredis (replies are then copied once more)."""
    from redis.utils import HIREDIS_AVAILABLE

    return partial(DirectReadParser, sink=sink) if HIREDIS_AVAILABLE else None


class DirectReadParser(_HiredisParser):  # type: ignore[misc]
    """hiredis for every reply, except bulk replies read while a sink is armed.

    Armed reads go through ``_rbuf[_rpos:_rend]``: bytes received but not yet consumed (the
    reply's header line, the start of its payload, the next pipelined replies). A payload is
    copied out of it once, and the rest of the payload is received straight into place.
    Leftover bytes are handed to hiredis before the next unarmed read.
    """

    def __init__(self, socket_read_size: int, *, sink: ReplySink) -> None:
        super().__init__(socket_read_size)
        self._sink = sink
        self._rbuf = bytearray(max(socket_read_size, 1 << 16))
        self._rview = memoryview(self._rbuf)
        self._rpos = self._rend = 0

    def on_connect(self, connection: Any, **kwargs: Any) -> None:
        super().on_connect(connection, **kwargs)
        self._rpos = self._rend = 0

    def on_disconnect(self) -> None:
        super().on_disconnect()
        self._rpos = self._rend = 0

    def can_read(self, timeout: float = 0) -> bool:
        return self._rpos < self._rend or bool(super().can_read(timeout))

    def read_response(self, disable_decoding: bool = False, **kwargs: Any) -> Any:  # type: ignore[override]
        alloc = self._sink.alloc
        sock = getattr(self, "_sock", None)
        reader = getattr(self, "_reader", None)
        if alloc is None or sock is None or reader is None or reader.has_data():
            if self._rpos < self._rend and reader is not None:
                reader.feed(self._rbuf, self._rpos, self._rend - self._rpos)
            self._rpos = self._rend = 0
            return super().read_response(disable_decoding=disable_decoding, **kwargs)
        return self._read_direct(sock, alloc)

    # -- the armed path ------------------------------------------------------------------
    def _recv_more(self, sock: Any) -> None:
        """Receive more bytes after the unconsumed ones (moved to the front first)."""
        if self._rpos:
            left = self._rend - self._rpos
            self._rbuf[:left] = self._rview[self._rpos:self._rend]
            self._rpos, self._rend = 0, left
        if self._rend == len(self._rbuf):
            raise rex.InvalidResponse("reply header line too long: stream out of sync")
        n = sock.recv_into(self._rview[self._rend:])
        if n == 0:
            raise rex.ConnectionError("Connection closed by server.")
        self._rend += n

    def _line(self, sock: Any) -> bytes:
        while True:
            end = self._rbuf.find(_CRLF, self._rpos, self._rend)
            if end >= 0:
                line = bytes(self._rview[self._rpos:end])
                self._rpos = end + 2
                return line
            self._recv_more(sock)

    def _read_direct(self, sock: Any, alloc: Alloc) -> Any:
        line = self._line(sock)
        kind = line[:1]
        if kind == b"$":
            n = int(line[1:])
            if n < 0:
                return None
            targets = alloc(n)
            if targets is None:
                self._discard(sock, n)
            else:
                self._fill(sock, targets, n, self._sink.piece)
            while self._rend - self._rpos < 2:
                self._recv_more(sock)
            if self._rview[self._rpos:self._rpos + 2] != _CRLF:
                raise rex.InvalidResponse("bulk reply not terminated by CRLF: stream out of sync")
            self._rpos += 2
            return FILLED
        if kind == b"-":
            return self.parse_error(line[1:].decode("utf-8", "replace"))
        if kind == b"_":  # RESP3 null
            return None
        raise rex.InvalidResponse(f"expected a bulk reply, got {line[:40]!r}")

    def _fill(self, sock: Any, targets: Sequence[memoryview], n: int,
              piece: Callable[[int, memoryview], None] | None) -> None:
        if sum(t.nbytes for t in targets) != n:
            raise ValueError("alloc() returned buffers that do not add up to the reply length")
        for i, target in enumerate(targets):
            size = target.nbytes
            take = min(self._rend - self._rpos, size)
            if take:  # bytes already received past the header line
                target[:take] = self._rview[self._rpos:self._rpos + take]
                self._rpos += take
                if piece is not None:
                    piece(i, target[:take])
            pos = take
            while pos < size:  # the rest goes straight from the socket into place
                got = sock.recv_into(target[pos:])
                if got == 0:
                    raise rex.ConnectionError("Connection closed by server.")
                if piece is not None:
                    piece(i, target[pos:pos + got])
                pos += got

    def _discard(self, sock: Any, n: int) -> None:
        take = min(self._rend - self._rpos, n)
        self._rpos += take
        left = n - take
        if left:
            self._rpos = self._rend = 0
        while left:
            got = sock.recv_into(self._rview, min(left, len(self._rbuf)))
            if got == 0:
                raise rex.ConnectionError("Connection closed by server.")
            left -= got


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def _set_commands(names: Sequence[bytes], items: Sequence[StoreItem], px: int | None) -> Iterator[list[Buffer]]:
    """A pipeline of ``SET``s as groups of byte pieces, each group one write (:func:`_send_groups`);
    each payload is sent as is (never copied or joined).

    A header needs its payload's checksum: one pass over every payload byte, unless the item
    carries it from a tier that already hashed it. Hashing a payload whole just before sending
    it stalls the stream whenever the socket buffers drain before the hash is done (a fast link,
    small buffers: 4 MiB drain in ~1.3 ms at 25 Gb/s; 37.7 MB hash in ~3 ms). So while a large
    payload goes out in ``_PIECE``-byte writes, the next large payload is hashed a piece after
    each write, always with a full buffer to overlap with; only the first large payload of a
    batch is hashed before anything is sent. (On loopback with autotuned buffers both orders
    measured the same.) Payloads under ``_SMALL`` bytes are joined with their commands instead:
    one write beats two. Checksums computed here are remembered by the items, for the next tier;
    a payload another tier (a concurrent write-through or background write of the same value) has
    hashed or is hashing is not hashed ahead, and a hash ahead stops as soon as another tier
    starts one (:attr:`lmtier.kit.StoreItem.unhashed`): ``item.checksum()`` then gives theirs,
    and one run ahead ends through :meth:`lmtier.kit.StoreItem.settle_checksum`.

    A large payload's command goes out as one group: the command head (with the header) and the
    payload's first piece, then the other pieces, the last with the command's CRLF. Why not the
    head in a write of its own: on loopback with ``TCP_NODELAY`` that ~130-byte segment woke the
    server once more per command, for nothing it could use yet.
    """
    suffix = _CRLF + (b"$2\r\nPX\r\n" + _bulk(str(px).encode()) if px else b"")
    nargs = b"*5\r\n$3\r\nSET\r\n" if px else b"*3\r\n$3\r\nSET\r\n"
    small: list[Any] = []  # parts of small items (and the next large item's head), joined into one piece
    ahead: tuple[int, Any, int] | None = None  # (item, its partial hash, bytes hashed so far)
    count = len(items)
    for i, (name, item) in enumerate(zip(names, items, strict=True)):
        payload = item.view
        if ahead is not None and ahead[0] == i:
            csum = item.settle_checksum(partial(_finish_hash, *ahead[1:], payload))
        else:
            csum = item.checksum()  # carried, or computed (and remembered) now
        header = item.header(csum)
        small += (nargs, _bulk(name), b"$%d\r\n" % (HEADER_BYTES + payload.nbytes), header)
        if payload.nbytes < _SMALL:
            small += (payload, suffix)
            continue
        group: list[Buffer] = [b"".join(small)]
        small = []
        nxt = items[i + 1] if i + 1 < count else None
        following = nxt.view if nxt is not None and nxt.nbytes >= _SMALL and nxt.unhashed else None
        hasher = checksum_stream() if following is not None else None
        done = 0
        for start in range(0, payload.nbytes, _PIECE):
            group.append(payload[start:start + _PIECE])
            if start + _PIECE >= payload.nbytes:
                group.append(suffix)
            yield group
            group = []
            if hasher is not None and following is not None and done < following.nbytes:
                if nxt is not None and not nxt.unhashed:  # another tier hashes it: no second pass
                    hasher = following = None
                    continue
                hasher.update(following[done:done + _PIECE])
                done = min(done + _PIECE, following.nbytes)
        ahead = (i + 1, hasher, done) if hasher is not None else None
    if small:
        yield [b"".join(small)]


def _send_groups(conn: Any, groups: Iterator[list[Buffer]]) -> None:
    """Write each group of byte pieces with one ``sendmsg`` (TLS sockets: ``sendall`` per piece).

    Why not ``send_packed_command``: it makes one ``sendall`` per piece, i.e. one more write
    (with a wake-up of the server) per command. Errors end as there: the connection is dropped
    (nothing of the batch is known) and redis-py's ``TimeoutError``/``ConnectionError`` raised.
    The socket is taken once: a connection dropped mid-batch (a fault, or a cancellation) ends
    the batch with an error instead of the rest going out on a fresh connection.
    """
    if conn._sock is None:
        conn.connect()
    sock = conn._sock
    gather = not isinstance(sock, ssl.SSLSocket)  # SSLSocket has no sendmsg
    try:
        for group in groups:
            if not gather:
                for piece in group:
                    sock.sendall(piece)
                continue
            views = [memoryview(piece) for piece in group]
            while views:
                sent = sock.sendmsg(views)
                while views and sent >= views[0].nbytes:  # drop what went out whole
                    sent -= views.pop(0).nbytes
                if sent:  # partly sent: the rest of that piece goes first next time
                    views[0] = views[0][sent:]
    except TimeoutError as exc:
        conn.disconnect()
        raise rex.TimeoutError("Timeout writing to socket") from exc
    except OSError as exc:
        conn.disconnect()
        raise rex.ConnectionError(f"Error {exc.errno} while writing to socket. {exc.strerror}.") from exc
    except BaseException:
        conn.disconnect()
        raise


def _finish_hash(hasher: Any, done: int, payload: memoryview) -> int:
    """The digest of a hash run ahead over ``payload[:done]``, completed with the rest."""
    if done < payload.nbytes:
        hasher.update(payload[done:])
    return int(hasher.intdigest())


class Node:
    """One Redis server: its connection pool and the batch operations (blocking; threads only).

    Each operation returns one outcome per key, in order: the value described by the method, or
    the ``ResponseError`` the server answered for that key (MOVED, OOM, WRONGTYPE, ...). A
    connection-level failure raises instead: the connection is dropped (redis-py reconnects on
    next use) and nothing of the batch is known.
    """

    def __init__(self, pool: ConnectionPool, name: str, sink: ReplySink) -> None:
        self.pool = pool
        self.name = name
        self._sink = sink  # the one its pool's parsers read (direct_read_parser)

    @contextlib.contextmanager
    def _connection(self, token: CancelToken | None, *, caller_memory: bool = False) -> Iterator[Any]:
        """A pooled connection; a cancellation of ``token`` drops it (a blocked read ends at once).
        ``caller_memory``: replies are received into the caller's buffers, so a cancelled batch
        waits until this connection is given back."""
        conn = self.pool.get_connection()
        try:
            if token is None:
                yield conn
            elif caller_memory:
                with token.touching_caller_memory(abort=conn.disconnect):
                    yield conn
            else:
                with token.on_cancel(conn.disconnect):
                    yield conn
        finally:
            self.pool.release(conn)

    def _replies(self, conn: Any, n: int) -> list[Any]:
        out: list[Any] = []
        for _ in range(n):
            try:
                out.append(conn.read_response())
            except rex.ResponseError as exc:  # one key's error; the stream is still in step
                out.append(exc)
        return out

    def command(self, *args: Any, token: CancelToken | None = None) -> Any:
        """One command through the normal redis-py path (PING, CONFIG GET, ...)."""
        with self._connection(token) as conn:
            conn.send_command(*args)
            return conn.read_response()

    def set_many(self, names: Sequence[bytes], items: Sequence[StoreItem], px: int | None,
                 token: CancelToken | None = None) -> list[Any]:
        """``SET name header‖payload [PX px]`` for each name, pipelined; replies read at the end.

        Headers are made here, from each item's carried checksum or one computed while the batch
        goes out (see :func:`_set_commands`).
        """
        with self._connection(token) as conn:
            _send_groups(conn, _set_commands(names, items, px))
            return self._replies(conn, len(names))

    def _simple_many(self, head: bytes, keys: Sequence[bytes], tail: bytes, token: CancelToken | None) -> list[Any]:
        with self._connection(token) as conn:
            conn.send_packed_command([b"".join(head + _bulk(k) + tail for k in keys)], check_health=False)
            return self._replies(conn, len(keys))

    def headers_many(self, keys: Sequence[bytes], token: CancelToken | None = None) -> list[Any]:
        """``GETRANGE key 0 63`` for each key: the stored header (``b""`` if absent, shorter if the
        value is), or the key's error. What ``contains`` checks, so it never counts a value a
        ``get`` would refuse."""
        return self._simple_many(b"*4\r\n$8\r\nGETRANGE\r\n", keys, _GETRANGE_HEADER, token)

    def unlink_many(self, keys: Sequence[bytes], token: CancelToken | None = None) -> list[Any]:
        """``UNLINK key`` for each key (frees large values off the server's main thread)."""
        return self._simple_many(b"*2\r\n$6\r\nUNLINK\r\n", keys, b"", token)

    def get_many(self, keys: Sequence[bytes], allocs: Sequence[Alloc],
                 token: CancelToken | None = None, *, caller_memory: bool = False) -> list[Any]:
        """``GET key`` for each key, reply ``i`` received into ``allocs[i]``'s buffers.

        Outcomes: :data:`FILLED`, ``None`` (absent) or the key's ``ResponseError``. Requests go
        out in windows sized from the largest value seen so far, so that about
        ``_GET_WINDOW_BYTES`` of replies wait at a time (at most 8 requests while no value has
        been seen: the first ones may be huge). ``caller_memory``: the buffers belong to the
        caller (``get_into``), see :meth:`_connection`.
        """
        out: list[Any] = []
        with self._connection(token, caller_memory=caller_memory) as conn:
            window = 1
            largest = 0
            start = 0
            while start < len(keys):
                chunk = keys[start:start + window]
                conn.send_packed_command(
                    [b"".join(b"*2\r\n$3\r\nGET\r\n" + _bulk(k) for k in chunk)], check_health=False)
                for i in range(start, start + len(chunk)):
                    outcome, nbytes = self._read_into(conn, allocs[i])
                    out.append(outcome)
                    largest = max(largest, nbytes)
                start += len(chunk)
                if largest:  # many small values per round trip, few large ones
                    window = max(1, min(_MAX_WINDOW, _GET_WINDOW_BYTES // largest))
                else:  # only misses so far: no size known yet
                    window = min(window * 2, 8)
            return out

    def _read_into(self, conn: Any, alloc: Alloc) -> tuple[Any, int]:
        """One GET reply into ``alloc``'s buffers; returns ``(outcome, reply length)``."""
        length = 0

        def sized(n: int) -> Sequence[memoryview] | None:
            nonlocal length
            length = n
            return alloc(n)

        sink = self._sink
        sink.alloc = sized
        sink.piece = getattr(alloc, "on_piece", None)
        try:
            reply = conn.read_response()
        except rex.ResponseError as exc:
            return exc, 0
        finally:
            sink.alloc = sink.piece = None
        if isinstance(reply, (bytes, bytearray)):  # hiredis answered (no direct path): copy once
            targets = sized(len(reply))
            if targets is not None:
                pos = 0
                for t in targets:
                    t[:] = reply[pos:pos + t.nbytes]
                    pos += t.nbytes
            return FILLED, length
        return reply, length

    def close(self) -> None:
        self.pool.disconnect()
