"""Stored bytes damaged behind a tier's back (bit rot, a torn write, another writer): every kind is
a miss, counted, and no intact value next to it is lost or changed; on disk, Redis and S3 alike."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lmtier.framing import HEADER_BYTES
from lmtier.keys import ChunkKey, make_namespace
from lmtier.registry import BackendRegistry
from lmtier.testing.backdoors import HEADER_FIELDS
from tests.faults.ledger import FaultRecord
from tests.faults.remotes import Remote, remote_fixture

pytestmark = [pytest.mark.faults, pytest.mark.asyncio]
VALUE_BYTES = 20_000


def _flip(offset: int) -> Callable[[bytes, bytes], bytes]:
    def damage(raw: bytes, other: bytes) -> bytes:
        out = bytearray(raw)
        out[offset] ^= 0x01
        return bytes(out)
    return damage


#: name -> how the stored bytes of one key are damaged (given them and another key's bytes): a bit
#: of the payload, a bit of every header field (reserved bytes and the header check included:
#: the header check covers them, issue 14 item 7), and whole-value damage.
DAMAGE: dict[str, Callable[[bytes, bytes], bytes]] = {
    "payload bit": _flip(HEADER_BYTES + VALUE_BYTES - 1),
    **{f"header {field} bit": _flip(offset) for field, offset in HEADER_FIELDS.items()},
    "truncated payload": lambda raw, other: raw[: HEADER_BYTES + VALUE_BYTES // 2],
    "shorter than a header": lambda raw, other: raw[:10],
    "empty": lambda raw, other: b"",
    "another key's value": lambda raw, other: other,
    "garbage header": lambda raw, other: os.urandom(HEADER_BYTES) + raw[HEADER_BYTES:],
}


class Tier:
    """A backend and the raw bytes under it."""

    def __init__(self, backend: Any, read: Callable[[ChunkKey], bytes | None],
                 write: Callable[[ChunkKey, bytes], None]) -> None:
        self.backend, self.read, self.write = backend, read, write


@pytest_asyncio.fixture(params=["disk", "redis", "s3"])
async def tier(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Tier]:
    registry = BackendRegistry.discover()
    if request.param == "disk":
        backend = await registry.create("disk", {"root": str(tmp_path / "tier")})

        def read_file(key: ChunkKey) -> bytes | None:
            path = backend.path_of(key)
            return path.read_bytes() if path.exists() else None

        try:
            yield Tier(backend, read_file, lambda key, data: backend.path_of(key).write_bytes(data))
        finally:
            await backend.aclose()
        return
    servers = remote_fixture(request.param, tmp_path / request.param)
    remote: Remote = next(servers)
    backend = await registry.create(request.param, remote.options())
    name = backend._name if request.param == "redis" else backend.object_name  # the tier's storage names

    def storage_name(key: ChunkKey) -> str:
        raw = name(key)
        return raw.decode() if isinstance(raw, bytes) else raw

    try:
        yield Tier(backend, lambda key: remote.raw_read(storage_name(key)),
                   lambda key, data: remote.raw_write(storage_name(key), data))
    finally:
        await backend.aclose()
        next(servers, None)  # stops the server


async def test_every_kind_of_damage_is_a_miss_and_spares_the_intact_values(
    tier: Tier, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger(f"{type(tier.backend).__name__.removesuffix('Backend').lower()}: stored bytes damaged "
                 f"({len(DAMAGE)} kinds)")
    ns = make_namespace(test="corruption")
    damaged = {kind: ChunkKey(ns, os.urandom(16)) for kind in DAMAGE}
    intact = [ChunkKey(ns, os.urandom(16)) for _ in range(4)]
    values = {k: os.urandom(VALUE_BYTES) for k in [*damaged.values(), *intact]}
    await tier.backend.put(list(values.items()))
    other = tier.read(intact[0])
    assert other is not None and len(other) == HEADER_BYTES + VALUE_BYTES
    for kind, key in damaged.items():
        raw = tier.read(key)
        assert raw is not None
        tier.write(key, DAMAGE[kind](raw, other))

    keys = [*damaged.values(), *intact]
    for read in ("get", "get", "get_into"):  # twice: a damaged value stays a miss
        if read == "get":
            got = await rec.call(tier.backend.get(keys))
        else:
            outs = [bytearray(VALUE_BYTES) for _ in keys]
            filled = await rec.call(tier.backend.get_into(keys, outs))
            got = [bytes(o) if ok else None for o, ok in zip(outs, filled, strict=True)]
        rec.values(got, [values[k] for k in keys])
        assert [kind for kind, v in zip(DAMAGE, got, strict=False) if v is not None] == []
        assert [bytes(v) for v in got[len(damaged):]] == [values[k] for k in intact]
        del got
    rec.cases = len(DAMAGE)
    assert rec.wrong == 0 and rec.raised == 0
    assert await tier.backend.contains(intact) == [True] * len(intact)
