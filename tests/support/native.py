"""The GPU tests' gate on the native transfer library."""

from __future__ import annotations

import os

import pytest

from lmtier.transfer import _native

__all__ = ["skip_unless_native"]


def skip_unless_native() -> None:
    """Skip the calling test when the native library is unavailable, or fail it when the run
    demands the library (``LMTIER_REQUIRE_NATIVE=1``: the GPU batch, where a skip would hide a
    broken build)."""
    reason = _native.unavailable_reason()
    if reason is not None:
        if os.environ.get("LMTIER_REQUIRE_NATIVE") == "1":
            pytest.fail(f"native library required but unavailable: {reason}")
        pytest.skip(reason)
