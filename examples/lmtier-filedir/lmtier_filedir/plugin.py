"""Registers the ``filedir`` backend (cheap: nothing heavy imported here)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lmtier import BackendSpec, hookimpl

__all__ = ["FileDirConfig", "lmtier_backend_specs"]


class FileDirConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: Path = Field(description="directory of the tier")
    threads: int = Field(4, ge=1, le=64, description="file operations running at once")


@hookimpl
def lmtier_backend_specs() -> list[BackendSpec]:
    return [BackendSpec(name="filedir", factory="lmtier_filedir.backend:FileDirBackend",
                        config="lmtier_filedir.plugin:FileDirConfig", install_hint="pip install lmtier-filedir",
                        description="example tier on lmtier.kit: one checksummed file per chunk")]
