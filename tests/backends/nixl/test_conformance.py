"""The nixl tier, with each storage plugin, against the backend conformance suite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lmtier.testing import BackendConformance
from lmtier_backends.nixl.backend import open_nixl_backend
from lmtier_backends.nixl.config import NixlConfig
from tests.backends.nixl._helpers import needs_nixl, obj_options, posix_options

pytestmark = needs_nixl


class TestNixlPosix(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> Callable[[], Any]:
        config = NixlConfig(plugin="posix", posix=posix_options(tmp_path / "tier"),
                            staging_slab_bytes=16 << 20, max_staging_bytes=512 << 20)
        return lambda: open_nixl_backend(config)


@pytest.mark.s3
class TestNixlObj(BackendConformance):
    @pytest.fixture
    def backend_factory(self, seaweed: object, bucket: str) -> Callable[[], Any]:
        config = NixlConfig(plugin="obj", obj=obj_options(seaweed, bucket),
                            staging_slab_bytes=16 << 20, max_staging_bytes=512 << 20)
        return lambda: open_nixl_backend(config)
