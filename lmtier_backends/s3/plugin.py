"""Registers the ``s3`` backend (cheap: no boto3 import until a tier is built)."""

from __future__ import annotations

from lmtier.registry import BackendSpec, hookimpl

__all__ = ["lmtier_backend_specs"]


@hookimpl
def lmtier_backend_specs() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="s3",
            factory="lmtier_backends.s3.backend:open_s3_backend",
            config="lmtier_backends.s3.config:S3Config",
            install_hint="pip install 'lmtier[s3]'",
            description="objects in an S3 bucket (AWS, SeaweedFS, MinIO); shared, persistent",
        )
    ]
