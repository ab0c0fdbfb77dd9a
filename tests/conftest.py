"""Suite-wide fixtures: every test fails if it leaves host-pool buffers outstanding."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmtier.memory import live_pools
from lmtier.testing.conformance import leaked_host_pools


@pytest.fixture(autouse=True)
def no_leaked_host_buffers() -> Iterator[None]:
    """Fail the test if a host pool created during it (open or closed) still has buffers out.

    Pools that outlive the test on purpose (module-scoped fixtures) existed before it started and
    are not judged here; their owners close them.
    """
    before = set(live_pools())
    yield
    leaked = leaked_host_pools(before)
    assert not leaked, f"test leaked host buffers: {leaked}"
