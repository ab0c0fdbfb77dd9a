"""Options of the ``cpu`` backend."""

from __future__ import annotations

from pydantic import BaseModel, ByteSize, ConfigDict, Field

__all__ = ["CpuConfig"]


class CpuConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_bytes: ByteSize = Field(ByteSize(1 << 30), gt=0, description="slab size; LRU-evicts beyond it")
    pinned: bool | None = Field(None, description="page-lock the slab; default: iff CUDA is available")
