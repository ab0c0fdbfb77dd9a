"""The backend kit: what every storage backend needs, written once (built-in and third-party alike).

=============================  ===========================================================
:class:`WorkerPool`            bounded worker threads for blocking clients; cancel-safe
                               (:class:`CancelToken`: abort actions, caller-memory spans)
:func:`put_items`              a ``put`` batch as :class:`StoreItem` (view, header, checksum
                               carried by a :class:`Payload` from tier to tier), sizes checked
:func:`check_stored`           header + payload (held in different buffers) validated;
:func:`stored_value`           a coded value returned with its codec facts (Payload);
                               :class:`Rejections` counts and logs corrupt / newer-format values
:class:`KeyFaults`            a read batch's per-key faults settled: misses (counted, logged),
                               raised only when no key of the batch answered
:class:`AsyncClosing`         ``async with`` for a backend: ``__aexit__`` awaits ``aclose()``
:func:`check_keys`,            argument checks with errors that say what to pass, for a backend
:func:`check_items`,           also called without a manager; :func:`into_views` for
:func:`into_views`             ``get_into``'s buffers
:class:`ErrorMap`, :class:`Rule`  client exceptions -> the lmtier error tree, with advice;
                               :data:`OS_ERROR_RULES` for files and sockets
:class:`FileLayout`,           the storage names shared by every transport over files
:func:`claim_root`,            (disk, NIXL posix: a claimed root, exact temp names, a scan
:func:`scan_files`,            that cleans only names a tier makes) and objects (s3, NIXL obj);
:func:`object_name`            :class:`FileLayoutOptions`: a config's ``fan_out``, declared once
=============================  ===========================================================

``docs/writing-a-backend.md`` builds a backend with it. Importing this package is cheap: each
name loads its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtier.kit.checks import check_items, check_keys, into_views
    from lmtier.kit.errors import OS_ERROR_RULES, ErrorMap, Rule, describe, errno_in
    from lmtier.kit.faults import KeyFaults
    from lmtier.kit.lifecycle import AsyncClosing
    from lmtier.kit.naming import (
        MARKER,
        TEMP_MARK,
        FileLayout,
        ForeignRootError,
        RootGoneError,
        ScanResult,
        check_root,
        claim_root,
        create_temp_file,
        legacy_object_name,
        migrate_object_names,
        normalize_prefix,
        object_name,
        remove_stored_file,
        scan_files,
    )
    from lmtier.kit.options import FileLayoutOptions
    from lmtier.kit.runner import Cancelled, CancelToken, Outcome, WorkerPool
    from lmtier.kit.stored import Rejections, check_stored, stored_size, stored_value
    from lmtier.kit.values import Payload, StoreItem, checksum_of, put_items

__all__ = [
    "MARKER",
    "OS_ERROR_RULES",
    "TEMP_MARK",
    "AsyncClosing",
    "CancelToken",
    "Cancelled",
    "ErrorMap",
    "FileLayout",
    "FileLayoutOptions",
    "ForeignRootError",
    "KeyFaults",
    "Outcome",
    "Payload",
    "Rejections",
    "RootGoneError",
    "Rule",
    "ScanResult",
    "StoreItem",
    "WorkerPool",
    "check_items",
    "check_keys",
    "check_root",
    "check_stored",
    "checksum_of",
    "claim_root",
    "create_temp_file",
    "describe",
    "errno_in",
    "into_views",
    "legacy_object_name",
    "migrate_object_names",
    "normalize_prefix",
    "object_name",
    "put_items",
    "remove_stored_file",
    "scan_files",
    "stored_size",
    "stored_value",
]

_HOME = {
    **dict.fromkeys(("check_items", "check_keys", "into_views"), "checks"),
    **dict.fromkeys(("OS_ERROR_RULES", "ErrorMap", "Rule", "describe", "errno_in"), "errors"),
    **dict.fromkeys(("MARKER", "TEMP_MARK", "FileLayout", "ForeignRootError", "RootGoneError", "ScanResult", "check_root",
                     "claim_root", "create_temp_file", "legacy_object_name", "migrate_object_names",
                     "normalize_prefix", "object_name", "remove_stored_file", "scan_files"), "naming"),
    **dict.fromkeys(("CancelToken", "Cancelled", "Outcome", "WorkerPool"), "runner"),
    "AsyncClosing": "lifecycle",
    "FileLayoutOptions": "options",
    "KeyFaults": "faults",
    **dict.fromkeys(("Rejections", "check_stored", "stored_size", "stored_value"), "stored"),
    **dict.fromkeys(("Payload", "StoreItem", "checksum_of", "put_items"), "values"),
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'lmtier.kit' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmtier.kit.{home}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
