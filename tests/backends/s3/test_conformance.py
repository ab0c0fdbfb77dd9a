"""The s3 tier against the backend conformance suite, on a real SeaweedFS server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lmtier.testing import BackendConformance
from lmtier_backends.s3.backend import open_s3_backend
from lmtier_backends.s3.config import S3Config

pytestmark = pytest.mark.s3


class TestS3Backend(BackendConformance):
    """Default options: conditional puts, multipart from 64 MiB (the 64 MiB item uses it)."""

    @pytest.fixture
    def backend_factory(self, s3_config: S3Config) -> Callable[[], Any]:
        return lambda: open_s3_backend(s3_config)
