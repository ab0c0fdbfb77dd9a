"""Fixtures for the redis tier's tests: real redis-server processes on 127.0.0.1.

Shared servers live for the whole session (a standalone one starts in ~0.05 s, the 3-primary
Cluster in ~2 s); tests stay apart through random namespaces and key prefixes. Tests that stop,
pause, fill or reconfigure a server start their own with :func:`own_redis`. Every server is
stopped by its PID.

Passwords reach the tier the way an operator passes them: through an environment variable named
in the options (``password_env``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis_server import (
    RedisCluster,
    RedisServer,
    make_tls_files,
    redis_available,
    start_cluster,
    start_redis,
)

PASSWORD_ENV = "LMTIER_REDIS_TEST_PASSWORD"
PASSWORD = "lmtier-test-pw-7f3a"


def _require_redis() -> None:
    if not redis_available():
        pytest.skip("redis-server / redis-cli not on PATH: apt-get install -y redis-server")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's shared standalone server (never stopped by a test)."""
    _require_redis()
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """The session's shared 3-primary Cluster."""
    _require_redis()
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def password_env() -> Iterator[str]:
    """Export the test password under PASSWORD_ENV (inherited by child processes too)."""
    saved = os.environ.get(PASSWORD_ENV)
    os.environ[PASSWORD_ENV] = PASSWORD
    try:
        yield PASSWORD_ENV
    finally:
        if saved is None:
            os.environ.pop(PASSWORD_ENV, None)
        else:
            os.environ[PASSWORD_ENV] = saved


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _require_redis()
    server = start_redis(tmp_path_factory.mktemp("redis-pw"), password=PASSWORD)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A TLS-only server with a self-signed certificate for 127.0.0.1 (``server.tls.cert``)."""
    _require_redis()
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make the test certificate")
    base = tmp_path_factory.mktemp("redis-tls")
    server = start_redis(base, tls=make_tls_files(base / "pki"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start private servers (``own_redis(maxmemory="2mb", ...)``); all stopped after the test."""
    _require_redis()
    started: list[RedisServer] = []

    def start(**kwargs: Any) -> RedisServer:
        server = start_redis(tmp_path / f"own{len(started)}", **kwargs)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def options_for(url: str, **overrides: Any) -> dict[str, Any]:
    """Tier options for ``url`` with a fresh key prefix, small pools and short deadlines."""
    options: dict[str, Any] = {
        "url": url,
        "key_prefix": f"t{os.urandom(4).hex()}:",
        "max_connections": 4,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 20.0,
        "recv_pool_bytes": 96 << 20,
    }
    options.update(overrides)
    return options
