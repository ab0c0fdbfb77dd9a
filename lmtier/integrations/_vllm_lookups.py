"""The vLLM scheduler's synchronous line to its workers' lookups (machinery of the vLLM connector).

vLLM's scheduler asks a connector how much of a new request's prompt it holds
(``get_num_new_matched_tokens``) and schedules the request with the answer at once; lmtier's tiers
live with the workers. Without a line to them the scheduler answers "ask again", the question
rides to the workers in the next step's metadata, and the request waits one engine step — under
load, a long one. A line answers within the same scheduling pass:

* :class:`DirectLine` — the worker's engine lives in the scheduler's process (one GPU without
  multiprocessing executors, or ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): call it.
* :class:`SocketLine` — workers in other processes of the same host (vLLM's multiprocessing
  executor: CPU, tensor parallelism): each worker serves its engine's lookups on a Unix socket
  (:class:`LookupServer`, in a directory only its user can enter) and reports the path in its
  worker metadata; the scheduler connects to every rank and takes the minimum.

Either way the answer is the worker engine's own (every tier, the load-cost decision, its log
line); when it does not come within the deadline the connector falls back to the metadata round
trip. Wire format of the socket: frames of a 4-byte big-endian length and one
MessagePack map (:class:`Ask` / :class:`Answer`); one request at a time per connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import msgspec

from lmtier.server.protocol import FRAME_HEADER, frame

__all__ = ["Answer", "Ask", "DirectLine", "LookupLine", "LookupServer", "SocketLine"]

log = logging.getLogger("lmtier.vllm")
# frames as lmtier serve's (lmtier.server.protocol), with a larger bound: a lookup carries a
# whole prompt's block hashes, and a prompt of millions of tokens still fits; larger is garbage
_MAX_FRAME = 64 << 20
_RETRY_S = 5.0  # after a rank failed to answer, how long the line stays down before reconnecting
_HOP_S = 0.05  # beyond the worker's own deadline: its thread waking up on a busy host, the socket


class Ask(msgspec.Struct, omit_defaults=True):
    """One lookup, as the worker engine takes it (:meth:`~lmtier.engine.KVCacheEngine.locate_async`)."""

    req_id: str
    token_ids: list[int]
    limit: int
    identity: list[tuple[str, str]] = []
    start: int = 0
    record: bool = True
    timeout_s: float = 0.02
    id: int = 0


class Answer(msgspec.Struct, omit_defaults=True):
    """Tokens worth loading and ``(tier, tokens)`` runs of the hit; ``error`` when there is none."""

    tokens: int = 0
    runs: list[tuple[str, int]] = []
    error: str = ""
    id: int = 0


class LookupLine(Protocol):
    """How the scheduler connector reaches its workers' lookups synchronously."""

    def ask(self, ask: Ask) -> Answer | None:
        """The workers' answer (the minimum over ranks); an :class:`Answer` with ``error`` when a
        worker got the ask but had no answer by its deadline (its lookup goes on, and counts);
        None when the ask did not reach them or no reply came in time."""
        ...

    def close(self) -> None: ...


class DirectLine:
    """The worker's answer function in this very process."""

    def __init__(self, answer: Callable[[Ask], Answer]) -> None:
        self._answer = answer

    def ask(self, ask: Ask) -> Answer | None:
        return self._answer(ask)

    def close(self) -> None:
        return


