"""Start and stop vLLM's OpenAI-compatible server (``vllm serve``, as the docs write it) for tests.

The server binds 127.0.0.1 on a free port, runs in its own process group (API server, engine
core and worker are three processes on CPU) and is stopped by that group's id. Readiness is
polled with a deadline (``GET /v1/models``), never slept on; its output goes to a log file the
test can read.

    server = start_vllm_server(model, tmp_path / "server.log", kv_transfer_config={...})
    body = server.complete([1, 2, 3], max_tokens=4)      # token-id prompt, logprobs as token ids
    server.metrics()                                      # the /metrics text
    server.stop()
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.redis_server import free_port

__all__ = ["VllmServer", "start_vllm_server", "vllm_command"]

HOST = "127.0.0.1"


@dataclass
class VllmServer:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    model_name: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _request(self, path: str, body: Mapping[str, Any] | None = None, timeout: float = 120.0) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())

    def complete(self, prompt: Sequence[int] | str, *, max_tokens: int, logprobs: int | None = 1) -> dict[str, Any]:
        """``POST /v1/completions`` greedy; token ids come back as ``token_id:N`` strings."""
        body: dict[str, Any] = {"model": self.model_name, "prompt": list(prompt) if not isinstance(prompt, str)
                                else prompt, "max_tokens": max_tokens, "temperature": 0.0,
                                "return_tokens_as_token_ids": True}
        if logprobs is not None:
            body["logprobs"] = logprobs
        out: dict[str, Any] = json.loads(self._request("/v1/completions", body))
        return out

    def metrics(self) -> str:
        return self._request("/metrics").decode()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout``."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        # the worker and engine-core children share the group: make sure none is left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def vllm_command() -> str:
    """The ``vllm`` console script of this interpreter's environment (what a user types)."""
    script = Path(sys.executable).parent / "vllm"
    if not script.exists():
        raise RuntimeError(f"no vllm console script next to {sys.executable}; install vLLM (make setup)")
    return str(script)


def start_vllm_server(model: str, log_path: Path, *, kv_transfer_config: Mapping[str, Any] | None = None,
                      args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                      model_name: str = "tiny", ready_timeout: float = 300.0) -> VllmServer:
    """Start ``vllm serve MODEL`` and wait until it serves."""
    port = free_port()
    cmd = [vllm_command(), "serve", model, "--served-model-name", model_name, "--host", HOST,
           "--port", str(port), *args]
    if kv_transfer_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(dict(kv_transfer_config))]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    server = VllmServer(proc, port, log_path, model_name)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            server._request("/v1/models", timeout=5.0)
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"vLLM server not ready after {ready_timeout:.0f}s:\n{server.log()[-4000:]}")
        time.sleep(0.5)  # poll interval of the readiness check (not a synchronisation)
