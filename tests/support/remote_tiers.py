"""One remote tier's server for fault tests and benchmarks: start it, freeze it, kill it.

``RemoteTier`` wraps the real server a tier kind needs — ``redis`` (redis-server), ``s3``
(SeaweedFS) or ``nixl-obj`` (NIXL's OBJ plugin on SeaweedFS) — and gives the tier's entry for a
config. Freezing is ``SIGSTOP`` (the process keeps its sockets: connections are accepted by the
kernel and never answered, which is what a fork/save pause, a partition or an overloaded server
looks like); thawing is ``SIGCONT``; killing is ``SIGKILL``. Everything is stopped by PID::

    with RemoteTier("redis", tmp_path) as remote:
        config = {"tiers": [remote.tier(timeout_s={"get": 0.2})]}
        remote.freeze(); ...; remote.thaw()
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "LOOPBACK_ENV", "RemoteTier", "remote_available"]

KINDS = ("redis", "s3", "nixl-obj")
#: What NIXL needs in the environment before it is imported (see SERVICES.md).
LOOPBACK_ENV = {"UCX_NET_DEVICES": "lo", "UCX_MODULES": "^ib", "AWS_EC2_METADATA_DISABLED": "true"}
_BUCKET = "lmtier-remote"


def remote_available(kind: str) -> str | None:
    """None when ``kind``'s server and client can run here, else why not."""
    if kind == "redis":
        from tests.support.redis_server import redis_available

        return None if redis_available() else "redis-server is not installed"
    from tests.support.seaweedfs import find_weed

    if find_weed() is None:
        return "SeaweedFS (`weed`) is not installed"
    if kind == "nixl-obj":
        from lmtier_backends.nixl._nixl import find_nixl

        if find_nixl() is None:
            return "NIXL is not installed"
    return None


class RemoteTier:
    """The server behind one remote tier kind (see the module doc)."""

    def __init__(self, kind: str, workdir: str | os.PathLike[str]) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.workdir = Path(workdir)
        self._server: Any = None
        self.frozen = False
        self.run = os.urandom(4).hex()  # the key prefix of every tier made from this server

    def start(self) -> RemoteTier:
        if self.kind == "redis":
            from tests.support.redis_server import start_redis

            self._server = start_redis(self.workdir / "redis")
        else:
            from tests.support.seaweedfs import SeaweedFS, create_bucket, wait_writable

            os.environ.update(LOOPBACK_ENV)
            self._server = SeaweedFS(self.workdir / "seaweedfs")
            self._server.start()
            create_bucket(self._server.endpoint, _BUCKET)
            wait_writable(self._server.endpoint, _BUCKET)  # its first write allocates a volume (~1 s)
        return self

    @property
    def pid(self) -> int:
        pid = self._server.pid if self._server is not None else None
        if pid is None:
            raise RuntimeError("the server is not running")
        return int(pid)

    def options(self, **overrides: Any) -> dict[str, Any]:
        """The tier's backend options, pointing at this server (this object's key prefix)."""
        run = self.run
        if self.kind == "redis":
            opts: dict[str, Any] = {"url": self._server.url, "key_prefix": f"r{run}:"}
        else:
            ep = self._server.endpoint
            if self.kind == "s3":
                opts = {"bucket": _BUCKET, "prefix": f"r{run}", "endpoint_url": ep.endpoint_url,
                        "access_key_env": "REMOTE_TIER_TEST_ACCESS_KEY", "secret_key_env": "REMOTE_TIER_TEST_SECRET_KEY"}
                os.environ["REMOTE_TIER_TEST_ACCESS_KEY"] = ep.access_key
                os.environ["REMOTE_TIER_TEST_SECRET_KEY"] = ep.secret_key
            else:
                opts = {"plugin": "obj", "staging_slab_bytes": 8 << 20, "obj": {
                    "bucket": _BUCKET, "prefix": f"r{run}/", "endpoint_override": ep.endpoint_url,
                    "access_key": ep.access_key, "secret_key": ep.secret_key, "region": "us-east-1",
                    "scheme": "http", "use_virtual_addressing": False}}
        opts.update(overrides)
        return opts

    def tier(self, name: str = "remote", **entry: Any) -> dict[str, Any]:
        """A ``tiers`` entry for this server (``entry`` adds keys such as ``timeout_s``)."""
        backend = "nixl" if self.kind == "nixl-obj" else self.kind
        options = entry.pop("options", {})
        return {"name": name, "backend": backend, "options": self.options(**options), **entry}

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self._server is not None and self._server.pid is not None:
            os.kill(self._server.pid, signal.SIGCONT)
        self.frozen = False

    def kill(self) -> None:
        self.thaw()
        if self.kind == "redis":
            self._server.kill()
        else:
            self._server.stop()

    def revive(self) -> None:
        """Start the server again after :meth:`kill`, on the same ports and data (the same URL)."""
        if self.kind == "redis":
            self._server.start()
        else:
            from tests.support.seaweedfs import wait_writable

            self._server.restart()
            wait_writable(self._server.endpoint, _BUCKET)

    def stop(self) -> None:
        if self._server is None:
            return
        self.thaw()
        if self.kind == "redis":
            self._server.stop()
        else:
            self._server.close()
        self._server = None

    def __enter__(self) -> RemoteTier:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