class LookupServer:
    """A worker's lookups on a Unix socket: a daemon thread per connection, ``answer`` per request.

    The socket lives in a fresh directory of mode 0700 (only this user can connect); :meth:`close`
    removes both.
    """

    def __init__(self, answer: Callable[[Ask], Answer], *, name: str = "lmtier-lookups") -> None:
        self._answer = answer
        self._dir = tempfile.mkdtemp(prefix="lmtier-vllm-")
        self.path = os.path.join(self._dir, "lookups.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._sock.bind(self.path)
            self._sock.listen(8)
        except OSError:
            self._sock.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._thread = threading.Thread(target=self._accept, name=name, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="lmtier-lookup-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        decode = msgspec.msgpack.Decoder(Ask).decode
        encode = msgspec.msgpack.Encoder().encode
        try:
            while True:
                body = _recv_frame(conn)
                if body is None:
                    return
                try:
                    ask = decode(body)
                except msgspec.DecodeError as exc:
                    log.warning("lmtier: bad lookup message on %s (%s); closing it", self.path, exc)
                    return
                try:
                    answer = self._answer(ask)
                except Exception as exc:  # a lookup that failed is a miss, said as an error
                    answer = Answer(error=f"{type(exc).__name__}: {exc}")
                answer.id = ask.id
                _send_frame(conn, encode(answer))
        except OSError:
            return  # the scheduler went away
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns, self._conns = list(self._conns), set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=1.0)
        shutil.rmtree(self._dir, ignore_errors=True)


class SocketLine:
    """The scheduler's connections to every rank's :class:`LookupServer` (``{rank: path}``).

    A rank that does not answer by the ask's deadline (or at all) takes the line down for a few
    seconds: those asks answer None and the connector uses its metadata round trip.
    """

    def __init__(self, paths: Mapping[int, str]) -> None:
        self._paths = dict(paths)
        self._socks: dict[int, socket.socket] = {}
        self._down_until = 0.0
        self._next_id = 0
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Answer).decode

    def ask(self, ask: Ask) -> Answer | None:
        now = time.monotonic()
        if now < self._down_until:
            return None
        self._next_id += 1
        ask.id = self._next_id
        deadline = now + ask.timeout_s + _HOP_S  # the worker's own wait, plus the hop
        try:
            frame = self._encode(ask)
            socks = [self._connect(rank) for rank in self._paths]
            for sock in socks:
                _send_frame(sock, frame)
            answers = []
            for sock in socks:
                sock.settimeout(max(1e-4, deadline - time.monotonic()))
                body = _recv_frame(sock)
                if body is None:
                    raise ConnectionError("the worker closed its lookup socket")
                answer = self._decode(body)
                if answer.id != ask.id:
                    raise ConnectionError(f"answer {answer.id} to ask {ask.id}")
                answers.append(answer)
        except (OSError, msgspec.DecodeError) as exc:  # timeouts included
            self._down(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return None
        failed = [a for a in answers if a.error]
        if failed:
            return Answer(error=failed[0].error)
        best = min(answers, key=lambda a: a.tokens)  # ranks hold the same chunks: the minimum is safe
        return Answer(tokens=best.tokens, runs=best.runs)

    def _connect(self, rank: int) -> socket.socket:
        sock = self._socks.get(rank)
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(0.5)
            try:
                sock.connect(self._paths[rank])
            except OSError:
                sock.close()
                raise
            self._socks[rank] = sock
        return sock

    def _down(self, why: str) -> None:
        log.info("lmtier: the scheduler's lookup line to the workers failed (%s); requests wait one "
                 "engine step for their lookup for the next %.0f s", why, _RETRY_S)
        self._down_until = time.monotonic() + _RETRY_S
        self.close()

    def close(self) -> None:
        socks, self._socks = list(self._socks.values()), {}
        for sock in socks:
            sock.close()


def _send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(frame(body))


def _recv_frame(sock: socket.socket) -> bytes | None:
    """One frame's body; None when the peer closed the connection cleanly between frames."""
    head = _recv_exact(sock, FRAME_HEADER.size, eof_ok=True)
    if head is None:
        return None
    (n,) = FRAME_HEADER.unpack(head)
    if not 0 < n <= _MAX_FRAME:
        raise ConnectionError(f"lookup frame of {n} bytes")
    body = _recv_exact(sock, n, eof_ok=False)
    assert body is not None
    return body


def _recv_exact(sock: socket.socket, n: int, *, eof_ok: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            if eof_ok and not buf:
                return None
            raise ConnectionError("the lookup connection closed mid-frame")
        buf += part
    return bytes(buf)
