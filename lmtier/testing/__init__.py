"""Test helpers for backend authors: ``from lmtier.testing import BackendConformance``.

Import-free: the suite (which imports pytest) loads only when the name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmtier.testing.conformance import BackendConformance

__all__ = ["BackendConformance"]


def __getattr__(name: str) -> Any:
    if name == "BackendConformance":
        from lmtier.testing.conformance import BackendConformance

        return BackendConformance
    raise AttributeError(f"module 'lmtier.testing' has no attribute {name!r}")
