"""The one place where the nixl tier turns NIXL, OS and HTTP failures into the lmtier error tree.

The manager degrades :class:`BackendError` to misses and skipped writes and opens its circuit
breaker on :class:`BackendUnavailableError`, so this mapping decides how a fault is handled:

* a transfer NIXL reports failed (``NIXL_ERR_BACKEND``: the S3 server is down, the connection
  was reset, an I/O failed), a disconnected peer, a refused connection
  -> :class:`BackendUnavailableError`
* a transfer past ``xfer_timeout_s`` -> :class:`BackendTimeoutError`
* disk full / quota -> :class:`CapacityError`
* anything else NIXL raises (invalid parameters, not supported, ...) -> :class:`BackendError`

NIXL's exceptions are recognised by class name: the same classes live in ``nixl_cu12`` and
``nixl_cu13``, and this module must not import either.
"""

from __future__ import annotations

import errno
import http.client
import os

from lmtier.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    LmtierError,
)

__all__ = ["TransferFailed", "TransferTimeout", "map_error"]

_CAPACITY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_UNAVAILABLE_OS = {
    errno.EIO, errno.EROFS, errno.ENXIO, errno.ENODEV, errno.ESTALE, errno.ENOTCONN,
    errno.EACCES, errno.EPERM, errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.EPIPE,
}
# NIXL binding exceptions that mean "the storage (or peer) could not do it now".
_UNAVAILABLE_NIXL = {"nixlBackendError", "nixlRemoteDisconnectError", "nixlCancelledError"}


class TransferFailed(Exception):
    """A NIXL transfer ended in error (internal; mapped by :func:`map_error`)."""


class TransferTimeout(Exception):
    """A NIXL transfer ran past its deadline and was cancelled (internal)."""


def map_error(exc: BaseException, *, tier: str, op: str) -> LmtierError:
    """The lmtier error for ``exc`` raised while doing ``op`` (``get``, ``put`` ...) on ``tier``."""
    if isinstance(exc, LmtierError):
        return exc
    what = f"{tier}: {op} failed"
    name = type(exc).__name__
    if isinstance(exc, TransferTimeout):
        return BackendTimeoutError(f"{what}: {exc}; raise xfer_timeout_s if the store is just slow")
    if isinstance(exc, TransferFailed) or name in _UNAVAILABLE_NIXL:
        return BackendUnavailableError(f"{what}: NIXL reported {exc or name}; is the store reachable?")
    if isinstance(exc, TimeoutError):
        return BackendTimeoutError(f"{what}: timed out ({exc})")
    if isinstance(exc, OSError):
        detail = f"{exc.strerror or exc} [{errno.errorcode.get(exc.errno or 0, '?')}]"
        where = f" {os.fspath(exc.filename)}" if exc.filename else ""
        if exc.errno in _CAPACITY:
            return CapacityError(f"{what}{where}: {detail}; free space or lower max_bytes")
        if exc.errno in _UNAVAILABLE_OS or isinstance(exc, ConnectionError):
            return BackendUnavailableError(f"{what}{where}: {detail}")
        return BackendError(f"{what}{where}: {detail}")
    if isinstance(exc, http.client.HTTPException):
        return BackendUnavailableError(f"{what}: HTTP {name}: {exc}")
    if name.startswith("nixl"):
        return BackendError(f"{what}: NIXL raised {name} {exc}")
    return BackendError(f"{what}: unexpected {name}: {exc}")
