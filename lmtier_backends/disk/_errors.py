"""The one place where the disk tier turns ``OSError`` into the lmtier error tree.

The manager degrades :class:`BackendError` to misses and skipped writes and opens its circuit
breaker on :class:`BackendUnavailableError`, so the mapping decides how a fault is handled:

* disk full / quota / file too big -> :class:`CapacityError` (a skipped write; reads still work)
* the device or filesystem is failing or gone (EIO, permissions pulled, stale mount) ->
  :class:`BackendUnavailableError` (the tier is taken out for a while)
* a read-only filesystem (EROFS, e.g. ext4 ``errors=remount-ro``) -> :class:`BackendError`: only
  writes fail, and the files still read fine, so the breaker must not take the tier out
* anything else -> :class:`BackendError`

At open time, a root that cannot be created or written is a :class:`ConfigError` instead: the
tier is misconfigured, not failing, and the user has to change ``root``.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmtier.errors import BackendError, ConfigError
from lmtier.kit import OS_ERROR_RULES, ErrorMap, ForeignRootError, describe

__all__ = ["foreign_root_error", "map_os_error", "root_config_error"]


def map_os_error(exc: OSError, *, op: str, path: str | os.PathLike[str] | None = None) -> BackendError:
    """The lmtier error for an ``OSError`` raised while doing ``op`` on ``path``
    (:data:`lmtier.kit.OS_ERROR_RULES`)."""
    error = ErrorMap("disk tier", OS_ERROR_RULES)(exc, op=op, where=os.fspath(path) if path is not None else "")
    assert isinstance(error, BackendError)
    return error


def root_config_error(exc: OSError, root: Path) -> ConfigError:
    """The error for a tier ``root`` that cannot be created or written at open."""
    return ConfigError(
        f"disk tier: root {os.fspath(root)!r} is not a writable directory ({describe(exc)}); "
        "set options.root to a directory this process can create and write, e.g. on a local NVMe drive"
    )


def foreign_root_error(exc: ForeignRootError) -> ConfigError:
    """The error for a ``root`` that holds files but not the tier's marker."""
    return ConfigError(f"disk tier: {exc}; set options.root accordingly")

