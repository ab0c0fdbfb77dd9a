"""Every hook a plugin may implement, documented (pytest ``hookspec.py`` style).

A plugin is a module named by an entry point in the ``lmtier`` group; it holds functions decorated
with :data:`lmtier.hookimpl` whose names match the specs below.

Backends
--------
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from lmtier.registry import BackendSpec

__all__ = ["PROJECT", "hookspec", "lmtier_backend_specs"]

PROJECT = "lmtier"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def lmtier_backend_specs() -> list[BackendSpec]:  # type: ignore[empty-body]
    """Return the storage backends this plugin provides.

    Keep the implementing module cheap: import nothing heavy (no client libraries, no torch);
    :class:`~lmtier.registry.BackendSpec` names its factory and config model as ``"module:attr"``
    strings that are imported only when a tier actually uses the backend. Backend names must be
    unique across all installed plugins; a duplicate is refused with a :class:`PluginError`.
    """
