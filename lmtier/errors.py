"""The lmtier exception tree.

Every error lmtier raises on purpose derives from :class:`LmtierError`, so callers can catch one
type. Messages say what went wrong *and what to do next*.

::

    LmtierError
    ├── ConfigError (ValueError)          bad YAML / options / env override; names the key path
    ├── InvalidArgumentError (TypeError)  wrong key type, non-buffer value, bad shapes at a call
    ├── PluginError                       entry point broken, duplicate backend name, extra missing
    ├── BackendError                      a tier failed an operation
    │   ├── BackendUnavailableError       connection refused/reset, server down (circuit breaker)
    │   │   └── BackendTimeoutError       the tier did not answer in time
    │   ├── CapacityError                 the tier is full (maxmemory, disk full, quota)
    │   └── CorruptDataError              stored bytes failed the header/checksum check
    ├── NotSupportedError                 the backend or platform lacks an optional capability
    └── NativeUnavailableError            the CUDA library is missing or cannot run here

The manager turns :class:`BackendError` into misses / skipped writes (faults are misses);
:class:`ConfigError`, :class:`InvalidArgumentError` and :class:`PluginError` reach the caller.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "CapacityError",
    "ConfigError",
    "CorruptDataError",
    "InvalidArgumentError",
    "LmtierError",
    "NativeUnavailableError",
    "NotSupportedError",
    "PluginError",
]


class LmtierError(Exception):
    """Base of every error lmtier raises on purpose."""


class ConfigError(LmtierError, ValueError):
    """The configuration is invalid; the message names the key path and what is allowed."""


class InvalidArgumentError(LmtierError, TypeError):
    """A call got an argument of the wrong type or shape (e.g. a non-buffer value, a str key)."""


class PluginError(LmtierError):
    """A backend plugin could not be loaded or registered (broken entry point, duplicate name)."""


class BackendError(LmtierError):
    """A storage tier failed an operation. The manager degrades it to a miss or skipped write."""


class BackendUnavailableError(BackendError):
    """The tier cannot be reached (refused, reset, down). Trips the manager's circuit breaker."""


class BackendTimeoutError(BackendUnavailableError):
    """The tier did not answer within its configured timeout."""


class CapacityError(BackendError):
    """The tier is full (maxmemory, ENOSPC, quota). A put becomes a skipped write."""


class CorruptDataError(BackendError):
    """Stored bytes failed validation (magic, version, namespace, length or checksum)."""


class NotSupportedError(LmtierError):
    """An optional capability is not available for this backend, layout or platform."""


class NativeUnavailableError(LmtierError):
    """The native CUDA transfer library cannot be loaded or used on this machine."""
