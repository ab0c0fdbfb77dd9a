"""Helpers shared by the nixl tier's test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtier_backends.nixl._nixl import find_nixl

__all__ = ["NIXL_MISSING", "SKIP_REASON", "needs_nixl", "obj_options", "posix_options"]

NIXL_MISSING = find_nixl() is None
SKIP_REASON = "NIXL is not installed (pip install 'lmtier[nixl]')"
#: Every test module of the tier starts with ``pytestmark = [*needs_nixl, ...]``.
needs_nixl = [pytest.mark.nixl, pytest.mark.skipif(NIXL_MISSING, reason=SKIP_REASON)]


def obj_options(seaweed: object, bucket: str, **overrides: object) -> dict[str, object]:
    """The ``obj`` section for a tier on the test server."""
    endpoint = seaweed.endpoint  # type: ignore[attr-defined]
    return {
        "bucket": bucket, "endpoint_override": endpoint.endpoint_url, "access_key": endpoint.access_key,
        "secret_key": endpoint.secret_key, "region": "us-east-1", "scheme": "http",
        "use_virtual_addressing": False, **overrides,
    }


def posix_options(root: Path, **overrides: object) -> dict[str, object]:
    return {"root": str(root), **overrides}
