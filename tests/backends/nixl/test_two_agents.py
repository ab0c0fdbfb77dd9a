"""Two NIXL agents in two processes move DRAM to DRAM over UCX on loopback.

This proves the agent setup the tier relies on: agents without NIXL's listener, metadata
exchanged directly (``get_agent_metadata`` / ``add_remote_agent``, here through pipes), UCX held
to the loopback device, and completion observed through the notification of one specific
transfer (a unique tag), not just any notification.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from tests.backends.nixl._helpers import needs_nixl
from tests.backends.nixl._ucx_peer import PREFIX
from tests.backends.nixl.conftest import LOOPBACK_ENV
from tests.support.net import LOOPBACK_HEX, listening_addresses

pytestmark = needs_nixl

PEER = Path(__file__).with_name("_ucx_peer.py")
NBYTES = 8 << 20
STEP_TIMEOUT_S = 60.0


class Peer:
    """A peer process speaking JSON lines; stopped by PID if it outlives the test."""

    def __init__(self, role: str, logs: Path) -> None:
        env = {**os.environ, **LOOPBACK_ENV}
        self.log = logs / f"{role}.stderr"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(PEER), role, str(NBYTES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, env=env, text=True, start_new_session=True,
            )
        self.role = role

    def read(self) -> dict[str, Any]:
        """The next JSON line, or a failure with the peer's stderr (deadline: STEP_TIMEOUT_S)."""
        box: list[str] = []

        def next_line() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:  # skip NIXL's own log lines
                if line.startswith(PREFIX):
                    box.append(line[len(PREFIX):])
                    return

        reader = threading.Thread(target=next_line, daemon=True)
        reader.start()
        reader.join(STEP_TIMEOUT_S)
        if not box:
            self.stop()
            pytest.fail(f"{self.role} said nothing (exit {self.proc.returncode}):\n{self.log.read_text()[-4000:]}")
        return json.loads(box[0])  # type: ignore[no-any-return]

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def finish(self) -> int:
        try:
            return self.proc.wait(STEP_TIMEOUT_S)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Peer, Peer]]:
    target, initiator = Peer("target", tmp_path), Peer("initiator", tmp_path)
    try:
        yield target, initiator
    finally:
        target.stop()
        initiator.stop()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to inspect sockets")
def test_a_tagged_write_between_two_processes_lands_and_nothing_listens_beyond_loopback(
    peers: tuple[Peer, Peer],
) -> None:
    target, initiator = peers
    t_hello, i_hello = target.read(), initiator.read()
    tag, decoy = f"lmtier-{uuid.uuid4().hex}", f"decoy-{uuid.uuid4().hex}"
    initiator.send({"peer_metadata": t_hello["metadata"], "addr": t_hello["addr"], "len": t_hello["len"],
                    "tag": tag, "decoy_tag": decoy})
    target.send({"peer_metadata": i_hello["metadata"], "tag": tag})

    sent = initiator.read()
    received = target.read()
    listening = listening_addresses([target.proc.pid, initiator.proc.pid])
    initiator.send({"bye": True})

    expected = xxhash.xxh3_64_hexdigest(random.Random(1234).randbytes(NBYTES))
    assert sent == {"done": True, "digest": expected}
    assert received["done"] is True and received["digest"] == expected
    assert received["other_notifs"] == [decoy]  # the first transfer's notification was not taken for it
    assert all(addr in LOOPBACK_HEX for addr in listening), f"a NIXL/UCX socket listens beyond loopback: {listening}"
    assert target.finish() == 0
    assert initiator.finish() == 0
