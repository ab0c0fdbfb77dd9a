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


def translate(exc: BaseException, *, op: str, where: str) -> LmtierError:
    """Map any client exception raised during ``op`` on ``where`` (bucket/key) to LmtierError."""
    if isinstance(exc, LmtierError):
        return exc
    what = f"s3 {op} {where}"
    if isinstance(exc, bce.ClientError):
        code, status = error_code(exc), error_status(exc)
        detail = f"{what}: {code or status} {exc.response.get('Error', {}).get('Message', '')}".rstrip()
        if code == "RequestTimeout" or status == 408:
            return BackendTimeoutError(f"{detail}; the server timed out the request")
        if code in _CAPACITY_CODES or status == 507:
            return CapacityError(f"{detail}; the store or quota is full")
        if code in _THROTTLE_CODES or status >= 500 or status == 429:
            return BackendUnavailableError(f"{detail}; the server is overloaded or failing, retry later")
        if code in _AUTH_CODES or status == 403:
            return BackendUnavailableError(
                f"{detail}; the credentials were rejected (rotated or expired keys?)"
            )
        if code == "NoSuchBucket":
            return BackendUnavailableError(f"{detail}; the bucket was deleted while the tier was open")
        return BackendError(detail)
    if isinstance(exc, (bce.ConnectTimeoutError, bce.ReadTimeoutError, u3e.TimeoutError, socket.timeout)):
        return BackendTimeoutError(f"{what}: timed out ({exc}); raise connect/read_timeout_s if the store is slow")
    if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.ProfileNotFound,
                        bce.NoRegionError, bce.CredentialRetrievalError)):
        return ConfigError(f"{what}: {exc}; configure credentials (access_key_env/secret_key_env, "
                           "AWS_* variables or a profile) and the region")
    if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, u3e.HTTPError,
                        http.client.HTTPException, OSError)):
        return BackendUnavailableError(f"{what}: cannot talk to the server ({type(exc).__name__}: {exc})")
    if isinstance(exc, bce.BotoCoreError):
        return BackendError(f"{what}: {type(exc).__name__}: {exc}")
    return BackendError(f"{what}: unexpected {type(exc).__name__}: {exc}")


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
