"""Registers the ``cpu`` backend (cheap: no heavy imports)."""

from __future__ import annotations

from lmtier.registry import BackendSpec, hookimpl

__all__ = ["lmtier_backend_specs"]


@hookimpl
def lmtier_backend_specs() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="cpu",
            factory="lmtier_backends.cpu.backend:CpuBackend",
            config="lmtier_backends.cpu.config:CpuConfig",
            install_hint="pip install lmtier",
            description="in-process host RAM (pinned when CUDA exists), byte-bounded LRU, zero-copy reads",
        )
    ]
