"""Zero-copy request bodies and response reads for big objects.

A stored object is ``64-byte header ‖ payload``. Concatenating them would copy a 37.7 MB chunk
into a freshly allocated buffer on every put (slower than the upload's own work on a fast
network), so :class:`HeaderedBody` streams the header then the payload as a seekable file
botocore understands (it reads it for the SigV4 hash, seeks back, and http.client sends it
block by block). Reads go the other way: :func:`read_exact_into` lets the socket write straight
into the destination buffer instead of through urllib3's intermediate ``bytes``.

Both take a :class:`CallGuard`, shared by the worker thread and the coroutine awaiting it, so a
cancelled call never leaves a thread touching the caller's buffer (see ``S3Backend._run``).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Aborted", "CallGuard", "HeaderedBody", "finish_response", "read_exact_into", "response_socket"]

_READ_BLOCK = 4 << 20  # response bytes per readinto: large enough to be cheap, small to abort fast


class Aborted(Exception):
    """The call was cancelled; the worker stopped streaming. Deliberately not an OSError, so
    neither botocore nor urllib3 retries it."""


class CallGuard:
    """Cancellation handshake between one worker thread and the coroutine awaiting it.

    * Uploads read the caller's buffer block by block and check :attr:`aborted` before each
      block: after an abort the request fails mid-body, so nothing read after it is ever stored
      (and a block torn by a late change fails the stored checksum: a miss, never wrong data).
    * Downloads write into the caller's buffer only inside :meth:`writing_caller_buffer`. An
      abort while inside shuts the socket down (the blocked ``recv_into`` returns at once) and
      tells the coroutine to wait for the worker to leave; an abort before it makes the worker
      refuse to enter. So once a cancelled ``get_into`` has unwound, no thread writes to ``out``.
    """

    __slots__ = ("_lock", "_sock", "_writing", "aborted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.aborted = False
        self._writing = False
        self._sock: socket.socket | None = None

    def check(self) -> None:
        if self.aborted:
            raise Aborted("call cancelled")

    @contextlib.contextmanager
    def writing_caller_buffer(self, sock: socket.socket | None) -> Iterator[None]:
        with self._lock:
            self.check()
            self._writing, self._sock = True, sock
        try:
            yield
        except Exception as exc:
            if self.aborted:  # the socket was shut under us: report the cancellation, not EOF
                raise Aborted("download cancelled") from exc
            raise
        finally:
            with self._lock:
                self._writing, self._sock = False, None

    def abort(self) -> bool:
        """Stop the worker; True when it is writing a caller buffer and must be waited for."""
        with self._lock:
            self.aborted = True
            if self._writing and self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            return self._writing


class HeaderedBody:
    """A read-only, seekable file over ``(header ‖ payload)[start:end]`` without concatenating.

    ``read`` returns memoryview slices of the caller's buffers (no copies); http.client sends
    them as they are. ``len()`` gives botocore the Content-Length.
    """

    def __init__(self, header: bytes, payload: memoryview, guard: CallGuard,
                 start: int = 0, end: int | None = None) -> None:
        self._header = memoryview(header)
        self._payload = payload
        self._guard = guard
        total = len(header) + payload.nbytes
        self._start = start
        self._end = total if end is None else end
        self._pos = start

    def __len__(self) -> int:
        return self._end - self._start

    def read(self, n: int | None = -1) -> memoryview | bytes:
        self._guard.check()
        remaining = self._end - self._pos
        if n is None or n < 0 or n > remaining:
            n = remaining
        if n == 0:
            return b""
        hlen = len(self._header)
        if self._pos < hlen:
            if self._pos + n <= hlen:
                out: memoryview | bytes = self._header[self._pos : self._pos + n]
            else:  # a read straddling header and payload: one small copy of header + head of payload
                out = bytes(self._header[self._pos :]) + bytes(self._payload[: self._pos + n - hlen])
        else:
            off = self._pos - hlen
            out = self._payload[off : off + n]
        self._pos += n
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: self._start, 1: self._pos, 2: self._end}[whence]
        self._pos = min(max(base + offset, self._start), self._end)
        return self._pos - self._start

    def tell(self) -> int:
        return self._pos - self._start

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True


def response_socket(body: Any) -> socket.socket | None:
    """The socket a botocore StreamingBody reads from, if urllib3 exposes it."""
    conn = getattr(getattr(body, "_raw_stream", None), "connection", None)
    sock = getattr(conn, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def read_exact_into(body: Any, out: memoryview, guard: CallGuard) -> None:
    """Fill ``out`` from a botocore StreamingBody; ConnectionError if the stream ends early.

    Uses http.client's ``readinto`` on the response under urllib3 when present (the socket
    writes into ``out`` directly); otherwise StreamingBody.readinto (one extra copy per block).
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    target: Any = fp if isinstance(fp, http.client.HTTPResponse) else body
    pos, total = 0, out.nbytes
    while pos < total:
        guard.check()
        got = target.readinto(out[pos : min(pos + _READ_BLOCK, total)])
        if not got:
            raise ConnectionError(f"the response ended after {pos} of {total} bytes")
        pos += got


def finish_response(body: Any, *, consumed: bool) -> None:
    """Return the connection to the pool after a complete read, or drop it otherwise.

    After :func:`read_exact_into` read exactly Content-Length bytes, http.client has closed the
    response and the keep-alive connection can be reused; anything left unread means the
    connection is in an unknown state, so it is closed.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if consumed and raw is not None and (fp is None or getattr(fp, "isclosed", lambda: False)()):
        release = getattr(raw, "release_conn", None)
        if release is not None:
            release()
            return
    body.close()
