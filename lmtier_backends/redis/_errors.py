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
port only, never the password. Built on :class:`lmtier.kit.ErrorMap`.
"""

from __future__ import annotations

import socket
import ssl

from redis import exceptions as rex

from lmtier.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    LmtierError,
)
from lmtier.kit import OS_ERROR_RULES, ErrorMap, Rule

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
)


def _untrusted_certificate(exc: BaseException) -> bool:
    """redis-py wraps the ssl error in a ConnectionError; look along the chain."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _too_big(exc: BaseException) -> bool:
    """A value larger than the server accepts (proto-max-bulk-len, query buffer limit)."""
    if not isinstance(exc, rex.ResponseError):
        return False
    text = str(exc).lower()
    return "string exceeds maximum allowed size" in text or "invalid bulk length" in text


_RULES = (
    Rule(_AUTH, BackendUnavailableError, "the server refused our credentials (rotated password?)"),
    Rule((rex.TimeoutError, socket.timeout, TimeoutError), BackendTimeoutError,
         "raise read_timeout_s / connect_timeout_s or check the server load"),
    Rule(lambda e: isinstance(e, rex.OutOfMemoryError) or _too_big(e), CapacityError,
         "the server is at maxmemory (with a noeviction policy) or the value exceeds proto-max-bulk-len: "
         "free memory, raise maxmemory, or use an evicting maxmemory-policy"),
    Rule(_UNAVAILABLE, BackendUnavailableError, "is the server up and reachable?"),
    *OS_ERROR_RULES,
    Rule(OSError, BackendUnavailableError, "is the server up and reachable?"),
)
_AT_OPEN = (
    Rule(_AUTH, ConfigError, "the server refused our credentials: check username and the password "
         "(password_env / the url) and the user's ACL permissions"),
    Rule(_untrusted_certificate, ConfigError, "the server's TLS certificate was not trusted: set "
         "tls_ca_file to the CA that signed it (or tls_verify: false for a test setup)"),
)


def map_error(exc: BaseException, *, op: str, where: str, at_open: bool = False) -> LmtierError:
    """The lmtier error for ``exc`` raised while doing ``op`` against the server at ``where``."""
    errors = ErrorMap(f"redis tier {where}", _RULES)
    if at_open:
        errors = errors.with_rules(_AT_OPEN)
    return errors(exc, op=op)
