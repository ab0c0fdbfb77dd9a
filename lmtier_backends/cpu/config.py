"""Options of the ``cpu`` backend."""

from __future__ import annotations

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator

from lmtier.limits import check_fits_in_memory

__all__ = ["CpuConfig"]


class CpuConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_bytes: ByteSize = Field(ByteSize(1 << 30), gt=0, description="slab size; LRU-evicts beyond it")
    pinned: bool | None = Field(None, description="page-lock the slab; default: iff CUDA is available")

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        if isinstance(value, bool):  # pydantic would read YAML's true as 1 byte
            raise ValueError(f"must be a byte size such as 2GiB, not the boolean {value!r}")
        return value

    @field_validator("max_bytes")
    @classmethod
    def _fits_in_memory(cls, nbytes: ByteSize) -> ByteSize:
        # the slab is allocated whole at open: more than the machine has fails there, in torch's words
        check_fits_in_memory(nbytes)
        return nbytes
