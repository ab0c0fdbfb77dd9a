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
    from lmtier.codecs.base import CodecSpec
    from lmtier.registry import BackendSpec

__all__ = ["PROJECT", "hookspec", "lmtier_backend_specs", "lmtier_value_codecs"]

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


# Value codecs
# ------------


@hookspec
def lmtier_value_codecs() -> list[CodecSpec]:  # type: ignore[empty-body]
    """Return the value codecs this plugin provides (``codec:`` of a tier in YAML).

    Like :func:`lmtier_backend_specs`: keep the module cheap; a
    :class:`~lmtier.codecs.CodecSpec` names its factory and options model as ``"module:attr"``
    strings imported only when a tier uses the codec. Names and codec ids must be unique across
    all installed plugins (a duplicate is refused with a :class:`PluginError`); ``none`` is not a
    codec name. Third-party ids lie in ``0x8000..0xFFFF`` (:data:`lmtier.codecs.PLUGIN_CODEC_IDS`):
    values a reader without the plugin finds are misses left in place. See
    :class:`~lmtier.codecs.ValueCodec` for the contract (lossless or lossy, thread safety).
    """
