"""Two StorageManagers in two processes share chunks through one bucket.

Both compute chunk keys from the same token ids (keys agree across processes), each has its own
hot cpu tier, and the s3 tier is the only thing they share. The parent writes one prompt's
chunks, the child reads them and writes another prompt's, the parent reads those.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lmtier.keys import ChunkKey, chunk_keys, make_namespace
from lmtier.manager import StorageManager

pytestmark = pytest.mark.s3

CHUNK_TOKENS = 256
CHUNK_BYTES = 256 * 1024

CHILD = textwrap.dedent("""
    import asyncio, json, random, sys
    from prometheus_client import CollectorRegistry
    from lmtier.keys import chunk_keys
    from lmtier.manager import StorageManager

    def value(key):
        return random.Random(key.digest).randbytes(%(chunk_bytes)d)

    async def main(config, namespace):
        mgr = await StorageManager.from_config(config, metrics_registry=CollectorRegistry())
        try:
            theirs = chunk_keys(list(range(1000, 2024)), namespace, %(chunk_tokens)d)
            assert await mgr.lookup(theirs) == len(theirs), "the parent's chunks are not visible"
            got = await mgr.get(theirs)
            assert [bytes(g) for g in got] == [value(k) for k in theirs], "wrong bytes"
            mine = chunk_keys(list(range(5000, 6024)), namespace, %(chunk_tokens)d)
            await mgr.put([(k, value(k)) for k in mine])
            print(json.dumps({"read": len(theirs), "wrote": [str(k) for k in mine]}))
        finally:
            await mgr.aclose()

    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2]))
""") % {"chunk_bytes": CHUNK_BYTES, "chunk_tokens": CHUNK_TOKENS}


def _value(key: ChunkKey) -> bytes:
    return random.Random(key.digest).randbytes(CHUNK_BYTES)


def _config(s3_options: dict[str, Any]) -> dict[str, Any]:
    return {
        "chunk_tokens": CHUNK_TOKENS,
        "tiers": [
            {"name": "hot", "backend": "cpu", "options": {"max_bytes": "16MiB", "pinned": False}},
            {"name": "shared", "backend": "s3", "options": s3_options},
        ],
    }


@pytest.mark.asyncio
async def test_two_managers_in_two_processes_share_chunks_through_the_bucket(s3_options: Any) -> None:
    config = _config(s3_options())
    namespace = make_namespace(test="two-processes", run=os.urandom(4).hex())
    mine = chunk_keys(list(range(1000, 2024)), namespace, CHUNK_TOKENS)
    theirs = chunk_keys(list(range(5000, 6024)), namespace, CHUNK_TOKENS)
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        assert await mgr.lookup(theirs) == 0
        await mgr.put([(k, _value(k)) for k in mine])

        child = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(config), namespace],
            capture_output=True, text=True, timeout=120, env=os.environ.copy(),
        )
        assert child.returncode == 0, f"child failed:\n{child.stdout}\n{child.stderr}"
        report = json.loads(child.stdout.strip().splitlines()[-1])
        assert report["read"] == len(mine)
        assert report["wrote"] == [str(k) for k in theirs]  # both processes derive the same keys

        assert await mgr.lookup(theirs) == len(theirs)
        got = await mgr.get(theirs)
        assert [bytes(g) for g in got if g is not None] == [_value(k) for k in theirs]
        assert mgr.stats()["shared"]["hits"] == len(theirs)
