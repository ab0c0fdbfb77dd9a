"""The one place where the redis tier turns redis-py and socket errors into the lmtier tree.

The manager degrades :class:`BackendError` to misses and skipped writes and opens its circuit
breaker on :class:`BackendUnavailableError`, so this mapping decides how a fault is handled:

* refused / reset / closed connection, server loading, cluster down, a node moved away, a
  read-only replica -> :class:`BackendUnavailableError` (the tier is taken out for a while)
* a socket deadline passed -> :class:`BackendTimeoutError`
* ``OOM command not allowed when used memory > 'maxmemory'``, a value over
  ``proto-max-bulk-len`` -> :class:`CapacityError` (a skipped write; reads still work)
* authentication / ACL refusals, an untrusted TLS certificate -> :class:`ConfigError` when the
  tier opens (the user must fix the password, user or CA file), :class:`BackendUnavailableError`
  later (e.g. a rotated password)
* anything else -> :class:`BackendError`

Messages name the server by its credential-free URL; redis-py's own messages carry host and
port only, never the password.
"""

from __future__ import annotations

import socket
import ssl

from redis import exceptions as rex

from lmtier.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    LmtierError,
)

__all__ = ["map_error"]

_AUTH = (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError)
_UNAVAILABLE = (
    rex.ConnectionError,  # refused, reset, closed; BusyLoadingError and MaxConnectionsError too
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.ReadOnlyError,
    rex.MovedError,
    rex.AskError,
    rex.ClusterError,
    rex.RedisClusterException,
    rex.InvalidResponse,  # a desynchronised stream: the connection was dropped
    ssl.SSLError,
    OSError,
)


def map_error(exc: BaseException, *, op: str, where: str, at_open: bool = False) -> LmtierError:
    """The lmtier error for ``exc`` raised while doing ``op`` against the server at ``where``."""
    if isinstance(exc, LmtierError):
        return exc
    what = f"redis tier {where}: {op} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, _AUTH):
        if at_open:
            return ConfigError(
                f"redis tier {where}: the server refused our credentials ({exc}); check username "
                "and the password (password_env / the url) and the user's ACL permissions"
            )
        return BackendUnavailableError(f"{what}; the server refused our credentials (rotated password?)")
    if at_open and _is_untrusted_certificate(exc):
        return ConfigError(
            f"redis tier {where}: the server's TLS certificate was not trusted ({exc}); set "
            "tls_ca_file to the CA that signed it (or tls_verify: false for a test setup)"
        )
    if isinstance(exc, (rex.TimeoutError, socket.timeout, TimeoutError)):
        return BackendTimeoutError(f"{what}; raise read_timeout_s / connect_timeout_s or check the server load")
    if isinstance(exc, rex.OutOfMemoryError) or _is_too_big(exc):
        return CapacityError(
            f"{what}; the server is at maxmemory (with a noeviction policy) or the value exceeds "
            "proto-max-bulk-len: free memory, raise maxmemory, or use an evicting maxmemory-policy"
        )
    if isinstance(exc, _UNAVAILABLE):
        return BackendUnavailableError(f"{what}; is the server up and reachable?")
    return BackendError(what)


def _is_untrusted_certificate(exc: BaseException) -> bool:
    """redis-py wraps the ssl error in a ConnectionError; look along the chain."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_too_big(exc: BaseException) -> bool:
    """A value larger than the server accepts (proto-max-bulk-len, query buffer limit)."""
    if not isinstance(exc, rex.ResponseError):
        return False
    text = str(exc).lower()
    return "string exceeds maximum allowed size" in text or "invalid bulk length" in text
