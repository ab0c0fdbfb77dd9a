"""One side of a two-process NIXL DRAM->DRAM transfer over UCX (run by test_two_agents.py).

Usage: ``python _ucx_peer.py target|initiator NBYTES``. The peers talk to the test only through
stdin/stdout, one JSON object per line (prefixed on stdout); agent metadata travels as hex, and no NIXL listener is
started (it would bind 0.0.0.0). The test sets ``UCX_NET_DEVICES=lo`` and ``UCX_MODULES=^ib``.

target:    registers a zeroed buffer, prints {metadata, addr, len}; reads {peer_metadata, tag};
           waits for the notification carrying exactly ``tag`` (others are recorded, not taken
           for it), prints {done, digest, other_notifs}; exits after cleaning up.
initiator: registers a buffer of a seeded pattern, prints {metadata}; reads {peer_metadata,
           addr, len, tag, decoy_tag}; writes the first half with ``decoy_tag`` and waits for it,
           then the second half with ``tag``; prints {done, digest}; waits for "bye"; cleans up.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

import numpy as np
import xxhash

DEADLINE_S = 60.0
PREFIX = "@peer "  # NIXL logs to stdout too: our lines carry this prefix


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _hear() -> dict[str, Any]:
    line = sys.stdin.readline()
    if not line:
        raise SystemExit("the test closed our stdin")
    return json.loads(line)  # type: ignore[no-any-return]


def _agent(name: str) -> Any:
    from lmtier_backends.nixl._nixl import load_api

    api = load_api()
    config = api.nixl_agent_config(enable_listen_thread=False, backends=["UCX"])
    return api.nixl_agent(name, config)


def _wait(agent: Any, handle: Any) -> None:
    state = agent.transfer(handle)
    deadline = time.monotonic() + DEADLINE_S
    while state == "PROC":
        if time.monotonic() > deadline:
            raise SystemExit("transfer did not finish in time")
        time.sleep(0.0005)  # poll interval of a progress loop
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        raise SystemExit(f"transfer failed: {state}")


def target(nbytes: int) -> None:
    agent = _agent(f"target-{random.getrandbits(32):08x}")
    buf = np.zeros(nbytes, dtype=np.uint8)
    reg = agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    _say({"metadata": agent.get_agent_metadata().hex(), "addr": buf.ctypes.data, "len": nbytes})
    msg = _hear()
    peer = agent.add_remote_agent(bytes.fromhex(msg["peer_metadata"]))
    sender = peer.decode() if isinstance(peer, bytes) else peer  # notifications are keyed by str
    tag = msg["tag"].encode()
    deadline = time.monotonic() + DEADLINE_S
    while True:  # exact match: another transfer's notification must not count
        notes = agent.update_notifs().get(sender, [])
        if tag in notes:
            notes.remove(tag)
            break
        if time.monotonic() > deadline:
            raise SystemExit("the tagged notification never came")
        time.sleep(0.0005)  # poll interval of a progress loop
    other = [n.decode(errors="replace") for notes in agent.update_notifs().values() for n in notes]
    _say({"done": True, "digest": xxhash.xxh3_64_hexdigest(buf.tobytes()), "other_notifs": other})
    agent.remove_remote_agent(peer)
    agent.deregister_memory(reg)


def initiator(nbytes: int) -> None:
    agent = _agent(f"initiator-{random.getrandbits(32):08x}")
    buf = np.frombuffer(random.Random(1234).randbytes(nbytes), dtype=np.uint8).copy()
    reg = agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    _say({"metadata": agent.get_agent_metadata().hex()})
    msg = _hear()
    peer = agent.add_remote_agent(bytes.fromhex(msg["peer_metadata"]))
    deadline = time.monotonic() + DEADLINE_S
    while not agent.check_remote_metadata(peer):
        if time.monotonic() > deadline:
            raise SystemExit("remote metadata never became usable")
        time.sleep(0.001)  # poll interval
    half = nbytes // 2
    for (start, end), tag in (((0, half), msg["decoy_tag"]), ((half, nbytes), msg["tag"])):
        local = agent.get_xfer_descs([(buf.ctypes.data + start, end - start, 0)], "DRAM")
        remote = agent.get_xfer_descs([(msg["addr"] + start, end - start, 0)], "DRAM")
        handle = agent.initialize_xfer("WRITE", local, remote, peer, tag.encode())
        try:
            _wait(agent, handle)
        finally:
            agent.release_xfer_handle(handle)
    _say({"done": True, "digest": xxhash.xxh3_64_hexdigest(buf.tobytes())})
    if _hear().get("bye") is not True:
        raise SystemExit("expected bye")
    agent.remove_remote_agent(peer)
    agent.deregister_memory(reg)


if __name__ == "__main__":
    role, size = sys.argv[1], int(sys.argv[2])
    {"target": target, "initiator": initiator}[role](size)
