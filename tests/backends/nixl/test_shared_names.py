"""One store, two transports: the naming scheme of lmtier.kit.naming is shared, so what the disk
tier wrote the nixl tier's posix plugin reads (and back), and what the s3 tier wrote its obj
plugin reads (and back). Stores written under the nixl tier's older names stay readable: files
are moved into place at open, objects are renamed by lmtier.kit.migrate_object_names."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from lmtier.errors import ConfigError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.kit import MARKER, FileLayout, legacy_object_name, migrate_object_names
from lmtier.testing.backdoors import version_1
from lmtier_backends.disk.backend import open_disk_backend
from lmtier_backends.disk.config import DiskConfig
from lmtier_backends.nixl.backend import open_nixl_backend
from lmtier_backends.nixl.config import NixlConfig
from tests.backends.nixl._helpers import needs_nixl, obj_options, posix_options

pytestmark = needs_nixl

MiB = 1 << 20


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="shared-names", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _values(n: int) -> list[bytes]:
    return [os.urandom(300_000 + i) for i in range(n)]  # 300 KB+: written in place by NIXL


async def _posix(root: Path) -> Any:
    return await open_nixl_backend(NixlConfig(plugin="posix", posix=posix_options(root), staging_slab_bytes=8 * MiB))


async def _disk(root: Path) -> Any:
    return await open_disk_backend(DiskConfig(root=root, max_bytes=64 * MiB))


@pytest.mark.asyncio
@pytest.mark.parametrize("writer, reader", [("disk", "nixl posix"), ("nixl posix", "disk")])
async def test_a_root_written_by_one_file_transport_is_read_by_the_other(
    tmp_path: Path, writer: str, reader: str
) -> None:
    open_tier = {"disk": _disk, "nixl posix": _posix}
    keys, values = _keys(3), _values(3)
    first = await open_tier[writer](tmp_path / "root")
    try:
        await first.put(list(zip(keys, values, strict=True)))
    finally:
        await first.aclose()
    second = await open_tier[reader](tmp_path / "root")
    try:
        assert await second.contains(keys) == [True] * 3
        assert [bytes(v) for v in await second.get(keys)] == values
        assert second.stats()["objects"] == 3  # indexed at open, nothing moved or deleted
    finally:
        await second.aclose()


@pytest.mark.asyncio
async def test_files_in_the_nixl_tiers_older_one_level_layout_are_moved_into_place_and_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    keys, values = _keys(2), _values(2)
    old_paths = []
    for key, value in zip(keys, values, strict=True):  # as lmtier 0.1's nixl tier wrote them
        path = root / key.namespace / key.digest.hex()[:2] / str(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(version_1(key, value))
        old_paths.append(path)
    with pytest.raises(ConfigError, match=re.escape(f"touch '{root / MARKER}'")):
        await _posix(root)  # no marker: not adopted until the operator says it is a tier's root
    (root / MARKER).touch()  # the one migration step (docs/backends/nixl.md)
    tier = await _posix(root)
    try:
        assert [bytes(v) for v in await tier.get(keys)] == values
    finally:
        await tier.aclose()
    assert not any(p.exists() for p in old_paths)
    assert all(Path(FileLayout(root).path_of(k)).exists() for k in keys)


@pytest.fixture
def s3_env(seaweed: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("LMTIER_TEST_SHARED_AK", seaweed.endpoint.access_key)
    monkeypatch.setenv("LMTIER_TEST_SHARED_SK", seaweed.endpoint.secret_key)
    return {"access_key_env": "LMTIER_TEST_SHARED_AK", "secret_key_env": "LMTIER_TEST_SHARED_SK"}


@pytest.mark.s3
@pytest.mark.asyncio
@pytest.mark.parametrize("writer, reader", [("s3", "nixl obj"), ("nixl obj", "s3")])
async def test_a_bucket_written_by_one_object_transport_is_read_by_the_other(
    seaweed: Any, bucket: str, s3_env: dict[str, str], writer: str, reader: str
) -> None:
    from lmtier_backends.s3.backend import open_s3_backend
    from lmtier_backends.s3.config import S3Config

    prefix = f"shared-{os.urandom(3).hex()}"

    async def open_tier(which: str) -> Any:
        if which == "s3":
            return await open_s3_backend(S3Config(bucket=bucket, prefix=prefix, endpoint_url=seaweed.endpoint.endpoint_url,
                                                  **s3_env))
        return await open_nixl_backend(NixlConfig(plugin="obj", obj=obj_options(seaweed, bucket, prefix=f"{prefix}/"),
                                                  staging_slab_bytes=8 * MiB))

    keys, values = _keys(3), _values(3)
    first = await open_tier(writer)
    try:
        await first.put(list(zip(keys, values, strict=True)))
    finally:
        await first.aclose()
    second = await open_tier(reader)
    try:
        assert await second.contains(keys) == [True] * 3
        assert [bytes(v) for v in await second.get(keys)] == values
    finally:
        await second.aclose()


@pytest.mark.s3
@pytest.mark.asyncio
async def test_objects_under_the_nixl_tiers_older_names_are_read_after_one_migration(seaweed: Any, bucket: str) -> None:
    prefix = f"old-{os.urandom(3).hex()}/"
    client = seaweed.endpoint.client()
    keys, values = _keys(3), _values(3)
    for key, value in zip(keys, values, strict=True):  # as lmtier 0.1's nixl tier wrote them
        client.put_object(Bucket=bucket, Key=legacy_object_name(prefix, key), Body=version_1(key, value))
    client.put_object(Bucket=bucket, Key=f"{prefix}README", Body=b"not a chunk: left alone")
    tier = await open_nixl_backend(NixlConfig(plugin="obj", obj=obj_options(seaweed, bucket, prefix=prefix),
                                              staging_slab_bytes=8 * MiB))
    try:
        assert await tier.contains(keys) == [False] * 3  # not found under the shared names yet
        moved: list[int] = []
        assert migrate_object_names(client, bucket, prefix, progress=moved.append) == 3
        assert moved == [1, 2, 3]
        assert [bytes(v) for v in await tier.get(keys)] == values
        assert migrate_object_names(client, bucket, prefix) == 0  # idempotent
    finally:
        await tier.aclose()
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert f"{prefix}README" in listed and not any(legacy_object_name(prefix, k) in listed for k in keys)
