"""Options of the ``s3`` backend (pydantic only: no boto3 import here).

Credentials are never part of the configuration. Either leave ``access_key_env`` /
``secret_key_env`` unset and boto3's standard chain applies (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` or ``profile``, shared credentials files, instance
roles, ...), or name the environment variables that hold the keys; they are read when the tier
opens and held as :class:`pydantic.SecretStr`, so they never show up in reprs or logs.

Example::

    - name: shared
      backend: s3
      write: async
      options:
        bucket: kv-cache
        prefix: prod/llama-70b
        endpoint_url: http://seaweedfs.internal:8333
        access_key_env: KV_S3_ACCESS_KEY
        secret_key_env: KV_S3_SECRET_KEY
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

__all__ = ["S3Config"]

MiB = 1 << 20


class S3Config(BaseModel):
    """Options of one ``s3`` tier."""

    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="bucket name (3-63 lowercase letters, digits, '.', '-')",
    )
    prefix: str = Field(
        "lmtier",
        pattern=r"^[A-Za-z0-9_.=/-]*$",
        description="objects are stored as <prefix>/<chunk key>; '' stores them at the bucket root",
    )
    endpoint_url: str | None = Field(
        None, pattern=r"^https?://", description="S3-compatible endpoint; default: AWS for `region`"
    )
    region: str | None = Field(None, description="region name; default: boto3's (AWS_REGION, profile)")
    profile: str | None = Field(None, description="boto3 named profile for the credential chain")
    access_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the access key id"
    )
    secret_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the secret key"
    )
    session_token_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding a session token"
    )
    create_bucket: bool = Field(False, description="create the bucket at open if it does not exist")
    max_concurrency: int = Field(8, ge=1, le=256, description="S3 requests in flight per tier (threads)")
    multipart_threshold: ByteSize = Field(
        ByteSize(64 * MiB), ge=5 * MiB, description="objects (64-byte header included) this big use multipart"
    )
    multipart_part_size: ByteSize = Field(
        ByteSize(16 * MiB), ge=5 * MiB, le=5 * 1024 * MiB, description="size of each multipart part"
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="TCP connect timeout per attempt")
    read_timeout_s: float = Field(10.0, gt=0, description="socket read timeout per attempt")
    max_attempts: int = Field(2, ge=1, le=20, description="attempts per request, first one included")
    retry_mode: Literal["standard", "adaptive", "legacy"] = Field("standard", description="botocore retry mode")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "path", description="path works with every S3-compatible server; AWS also takes virtual"
    )
    sign_payload: bool | None = Field(
        None,
        description="SHA-256 sign request bodies; default: boto3's (signed over http, not over https). "
        "Values carry their own checksum, so false is safe against corruption (not against tampering)",
    )
    skip_identical_puts: bool = Field(
        True,
        description="do not re-upload a chunk whose stored header (length + checksum) is identical; "
        "uses a conditional PUT (If-None-Match: *)",
    )
    verify_checksum: bool = Field(True, description="check the payload checksum on every read")
    recv_pool_bytes: ByteSize = Field(
        ByteSize(256 * MiB), ge=0,
        description="a reused host slab that get() receives payloads of 256 KiB or more into (0: off). "
        "Fresh memory costs a page fault per 4 KiB: measured 1.5-2x slower gets of 16-38 MB objects. "
        "Results are read-only views holding their range until dropped; when the slab is full "
        "(callers hold many views), payloads go to fresh buffers",
    )

    @field_validator("prefix")
    @classmethod
    def _strip_slashes(cls, prefix: str) -> str:
        return prefix.strip("/")

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> S3Config:
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ValueError(
                "set both access_key_env and secret_key_env, or neither (then boto3's credential "
                "chain applies: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, instance roles)"
            )
        if self.profile is not None and self.access_key_env is not None:
            raise ValueError("profile and access_key_env/secret_key_env are alternatives; set one of them")
        if self.session_token_env is not None and self.access_key_env is None:
            raise ValueError("session_token_env needs access_key_env and secret_key_env")
        return self
