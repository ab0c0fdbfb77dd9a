"""Options of the ``nixl`` backend (pydantic only; nothing here imports NIXL).

One tier uses one NIXL storage plugin, chosen by ``plugin``; its settings live in the section of
the same name::

    - name: nvme
      backend: nixl
      options: {plugin: posix, posix: {root: /var/cache/lmtier-nixl, max_bytes: 200GiB}}
    - name: objects
      backend: nixl
      options:
        plugin: obj
        obj: {bucket: kv-cache, endpoint_override: "http://127.0.0.1:8333",
              access_key: K, secret_key: S}
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, field_validator, model_validator

from lmtier.kit.options import FileLayoutOptions

__all__ = ["NixlConfig", "ObjOptions", "PosixOptions"]

MiB = 1 << 20
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class PosixOptions(FileLayoutOptions):
    """Chunks as files under ``root``, written and read by NIXL's POSIX plugin (FILE_SEG).

    Attributes:
        root: directory of the tier (created if missing; ``~`` expanded). Files are laid out as
            the ``disk`` tier's (:class:`lmtier.kit.FileLayout`), so either tier reads a root the
            other wrote; the index is rebuilt from them at open.
        fan_out: directory levels below ``root/<namespace>/``, as the ``disk`` tier's
            (:class:`~lmtier.kit.FileLayoutOptions`). Files found at another depth (a changed
            option, or this plugin's one-level layout before version 2 of the header) are moved
            into place when the tier opens.
        max_bytes: bytes of files kept; the oldest files are deleted beyond it (``None``: no bound,
            the tier then never evicts).
        fsync: fsync each file before the rename that publishes it (durable, slower).
        params: extra POSIX plugin parameters passed to NIXL as is (``use_aio: "true"``,
            ``kernel_queue_size``, ...). Without a queue choice (``use_uring``, ``use_aio``,
            ``use_posix_aio``) the tier asks for io_uring and falls back to NIXL's default (Linux
            AIO) where io_uring cannot start: with AIO, buffered I/O runs inside the submit call,
            one request at a time; io_uring measured 1.35x faster puts and 1.1-1.3x faster cold
            reads here, warm reads alike.
    """

    model_config = ConfigDict(extra="forbid")
    root: Path = Field(description="directory of the tier (~ expanded)")
    max_bytes: ByteSize | None = Field(None, gt=0, description="delete the oldest files beyond this")
    fsync: bool = Field(False, description="fsync each file before publishing it")
    params: dict[str, str] = Field(default_factory=dict, description="extra NIXL POSIX plugin params")

    @field_validator("root")
    @classmethod
    def _expand_user(cls, root: Path) -> Path:
        if not str(root).strip():
            raise ValueError("root must name a directory")
        return root.expanduser()


class ObjOptions(BaseModel):
    """Chunks as objects in an S3 bucket, moved by NIXL's OBJ plugin (OBJ_SEG).

    The bucket must exist; the tier checks the endpoint, the credentials and the bucket when it
    opens and fails with a :class:`~lmtier.errors.ConfigError` saying which is wrong.

    Attributes:
        bucket: an existing bucket.
        endpoint_override: S3 endpoint URL (``http://host:port``) for S3-compatible stores; omit
            for AWS.
        access_key / secret_key: credentials (the secret is held as ``SecretStr``, never logged).
        access_key_env / secret_key_env: instead, names of environment variables holding them,
            read at open (keeps secrets out of YAML). Omit all four to use the AWS SDK's default
            chain (``AWS_ACCESS_KEY_ID``, profiles, instance roles, ...).
        region: signing region.
        scheme: ``http`` or ``https``; default: the endpoint URL's scheme, else ``https``.
        use_virtual_addressing: bucket in the host name (AWS) instead of the path (most others).
        prefix: objects are named ``<prefix>/<key>`` (:func:`lmtier.kit.object_name`, the ``s3``
            tier's names: either tier reads the other's objects). Objects named
            ``<prefix><namespace>/<key>`` (this plugin before version 2 of the header) are not
            read: rename them once with :func:`lmtier.kit.migrate_object_names`.
        max_attempts: attempts per S3 request inside NIXL's AWS SDK client. The SDK's default is
            11 attempts with backoff, which turns an unreachable server into a 25 s stall per
            request; a cache tier should fail fast and let the circuit breaker act.
        num_threads: S3 requests NIXL's OBJ plugin runs at once (its AWS SDK executor threads;
            NIXL's own default is half the cores, a single thread on a 2-core host).
        expected_item_bytes: first read size for an object whose size this handle has not seen
            (one GET when it is large enough, otherwise a second GET of the exact size).
        params: extra OBJ plugin parameters passed to NIXL as is (``crtMinLimit``, ``ca_bundle``...).
    """

    model_config = ConfigDict(extra="forbid")
    bucket: str = Field(description="an existing S3 bucket")
    endpoint_override: str | None = Field(None, description="S3 endpoint URL, e.g. http://127.0.0.1:8333")
    access_key: str | None = Field(None, description="access key id")
    secret_key: SecretStr | None = Field(None, description="secret access key")
    access_key_env: str | None = Field(None, description="env variable holding the access key id")
    secret_key_env: str | None = Field(None, description="env variable holding the secret access key")
    region: str = Field("us-east-1", description="signing region")
    scheme: Literal["http", "https"] | None = Field(None, description="default: the endpoint's scheme")
    use_virtual_addressing: bool = Field(False, description="virtual-hosted-style bucket addressing")
    prefix: str = Field("lmtier/", pattern=r"^[A-Za-z0-9/_.-]{0,200}$", description="object key prefix")
    max_attempts: int = Field(2, ge=1, le=10, description="attempts per S3 request inside NIXL")
    num_threads: int = Field(8, ge=1, le=256, description="S3 requests NIXL runs at once")
    expected_item_bytes: ByteSize = Field(ByteSize(1 * MiB), gt=0, description="first read size guess")
    params: dict[str, str] = Field(default_factory=dict, description="extra NIXL OBJ plugin params")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, bucket: str) -> str:
        if not _BUCKET.match(bucket):
            raise ValueError("not a valid S3 bucket name (3-63 of a-z 0-9 . -, starting and ending alnum)")
        return bucket

    @field_validator("endpoint_override")
    @classmethod
    def _endpoint_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url if "://" in url else f"//{url}")
        if parts.scheme not in ("", "http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8333")
        return url.rstrip("/")

    def credentials(self) -> tuple[str, str] | None:
        """``(access_key, secret_key)`` from the options or the named variables; None = SDK chain.

        Raises ValueError naming a variable that is not set.
        """
        if self.access_key is not None and self.secret_key is not None:
            return self.access_key, self.secret_key.get_secret_value()
        if self.access_key_env is None or self.secret_key_env is None:
            return None
        values = []
        for var in (self.access_key_env, self.secret_key_env):
            value = os.environ.get(var)
            if not value:
                raise ValueError(f"environment variable {var} (named by obj.*_env) is not set")
            values.append(value)
        return values[0], values[1]

    @model_validator(mode="after")
    def _consistent(self) -> ObjOptions:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither (AWS default chain)")
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise ValueError("give both access_key_env and secret_key_env, or neither")
        if self.access_key is not None and self.access_key_env is not None:
            raise ValueError("give the keys either inline (access_key/secret_key) or by env (*_env), not both")
        url_scheme = urlsplit(self.endpoint_override).scheme if self.endpoint_override else ""
        if self.scheme is None:
            self.scheme = url_scheme or "https"  # type: ignore[assignment]
        elif url_scheme and url_scheme != self.scheme:
            raise ValueError(f"scheme {self.scheme!r} contradicts endpoint_override {self.endpoint_override!r}")
        return self


class NixlConfig(BaseModel):
    """Options of the ``nixl`` tier.

    Attributes:
        plugin: NIXL storage plugin: ``posix`` (files) or ``obj`` (S3 objects).
        posix / obj: that plugin's section (exactly the one named by ``plugin``).
        staging_slab_bytes: NIXL-registered host memory is allocated and registered in slabs of
            this size (registration is expensive: once per slab, never per call); an item larger
            than a slab gets a slab rounded up to a multiple of it.
        max_staging_bytes: bound of all slabs together. Values returned by ``get`` are zero-copy
            views of staging memory and hold it until they are garbage collected.
        pinned: page-lock the slabs; default: iff CUDA is available.
        io_threads: worker threads (the event loop never blocks); a get, get_into or put batch is
            split into up to this many pieces run at once, so checksums use several cores.
        batch_descriptors: items per round of NIXL requests; bigger batches are split (bounds the
            files held open, descriptors registered and requests in flight).
        xfer_timeout_s: a transfer still running after this long is cancelled and its staging
            memory quarantined (never reused); the call fails with BackendTimeoutError.
    """

    model_config = ConfigDict(extra="forbid")
    plugin: Literal["posix", "obj"] = Field(description="NIXL storage plugin: posix | obj")
    posix: PosixOptions | None = Field(None, description="settings of the posix plugin")
    obj: ObjOptions | None = Field(None, description="settings of the obj plugin")
    staging_slab_bytes: ByteSize = Field(ByteSize(64 * MiB), ge=1 * MiB, description="registered slab size")
    max_staging_bytes: ByteSize = Field(ByteSize(1024 * MiB), ge=1 * MiB, description="bound of all slabs")
    pinned: bool | None = Field(None, description="page-lock staging slabs; default iff CUDA")
    io_threads: int = Field(4, ge=1, le=64, description="worker threads; a batch is split into this many pieces")
    batch_descriptors: int = Field(64, ge=1, le=4096, description="items per round of NIXL requests")
    xfer_timeout_s: float = Field(30.0, gt=0, description="cancel a transfer running longer than this")

    @model_validator(mode="after")
    def _section_of_the_plugin(self) -> NixlConfig:
        other = "obj" if self.plugin == "posix" else "posix"
        if getattr(self, self.plugin) is None:
            raise ValueError(f"plugin {self.plugin!r} needs its section: add `{self.plugin}: {{...}}`")
        if getattr(self, other) is not None:
            raise ValueError(f"section {other!r} is set but plugin is {self.plugin!r}; remove one")
        if self.max_staging_bytes < self.staging_slab_bytes:
            raise ValueError("max_staging_bytes must be at least staging_slab_bytes")
        return self
