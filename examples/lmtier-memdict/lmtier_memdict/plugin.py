"""Registers the ``memdict`` backend. Cheap on purpose: lmtier imports every plugin at discovery."""

from __future__ import annotations

from lmtier import BackendSpec, hookimpl

__all__ = ["lmtier_backend_specs"]


@hookimpl
def lmtier_backend_specs() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="memdict",
            factory="lmtier_memdict.backend:MemDictBackend",  # imported only when a tier uses it
            config="lmtier_memdict.config:MemDictConfig",
            install_hint="pip install lmtier-memdict",
            description="example third-party tier: an in-process dict of immutable bytes, LRU",
        )
    ]
