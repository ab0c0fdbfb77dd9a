"""Registers the ``nixl`` backend (cheap: no heavy imports, NIXL is loaded when a tier opens)."""

from __future__ import annotations

from lmtier.registry import BackendSpec, hookimpl

__all__ = ["INSTALL_HINT", "lmtier_backend_specs"]

INSTALL_HINT = "pip install 'lmtier[nixl]'"


@hookimpl
def lmtier_backend_specs() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="nixl",
            factory="lmtier_backends.nixl.backend:open_nixl_backend",
            config="lmtier_backends.nixl.config:NixlConfig",
            install_hint=INSTALL_HINT,
            description="NIXL transfers from registered host buffers to files (POSIX) or S3 objects (OBJ)",
        )
    ]
