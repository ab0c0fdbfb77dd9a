"""The redis tier against the backend conformance suite: standalone (plain, password from an
environment variable, TLS) and a 3-primary Cluster, with the suite's back doors (raw values read
and written with redis-py; the standalone server, and every node of the Cluster, killed and
restarted). Gets without the receive
slab are covered in test_backend.py (slab full, small values, the redis-py parser fallback)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from lmtier.keys import ChunkKey
from lmtier.testing import BackendConformance
from lmtier_backends.redis.backend import open_redis_backend
from lmtier_backends.redis.config import RedisConfig
from tests.backends.redis.conftest import options_for
from tests.support.redis_server import RedisCluster as ClusterNodes
from tests.support.redis_server import RedisServer, redis_available, start_cluster, start_redis

pytestmark = pytest.mark.redis

READ_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


class RawRedis:
    """The suite's raw_store: values as the tier stores them, read and written with redis-py."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def read(self, key: ChunkKey) -> bytes | None:
        value: bytes | None = self.client.get(f"{self.prefix}{key}")
        return value

    def write(self, key: ChunkKey, data: bytes) -> None:
        self.client.set(f"{self.prefix}{key}", data)


@dataclass
class KilledAndRestarted:
    """The suite's service: the tier's own redis-server, SIGKILLed and started again on its port."""

    server: RedisServer
    deadline_s: float = CONNECT_TIMEOUT_S + READ_TIMEOUT_S + 10

    def stop(self) -> None:
        self.server.kill()

    def start(self) -> None:
        self.server.start()


@dataclass
class KilledAndRestartedCluster:
    """The suite's service for a Cluster: every node SIGKILLed (the whole Cluster down), then all
    started again on their ports and directories (each reloads its nodes.conf: the same slots)."""

    cluster: ClusterNodes
    deadline_s: float = CONNECT_TIMEOUT_S + READ_TIMEOUT_S + 10

    def stop(self) -> None:
        for node in self.cluster.nodes:
            node.kill()

    def start(self) -> None:
        for node in self.cluster.nodes:
            node.start()
        self.cluster.wait_ok()


@pytest.fixture(scope="module")
def restartable_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterNodes]:
    """A 3-primary Cluster of this module's own, which the outage scenario kills and restarts."""
    if not redis_available():
        pytest.skip("redis-server / redis-cli not on PATH: apt-get install -y redis-server")
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster-restartable"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def restartable_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A standalone server of this module's own, which the outage scenario kills and restarts."""
    if not redis_available():
        pytest.skip("redis-server / redis-cli not on PATH: apt-get install -y redis-server")
    server = start_redis(tmp_path_factory.mktemp("redis-restartable"))
    try:
        yield server
    finally:
        server.stop()


class TestRedisStandalone(BackendConformance):
    @pytest.fixture
    def options(self, restartable_redis: RedisServer) -> dict[str, Any]:
        return options_for(restartable_redis.url, read_timeout_s=READ_TIMEOUT_S, connect_timeout_s=CONNECT_TIMEOUT_S)

    @pytest.fixture
    def backend_factory(self, options):
        config = RedisConfig(**options)
        return lambda: open_redis_backend(config)

    @pytest.fixture
    def raw_store(self, restartable_redis: RedisServer, options) -> Iterator[RawRedis]:
        client = redis.Redis.from_url(restartable_redis.url)
        try:
            yield RawRedis(client, options["key_prefix"])
        finally:
            client.close()

    @pytest.fixture
    def service(self, restartable_redis: RedisServer) -> Iterator[KilledAndRestarted]:
        service = KilledAndRestarted(restartable_redis)
        try:
            yield service
        finally:
            restartable_redis.start()  # whatever the test did, the next one finds it running


class TestRedisPasswordFromEnv(BackendConformance):
    """A password-protected server, the password read from the variable named by password_env."""

    big_item_bytes = 8 << 20

    @pytest.fixture
    def backend_factory(self, redis_with_password, password_env):
        config = RedisConfig(**options_for(redis_with_password.url, password_env=password_env))
        return lambda: open_redis_backend(config)


class TestRedisTls(BackendConformance):
    """rediss:// with the server's certificate verified against its own CA file."""

    big_item_bytes = 8 << 20

    @pytest.fixture
    def backend_factory(self, redis_tls):
        config = RedisConfig(**options_for(redis_tls.url, tls_ca_file=str(redis_tls.tls.cert)))
        return lambda: open_redis_backend(config)


class TestRedisCluster(BackendConformance):
    @pytest.fixture
    def options(self, restartable_cluster: ClusterNodes) -> dict[str, Any]:
        return options_for(restartable_cluster.url, cluster=True, read_timeout_s=READ_TIMEOUT_S,
                           connect_timeout_s=CONNECT_TIMEOUT_S)

    @pytest.fixture
    def backend_factory(self, options):
        config = RedisConfig(**options)
        return lambda: open_redis_backend(config)

    @pytest.fixture
    def raw_store(self, restartable_cluster: ClusterNodes, options) -> Iterator[RawRedis]:
        seed = restartable_cluster.nodes[0]
        client = RedisCluster(host="127.0.0.1", port=seed.port)
        try:
            yield RawRedis(client, options["key_prefix"])
        finally:
            client.close()

    @pytest.fixture
    def service(self, restartable_cluster: ClusterNodes) -> Iterator[KilledAndRestartedCluster]:
        service = KilledAndRestartedCluster(restartable_cluster)
        try:
            yield service
        finally:
            if not all(node.running for node in restartable_cluster.nodes):
                service.start()  # whatever the test did, the next one finds the Cluster serving
