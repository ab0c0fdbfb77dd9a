"""The redis tier against the backend conformance suite: standalone (plain, password from an
environment variable, TLS) and a 3-primary Cluster. Gets without the receive slab are covered in
test_backend.py (slab full, small values, the redis-py parser fallback)."""

from __future__ import annotations

import pytest

from lmtier.testing import BackendConformance
from lmtier_backends.redis.backend import open_redis_backend
from lmtier_backends.redis.config import RedisConfig
from tests.backends.redis.conftest import options_for

pytestmark = pytest.mark.redis


class TestRedisStandalone(BackendConformance):
    @pytest.fixture
    def backend_factory(self, redis_server):
        config = RedisConfig(**options_for(redis_server.url))
        return lambda: open_redis_backend(config)


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
    def backend_factory(self, redis_cluster):
        config = RedisConfig(**options_for(redis_cluster.url, cluster=True))
        return lambda: open_redis_backend(config)
