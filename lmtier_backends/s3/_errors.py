"""The one place where boto3 / botocore / urllib3 errors become :mod:`lmtier.errors`.

Operations ask three questions of a :class:`~botocore.exceptions.ClientError` that are *not*
errors for the tier (a missing key is a miss; a failed ``If-None-Match`` means "already there";
``501`` means the server lacks conditional writes) and hand everything else to
:func:`translate`, which picks the :mod:`lmtier.errors` class the manager degrades:

==========================================================  ==================================
client error                                                 lmtier error
==========================================================  ==================================
connect/read timeout, ``RequestTimeout``, ``socket.timeout``  BackendTimeoutError
refused/reset/closed, 5xx, ``SlowDown``/throttling, proxy    BackendUnavailableError
403 / bad signature / unknown key, ``NoSuchBucket`` at run   BackendUnavailableError (says why)
``EntityTooLarge``, ``QuotaExceeded``, 507                   CapacityError
no credentials, unknown profile or region                    ConfigError
anything else from the client                                BackendError
==========================================================  ==================================

At open, :func:`translate_open` is stricter: rejected credentials and a missing bucket are
:class:`~lmtier.errors.ConfigError` that say what to fix.
"""

from __future__ import annotations

import http.client
import socket
from typing import Any

import botocore.exceptions as bce
import urllib3.exceptions as u3e

from lmtier.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    LmtierError,
)
from lmtier.kit import ErrorMap, Rule, describe

__all__ = [
    "error_code",
    "error_status",
    "is_not_found",
    "is_not_implemented",
    "is_precondition_failed",
    "translate",
    "translate_open",
]

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_AUTH_CODES = frozenset({
    "AccessDenied", "403", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed",
})
_THROTTLE_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "ServiceUnavailable", "InternalError", "RequestThrottled", "BandwidthLimitExceeded",
})
_CAPACITY_CODES = frozenset({"EntityTooLarge", "QuotaExceeded", "InsufficientStorage", "StorageFull"})


def error_code(exc: BaseException) -> str:
    """The S3 error code of a ClientError ('' otherwise)."""
    if isinstance(exc, bce.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def error_status(exc: BaseException) -> int:
    """The HTTP status of a ClientError (0 otherwise)."""
    if isinstance(exc, bce.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def is_not_found(exc: BaseException) -> bool:
    """A missing object (a miss, not an error). ``NoSuchBucket`` is not a miss."""
    code = error_code(exc)
    return code in _NOT_FOUND_CODES or (error_status(exc) == 404 and code != "NoSuchBucket")


def is_precondition_failed(exc: BaseException) -> bool:
    """``If-None-Match: *`` failed (412), or lost a race with another conditional write (409)."""
    code = error_code(exc)
    return error_status(exc) == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict")


def is_not_implemented(exc: BaseException) -> bool:
    """The server does not support a feature we asked for (e.g. conditional PUT)."""
    return error_status(exc) == 501 or error_code(exc) == "NotImplemented"


def _client_detail(exc: BaseException) -> str:
    """``<code or status> <message>`` of a ClientError."""
    assert isinstance(exc, bce.ClientError)
    message = exc.response.get("Error", {}).get("Message", "")
    return f"{error_code(exc) or error_status(exc)} {message}".rstrip()


def _client(test: Any) -> Any:
    """A rule matcher over ClientErrors: ``test(code, status)``."""
    return lambda e: isinstance(e, bce.ClientError) and test(error_code(e), error_status(e))


_RULES = (
    Rule(_client(lambda c, s: c == "RequestTimeout" or s == 408), BackendTimeoutError, "the server timed out the request"),
    Rule(_client(lambda c, s: c in _CAPACITY_CODES or s == 507), CapacityError, "the store or quota is full"),
    Rule(_client(lambda c, s: c in _THROTTLE_CODES or s >= 500 or s == 429), BackendUnavailableError,
         "the server is overloaded or failing, retry later"),
    Rule(_client(lambda c, s: c in _AUTH_CODES or s == 403), BackendUnavailableError,
         "the credentials were rejected (rotated or expired keys?)"),
    Rule(_client(lambda c, s: c == "NoSuchBucket"), BackendUnavailableError, "the bucket was deleted while the tier was open"),
    Rule(bce.ClientError, BackendError),
    Rule((bce.ConnectTimeoutError, bce.ReadTimeoutError, u3e.TimeoutError, socket.timeout), BackendTimeoutError,
         "the request timed out: raise connect/read_timeout_s if the store is slow"),
    Rule((bce.NoCredentialsError, bce.PartialCredentialsError, bce.ProfileNotFound, bce.NoRegionError,
          bce.CredentialRetrievalError), ConfigError,
         "configure credentials (access_key_env/secret_key_env, AWS_* variables or a profile) and the region"),
    Rule((bce.ConnectionError, bce.HTTPClientError, u3e.HTTPError, http.client.HTTPException, OSError),
         BackendUnavailableError, "cannot talk to the server"),
)


def _describe(exc: BaseException) -> str:
    return _client_detail(exc) if isinstance(exc, bce.ClientError) else describe(exc)


_ERRORS = ErrorMap("s3", _RULES, describer=_describe)


def translate(exc: BaseException, *, op: str, where: str) -> LmtierError:
    """Map any client exception raised during ``op`` on ``where`` (bucket/key) to LmtierError."""
    return _ERRORS(exc, op=op, where=where)


def translate_open(exc: BaseException, *, bucket: str, endpoint: str, config: Any) -> LmtierError:
    """Errors of the open-time bucket check: what the operator must fix, as ConfigError."""
    code, status = error_code(exc), error_status(exc)
    where = f"bucket {bucket!r} at {endpoint}"
    if is_not_found(exc) or code == "NoSuchBucket":
        return ConfigError(
            f"s3 tier: {where} does not exist; create it, or set create_bucket: true in the "
            "tier's options"
        )
    if code in _AUTH_CODES or status == 403:
        source = (f"the keys from ${config.access_key_env}/${config.secret_key_env}"
                  if config.access_key_env else "the keys found by boto3's credential chain")
        return ConfigError(
            f"s3 tier: {where} rejected {source} ({code or status}); check the access key and "
            "secret, and that this identity may list and write the bucket"
        )
    if status in (301, 400) and code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "400", "301"):
        return ConfigError(f"s3 tier: {where} answered {code or status}; check `region` and `endpoint_url`")
    return translate(exc, op="open", where=where)
