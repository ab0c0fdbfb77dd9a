"""Start and stop real ``lmtier serve`` processes for tests and benchmarks; a raw protocol client.

Every server binds its HTTP side to 127.0.0.1 on a port it picks (``--http 127.0.0.1:0``) and
its socket in the test's directory, and is stopped by its PID. Readiness is the server's own
ready log line, polled with a deadline (never slept on).

    server = start_server(tmp_path)                   # cpu (64 MiB slab) -> disk under tmp_path
    store = server.store()                            # a ServerStore connected to it
    server.status()["leases"]; server.stop()          # SIGTERM: drains, exit status returned
"""

from __future__ import annotations

import array
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmtier.server import protocol as p

__all__ = ["RawClient", "ServerProc", "serve_command", "start_server", "tiers_yaml", "wait_until"]

_READY = re.compile(r"lmtier serve ready: pid=(\d+) socket=(\S+) \(mode \d+\) http=(\S+)")


def serve_command(*args: str) -> list[str]:
    """The command line of ``lmtier serve ARGS`` with this interpreter."""
    return [sys.executable, "-m", "lmtier", "serve", *args]


def tiers_yaml(root: Path, *, slab: str = "64MiB", disk: bool = True, disk_write: str = "through") -> Path:
    """A server config: a cpu tier of ``slab`` bytes, then a disk tier under ``root/disk``."""
    tiers: list[dict[str, Any]] = [{"name": "hot", "backend": "cpu", "options": {"max_bytes": slab, "pinned": False}}]
    if disk:
        tiers.append({"name": "local", "backend": "disk", "write": disk_write,
                      "options": {"root": str(root / "disk"), "max_bytes": "256MiB"}})
    path = root / "tiers.yaml"
    path.write_text(yaml.safe_dump({"chunk_tokens": 256, "tiers": tiers}))
    return path


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path
    http: str = ""
    pid: int = 0
    stores: list[Any] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> ServerProc:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"lmtier serve exited with {self.proc.returncode}:\n{self.log()}")
            m = _READY.search(self.log())
            if m:
                self.pid, self.http = int(m.group(1)), m.group(3)
            return bool(m)

        wait_until(ready, timeout, "the lmtier serve ready line")
        return self

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def status(self) -> dict[str, Any]:
        code, body = self.get("/v1/status")
        assert code == 200, body
        return json.loads(body)

    def clear(self, *tiers: str, namespaces: tuple[str, ...] = ()) -> dict[str, Any]:
        """``POST /v1/clear`` (of ``tiers``, else every tier; of ``namespaces``, else every chunk)."""
        query = urllib.parse.urlencode([("tier", t) for t in tiers] + [("namespace", n) for n in namespaces])
        req = urllib.request.Request(self.http + "/v1/clear" + (f"?{query}" if query else ""), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def store(self, **kwargs: Any) -> Any:
        from lmtier.server.client import ServerStore

        # generous deadlines (this 2-core machine is shared): tests about deadlines pass their own
        for kind in ("lookup", "fetch", "reserve", "commit"):
            kwargs.setdefault(f"{kind}_timeout_s", 30.0)
        store = ServerStore(self.address, register_cuda=False, **kwargs)
        self.stores.append(store)
        return store

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(30)

    def close(self) -> None:
        for store in self.stores:
            store.close()
        self.stores.clear()
        self.kill()


def start_server(tmp_path: Path, *, config: Path | None = None, socket_path: Path | None = None,
                 extra: tuple[str, ...] = (), wait: bool = True, name: str = "server",
                 prelude: str = "") -> ServerProc:
    """Start ``lmtier serve`` (config: :func:`tiers_yaml` under ``tmp_path`` unless given).

    ``prelude``: Python run in the server process before its command line (fault injection, e.g.
    a server of an older protocol revision)."""
    config = config or tiers_yaml(tmp_path)
    socket_path = socket_path or tmp_path / "lmtier.sock"
    log_path = tmp_path / f"{name}-{time.monotonic_ns()}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                          os.environ.get("PYTHONPATH", "")])}
    with log_path.open("wb") as log:
        command = serve_command("--config", str(config), "--socket", str(socket_path), "--http", "127.0.0.1:0", *extra)
        if prelude:
            command[1:3] = ["-c", f"{prelude}\nimport sys\nfrom lmtier.cli import main\nraise SystemExit(main(sys.argv[1:]))"]
        proc = subprocess.Popen(command,
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProc(proc, socket_path, log_path)
    if wait:
        try:
            server.wait_ready()
        except BaseException:
            server.kill()
            raise
    return server


class RawClient:
    """A blocking client of the wire protocol, frame by frame (to send what ServerStore never would)."""

    def __init__(self, path: Path, *, hello: bool = True, version: int = p.PROTOCOL_VERSION) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.fds: list[int] = []
        self._buf = b""
        self._id = 0
        if hello:
            self.hello_reply = self.call(p.Hello(id=self.next_id(), version=version, pid=os.getpid(), name="raw"))

    def next_id(self) -> int:
        self._id += 1
        return self._id

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> p.Reply:
        while True:
            if len(self._buf) >= 4:
                (n,) = p.FRAME_HEADER.unpack_from(self._buf)
                if len(self._buf) >= 4 + n:
                    body, self._buf = self._buf[4: 4 + n], self._buf[4 + n:]
                    return p.decode_reply(body)
            data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
                    self.fds.extend(fds)
            if not data:
                raise ConnectionError("closed by the server")
            self._buf += data

    def call(self, msg: Any) -> p.Reply:
        self.send_raw(p.encode(msg))
        return self.recv()

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.sock.close()
