"""The disk tier against the conformance suite, plus restarts, corruption, eviction and faults."""

from __future__ import annotations

import pytest

from lmtier.testing import BackendConformance
from lmtier_backends.disk.backend import open_disk_backend
from lmtier_backends.disk.config import DiskConfig

MiB = 1 << 20


class TestDiskBackend(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path):
        config = DiskConfig(root=tmp_path / "tier", max_bytes=256 * MiB, max_concurrency=4)
        return lambda: open_disk_backend(config)
