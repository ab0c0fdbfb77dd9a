"""Start and stop real ``redis-server`` processes on 127.0.0.1 for tests and benchmarks.

Every server binds loopback only, on a port chosen here (checked free, retried on a bind race),
persists nothing (``--save '' --appendonly no``), and is stopped by its PID. A 3-primary Cluster
is three such servers joined by ``redis-cli --cluster create``.

Readiness is polled with a deadline (a raw ``PING`` on the socket), never slept on.

    server = start_redis(tmp_path)                       # standalone
    server = start_redis(tmp_path, password="s3cret")    # requirepass
    server = start_redis(tmp_path, tls=make_tls_files(tmp_path))  # TLS only (rediss://)
    cluster = start_cluster(tmp_path)                    # 3 primaries, cluster_state:ok
    ...
    server.stop(); cluster.stop()
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RedisCluster",
    "RedisServer",
    "TlsFiles",
    "free_port",
    "make_tls_files",
    "redis_available",
    "start_cluster",
    "start_redis",
]

HOST = "127.0.0.1"
_CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's node bus listens on port + 10000


def redis_available() -> bool:
    """Whether the redis-server and redis-cli binaries are on PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A loopback port that is free now (and whose cluster bus port is free, if asked).

    Random in 20000-50000 so that ``port + 10000`` stays a valid port for the cluster bus and
    parallel test runs rarely collide; the caller still retries if the server loses a race.
    """
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(20000, 50000)
        if _bindable(port) and (not cluster_bus or _bindable(port + _CLUSTER_BUS_OFFSET)):
            return port
    raise RuntimeError("no free loopback port found in 20000-50000")


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""

    cert: Path
    key: Path


def make_tls_files(directory: str | os.PathLike[str]) -> TlsFiles:
    """Create a self-signed certificate for IP 127.0.0.1 with the ``openssl`` CLI."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(d / "cert.pem", d / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files.key),
         "-out", str(files.cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True, check=True, timeout=60,
    )
    return files


def _ping(port: int, password: str | None, tls: TlsFiles | None = None) -> str:
    """Send PING (after AUTH if needed) on a fresh socket; return the reply line or ''."""
    try:
        with _connect(port, tls) as s:
            request = b"PING\r\n"
            if password is not None:
                pw = password.encode()
                request = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw) + request
            s.sendall(request)
            data = b""
            while data.count(b"\r\n") < (2 if password is not None else 1):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.decode(errors="replace").strip().splitlines()[-1] if data else ""
    except OSError:
        return ""


def _connect(port: int, tls: TlsFiles | None) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=0.5)
    if tls is None:
        return sock
    context = ssl.create_default_context(cafile=str(tls.cert))
    return context.wrap_socket(sock, server_hostname=HOST)


@dataclass
class RedisServer:
    """One redis-server process; :meth:`stop` ends it by PID, :meth:`kill` simulates a crash."""

    port: int
    dir: Path
    args: list[str] = field(repr=False)  # may hold --requirepass
    password: str | None = field(default=None, repr=False)
    tls: TlsFiles | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def url(self) -> str:
        """``redis://`` (``rediss://`` with TLS) URL without credentials."""
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, timeout_s: float = 10.0) -> RedisServer:
        """Start (or restart, on the same port and directory) and wait until it answers PING."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        log = (self.dir / "redis.log").open("ab")
        try:
            self.proc = subprocess.Popen(
                ["redis-server", *self.args], stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                start_new_session=True,  # a Ctrl-C on the test run does not reach it mid-teardown
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} exited ({self.proc.returncode}):\n{tail}")
            reply = _ping(self.port, self.password, self.tls)
            if reply in ("+PONG", "-LOADING Redis is loading the dataset in memory"):
                return self
            time.sleep(0.01)  # polling interval of the readiness check, not a synchronisation
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL the server (a crash); :meth:`start` brings it back on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM by PID, wait, SIGKILL if it lingers. Idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _server_args(port: int, directory: Path, password: str | None, maxmemory: str | None,
                 policy: str | None, tls: TlsFiles | None, extra: Sequence[str]) -> list[str]:
    args = ["--bind", HOST, "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--daemonize", "no", "--protected-mode", "yes"]
    if tls is None:
        args += ["--port", str(port)]
    else:  # TLS only: the plain port is closed
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
                 "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.cert),
                 "--tls-auth-clients", "no"]
    if password is not None:
        args += ["--requirepass", password]
    if maxmemory is not None:
        args += ["--maxmemory", maxmemory]
    if policy is not None:
        args += ["--maxmemory-policy", policy]
    return args + list(extra)


def start_redis(
    base_dir: str | os.PathLike[str],
    *,
    password: str | None = None,
    maxmemory: str | None = None,
    maxmemory_policy: str | None = None,
    tls: TlsFiles | None = None,
    extra_args: Sequence[str] = (),
    cluster_bus: bool = False,
    attempts: int = 5,
) -> RedisServer:
    """Start a standalone redis-server on a free loopback port under ``base_dir/<port>``."""
    last: Exception | None = None
    for _ in range(attempts):  # another process may grab the port between our check and its bind
        port = free_port(cluster_bus=cluster_bus)
        directory = Path(base_dir) / str(port)
        server = RedisServer(port, directory,
                             _server_args(port, directory, password, maxmemory, maxmemory_policy, tls, extra_args),
                             password=password, tls=tls)
        try:
            return server.start()
        except RuntimeError as exc:
            last = exc
    raise RuntimeError(f"could not start redis-server after {attempts} attempts: {last}")


@dataclass
class RedisCluster:
    """A Redis Cluster of primaries (no replicas) on loopback; :meth:`stop` ends every node."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        """A seed node URL; RedisCluster discovers the others."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Poll every node until all report ``cluster_state:ok`` (after creation or a node restart)."""
        deadline = time.monotonic() + timeout_s
        while not all("cluster_state:ok" in _cluster_info(n.port) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not reach cluster_state:ok within {timeout_s}s")
            time.sleep(0.05)  # polling interval of the readiness check

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cluster_info(port: int) -> str:
    out = subprocess.run(["redis-cli", "-h", HOST, "-p", str(port), "cluster", "info"],
                         capture_output=True, text=True, timeout=10, check=False)
    return out.stdout


def start_cluster(base_dir: str | os.PathLike[str], *, primaries: int = 3,
                  extra_args: Sequence[str] = (), timeout_s: float = 30.0) -> RedisCluster:
    """Start ``primaries`` cluster-enabled servers, create the cluster, wait for ``cluster_state:ok``."""
    nodes: list[RedisServer] = []
    try:
        for _ in range(primaries):
            node_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "2000", *extra_args]
            nodes.append(start_redis(base_dir, extra_args=node_args, cluster_bus=True))
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"{HOST}:{n.port}" for n in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        cluster = RedisCluster(nodes)
        cluster.wait_ok(timeout_s)
        return cluster
    except BaseException:
        for n in nodes:
            n.stop()
        raise
