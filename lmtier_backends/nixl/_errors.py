"""The one place where the nixl tier turns NIXL, OS and HTTP failures into the lmtier error tree.

The manager degrades :class:`BackendError` to misses and skipped writes and opens its circuit
breaker on :class:`BackendUnavailableError`, so this mapping decides how a fault is handled:

* a transfer NIXL reports failed (``NIXL_ERR_BACKEND``: the S3 server is down, the connection
  was reset, an I/O failed), a disconnected peer, a refused connection
  -> :class:`BackendUnavailableError`
* a transfer past ``xfer_timeout_s`` -> :class:`BackendTimeoutError`
* disk full / quota -> :class:`CapacityError`, and the rest of :data:`lmtier.kit.OS_ERROR_RULES`
* anything else NIXL raises (invalid parameters, not supported, ...) -> :class:`BackendError`

NIXL's exceptions are recognised by class name: the same classes live in ``nixl_cu12`` and
``nixl_cu13``, and this module must not import either. Built on :class:`lmtier.kit.ErrorMap`.
"""

from __future__ import annotations

import http.client

from lmtier.errors import BackendTimeoutError, BackendUnavailableError, LmtierError
from lmtier.kit import OS_ERROR_RULES, ErrorMap, Rule

__all__ = ["TransferFailed", "TransferTimeout", "map_error"]

# NIXL binding exceptions that mean "the storage (or peer) could not do it now".
_UNAVAILABLE_NIXL = {"nixlBackendError", "nixlRemoteDisconnectError", "nixlCancelledError"}


class TransferFailed(Exception):
    """A NIXL transfer ended in error (internal; mapped by :func:`map_error`)."""


class TransferTimeout(Exception):
    """A NIXL transfer ran past its deadline and was cancelled (internal)."""


_RULES = (
    Rule(TransferTimeout, BackendTimeoutError, "raise xfer_timeout_s if the store is just slow"),
    Rule(lambda e: isinstance(e, TransferFailed) or type(e).__name__ in _UNAVAILABLE_NIXL,
         BackendUnavailableError, "NIXL reported a failed transfer: is the store reachable?"),
    *OS_ERROR_RULES,
    Rule(http.client.HTTPException, BackendUnavailableError, "the S3 endpoint answered badly: is it up?"),
)


def map_error(exc: BaseException, *, tier: str, op: str) -> LmtierError:
    """The lmtier error for ``exc`` raised while doing ``op`` (``get``, ``put`` ...) on ``tier``."""
    return ErrorMap(tier, _RULES)(exc, op=op)
