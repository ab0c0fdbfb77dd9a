"""Registers the ``disk`` backend (cheap: no heavy imports)."""

from __future__ import annotations

from lmtier.registry import BackendSpec, hookimpl

__all__ = ["lmtier_backend_specs"]


@hookimpl
def lmtier_backend_specs() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="disk",
            factory="lmtier_backends.disk.backend:open_disk_backend",
            config="lmtier_backends.disk.config:DiskConfig",
            install_hint="pip install lmtier",
            description="one checksummed file per chunk on a local filesystem, byte-bounded LRU, persistent",
        )
    ]
