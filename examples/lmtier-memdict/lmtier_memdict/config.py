"""Options of the ``memdict`` backend (the ``options:`` mapping of its tier in YAML)."""

from __future__ import annotations

from pydantic import BaseModel, ByteSize, ConfigDict, Field

__all__ = ["MemDictConfig"]


class MemDictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in YAML is an error naming the key
    max_bytes: ByteSize = Field(ByteSize(256 << 20), gt=0, description="LRU-evicts beyond this many bytes")
