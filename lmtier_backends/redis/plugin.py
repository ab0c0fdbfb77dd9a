"""Registers the ``redis`` backend (cheap: no heavy imports)."""

from __future__ import annotations

from lmtier.registry import BackendSpec, hookimpl

__all__ = ["lmtier_backend_specs"]


@hookimpl
def lmtier_backend_specs() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="redis",
            factory="lmtier_backends.redis.backend:open_redis_backend",
            config="lmtier_backends.redis.config:RedisConfig",
            install_hint="pip install 'lmtier[redis]'",
            description="Redis or Redis Cluster, shared between processes; zero-copy pipelined transfers",
        )
    ]
