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

import errno
import os
from pathlib import Path

from lmtier.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
)
from lmtier_backends.disk._files import MARKER

__all__ = ["foreign_root_error", "map_os_error", "root_config_error"]

_CAPACITY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_TIMEOUT = {errno.ETIMEDOUT}
_UNAVAILABLE = {
    errno.EIO, errno.ENXIO, errno.ENODEV, errno.ESTALE, errno.ENOTCONN,
    errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EHOSTDOWN, errno.ESHUTDOWN,
}


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"{exc.strerror or exc} [{name}]"


def map_os_error(exc: OSError, *, op: str, path: str | os.PathLike[str] | None = None) -> BackendError:
    """The lmtier error for an ``OSError`` raised while doing ``op`` on ``path``."""
    where = f" {os.fspath(path)}" if path is not None else ""
    what = f"disk tier: {op}{where} failed: {_describe(exc)}"
    if exc.errno in _CAPACITY:
        return CapacityError(f"{what}; free space on that filesystem or lower the tier's max_bytes")
    if exc.errno == errno.EROFS:
        return BackendError(f"{what}; the filesystem is read-only: writes are skipped, reads go on; "
                            "remount it read-write to store again")
    if exc.errno in _TIMEOUT:
        return BackendTimeoutError(f"{what}; the filesystem did not answer (network mount?)")
    if exc.errno in _UNAVAILABLE:
        return BackendUnavailableError(
            f"{what}; check the device, mount and permissions of the tier's root"
        )
    return BackendError(what)


def root_config_error(exc: OSError, root: Path) -> ConfigError:
    """The error for a tier ``root`` that cannot be created or written at open."""
    return ConfigError(
        f"disk tier: root {os.fspath(root)!r} is not a writable directory ({_describe(exc)}"
        f"{f' at {exc.filename!r}' if exc.filename else ''}); set options.root to a directory "
        "this process can create and write, e.g. on a local NVMe drive"
    )


def foreign_root_error(root: Path, names: list[str]) -> ConfigError:
    """The error for a ``root`` that holds files but not the tier's marker."""
    shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return ConfigError(
        f"disk tier: root {os.fspath(root)!r} is not empty ({shown}) and has no {MARKER} marker, so it "
        "is not a disk tier's directory; the tier deletes files in its root and never adopts a "
        "directory it did not create. Set options.root to a new or empty directory (e.g. "
        f"{os.fspath(root / 'lmtier')!r}); if this is a disk tier made by an older lmtier, create "
        f"the marker: touch {os.fspath(root / MARKER)!r}"
    )
