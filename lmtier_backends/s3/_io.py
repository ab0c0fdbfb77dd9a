"""Zero-copy request bodies and response reads for big objects.

A stored object is ``64-byte header ‖ payload``. Concatenating them would copy a 37.7 MB chunk
into a freshly allocated buffer on every put (slower than the upload's own work on a fast
network), so :class:`HeaderedBody` streams the header then the payload as a seekable file
botocore understands (it reads it for the SigV4 hash, seeks back, and http.client sends it
block by block). Reads go the other way: :func:`read_exact_into` lets the socket write straight
into the destination buffer instead of through urllib3's intermediate ``bytes``.

Both take the call's :class:`lmtier.kit.CancelToken` and check it between blocks, so a cancelled
call stops streaming at the next block (a download into the caller's buffer also has its socket
shut, see ``S3Backend._get_into_one``).
"""

from __future__ import annotations

import http.client
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtier.kit import CancelToken

__all__ = ["HeaderedBody", "finish_response", "read_exact_into", "response_socket"]

_READ_BLOCK = 4 << 20  # response bytes per readinto: large enough to be cheap, small to abort fast


class HeaderedBody:
    """A read-only, seekable file over ``(header ‖ payload)[start:end]`` without concatenating.

    ``read`` returns memoryview slices of the caller's buffers (no copies); http.client sends
    them as they are. ``len()`` gives botocore the Content-Length.
    """

    def __init__(self, header: bytes, payload: memoryview, token: CancelToken,
                 start: int = 0, end: int | None = None) -> None:
        self._header = memoryview(header)
        self._payload = payload
        self._token = token
        total = len(header) + payload.nbytes
        self._start = start
        self._end = total if end is None else end
        self._pos = start

    def __len__(self) -> int:
        return self._end - self._start

    def read(self, n: int | None = -1) -> memoryview | bytes:
        self._token.check()  # after a cancellation the request fails mid-body: nothing later is stored
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


def read_exact_into(body: Any, out: memoryview, token: CancelToken) -> None:
    """Fill ``out`` from a botocore StreamingBody; ConnectionError if the stream ends early.

    Uses http.client's ``readinto`` on the response under urllib3 when present (the socket
    writes into ``out`` directly); otherwise StreamingBody.readinto (one extra copy per block).
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    target: Any = fp if isinstance(fp, http.client.HTTPResponse) else body
    pos, total = 0, out.nbytes
    while pos < total:
        token.check()
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
