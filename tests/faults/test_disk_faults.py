"""The disk tier under a hostile filesystem (issue 14, items 1-4), on real filesystems where the
case is about one: a bad file in a batch, a read-only remount, a full filesystem, a root that is
not the tier's own. Every case ends in a miss or a skipped write, never a wrong value, and no
stored, intact value is lost."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from lmtier.errors import BackendError, BackendUnavailableError, ConfigError
from lmtier.framing import HEADER_BYTES
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier_backends.disk import _files
from lmtier_backends.disk.backend import MAX_READ_FAILURES, DiskBackend, open_disk_backend
from lmtier_backends.disk.config import DiskConfig
from tests.faults.conftest import ScratchFS
from tests.faults.ledger import FaultRecord
from tests.support.backdoors import UnmountedRoot

pytestmark = [pytest.mark.faults, pytest.mark.asyncio]
KiB = 1 << 10


def _keys(n: int, tag: str = "faults") -> list[ChunkKey]:
    ns = make_namespace(test=tag)
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


async def _open(root: Path, **options: object) -> DiskBackend:
    return await open_disk_backend(DiskConfig(root=root, **options))


def _values(n: int, size: int = 10 * KiB) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def _sample(mgr: StorageManager, name: str, **labels: str) -> float:
    return mgr.metrics.registry.get_sample_value(name, labels) or 0.0


# -- 1. one bad entry must not poison its batch ----------------------------------------------------
async def test_an_unreadable_file_is_a_miss_for_its_key_alone_and_leaves_the_index(
    tmp_path: Path, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger("disk: one unreadable file in a batch (EISDIR)")
    backend = await _open(tmp_path / "tier")
    keys, values = _keys(8), _values(8)
    await backend.put(list(zip(keys, values, strict=True)))
    bad = backend.path_of(keys[3])
    bad.unlink()
    bad.mkdir()  # a directory where the file was: every read of it fails (EISDIR), not corrupt

    for _ in range(MAX_READ_FAILURES):
        got = await rec.call(backend.get(keys))
        rec.values(got, values)
        assert [v is not None for v in got] == [i != 3 for i in range(8)]
        assert [bytes(v) for i, v in enumerate(got) if i != 3] == values[:3] + values[4:]
        del got
    assert await backend.contains(keys) == [i != 3 for i in range(8)]  # left the index
    assert backend.stats()["read_errors"] == MAX_READ_FAILURES and backend.stats()["corrupt"] == 0
    assert bad.is_dir()  # not the tier's to delete
    outs = [bytearray(10 * KiB) for _ in keys]
    assert await backend.get_into(keys, outs) == [i != 3 for i in range(8)]
    await backend.aclose()


async def test_an_io_error_on_one_file_is_a_miss_and_the_key_is_served_again_when_it_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: Callable[[str], FaultRecord]
) -> None:
    backend = await _open(tmp_path / "tier")
    keys, values = _keys(4), _values(4)
    await backend.put(list(zip(keys, values, strict=True)))
    rec = ledger("disk: EIO reading one file (bad sector, injected)")
    sick = str(backend.path_of(keys[1]))
    read_payload = _files._read_payload

    def bad_sector(fd: int, path: str, *args: object) -> None:  # a fake only to inject EIO
        if path == sick:
            raise OSError(errno.EIO, "Input/output error")
        read_payload(fd, path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_files, "_read_payload", bad_sector)
    got = await rec.call(backend.get(keys))
    rec.values(got, values)
    assert [v is not None for v in got] == [True, False, True, True]
    monkeypatch.undo()
    after = [bytes(v) for v in await backend.get(keys)]
    rec.lost = sum(a != v for a, v in zip(after, values, strict=True))
    assert after == values  # one failure: still indexed
    await backend.aclose()


async def test_a_root_deleted_under_the_tier_raises_and_is_not_recreated(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    backend = await _open(root)
    keys = _keys(3)
    await backend.put([(k, b"v" * 100) for k in keys])
    shutil.rmtree(root)
    with pytest.raises(BackendUnavailableError, match=r"root .* is gone"):
        await backend.get(keys)
    with pytest.raises(BackendUnavailableError, match=r"root .* is gone"):
        await backend.put([(_keys(1)[0], b"new")])
    assert not root.exists()  # a write never recreates a root it lost (an unmount, a wipe)
    await backend.aclose()


async def test_an_unmounted_root_fails_every_call_typed_writes_nothing_there_and_serves_again_once_back(
    tmp_path: Path,
) -> None:
    root = tmp_path / "tier"
    backend = await _open(root)
    keys, values = _keys(4), _values(4)
    await backend.put(list(zip(keys, values, strict=True)))
    unmounted = UnmountedRoot(root)
    unmounted.stop()  # the bare mount point: an empty directory, no marker
    assert await backend.contains(keys) == [True] * 4  # nothing has looked at the disk yet
    with pytest.raises(BackendUnavailableError, match=r"root .* is gone"):
        await backend.get(keys[:2])
    with pytest.raises(BackendUnavailableError, match=r"root .* is gone"):
        await backend.contains(keys)  # from here on it asks the root, not the index
    with pytest.raises(BackendUnavailableError, match=r"root .* is gone"):
        await backend.put([(_keys(1)[0], b"new")])
    with pytest.raises(BackendUnavailableError, match=r"root .* is gone"):
        await backend.delete(keys[3:])  # deletes nothing, and says so
    unmounted.start()  # asserts that nothing was written into the mount point
    assert await backend.contains(keys) == [True, True, True, False]  # key 3 left the index
    assert [bytes(v) for v in await backend.get(keys[:3])] == values[:3]
    await backend.aclose()
    reopened = await _open(root)  # the file the failed delete left is found again by the scan
    assert bytes((await reopened.get(keys[3:]))[0]) == values[3]
    await reopened.aclose()


async def test_under_the_manager_a_bad_file_costs_one_miss_and_never_opens_the_circuit(tmp_path: Path) -> None:
    config = {"tiers": [{"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path / "tier")}}]}
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        keys, values = _keys(8), _values(8)
        await mgr.put(list(zip(keys, values, strict=True)))
        bad = mgr.tiers[0].backend.path_of(keys[0])  # type: ignore[attr-defined]
        bad.unlink()
        bad.mkdir()
        for _ in range(10):
            got = await mgr.get(keys)
            assert [v is not None for v in got] == [False] + [True] * 7
            del got
        assert _sample(mgr, "lmtier_tier_hits_total", tier="nvme") == 70
        assert _sample(mgr, "lmtier_tier_circuit_open", tier="nvme") == 0
        assert await mgr.lookup(keys[1:]) == 7


# -- 2. a read-only filesystem serves reads ----------------------------------------------------------
async def test_a_read_only_remount_serves_every_read_and_skips_writes(
    scratch_fs: Callable[[int], ScratchFS], ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger("disk: filesystem remounted read-only")
    fs = scratch_fs(8 << 20)
    item = 10 * KiB + HEADER_BYTES
    backend = await _open(fs.path / "tier", max_bytes=3 * item)
    keys, values = _keys(4), _values(4)
    await backend.put(list(zip(keys[:3], values[:3], strict=True)))
    fs.read_only()  # what ext4 errors=remount-ro does after a disk error
    for _ in range(3):
        got = await rec.call(backend.get(keys[:3]))
        rec.values(got, values[:3])
        assert [bytes(v) for v in got] == values[:3]
        del got
    outs = [bytearray(10 * KiB) for _ in range(3)]
    assert await backend.get_into(keys[:3], outs) == [True] * 3
    assert [bytes(o) for o in outs] == values[:3]
    assert backend.stats()["read_errors"] == 0
    # the reads still count as uses: keys[0] read last is the most recently used
    await backend.get([keys[0]])
    with pytest.raises(BackendError, match="read-only") as info:
        await backend.put([(keys[3], values[3])])
    assert not isinstance(info.value, BackendUnavailableError)  # a skipped write, not a dead tier
    fs.read_write()
    await backend.put([(keys[3], values[3])])  # over budget: evicts the least recently used, keys[1]
    assert await backend.contains(keys) == [True, False, True, True]
    await backend.aclose()


async def test_a_tier_opened_on_a_read_only_filesystem_serves_its_files(
    scratch_fs: Callable[[int], ScratchFS], caplog: pytest.LogCaptureFixture
) -> None:
    fs = scratch_fs(8 << 20)
    root = fs.path / "tier"
    first = await _open(root)
    keys, values = _keys(3), _values(3)
    await first.put(list(zip(keys, values, strict=True)))
    await first.aclose()
    fs.read_only()
    reopened = await _open(root)
    assert "read-only filesystem: serving reads, skipping writes" in caplog.text
    assert [bytes(v) for v in await reopened.get(keys)] == values
    await reopened.aclose()


async def test_under_the_manager_a_read_only_disk_keeps_its_circuit_closed_and_hits(
    scratch_fs: Callable[[int], ScratchFS]
) -> None:
    fs = scratch_fs(8 << 20)
    config = {"tiers": [{"name": "nvme", "backend": "disk", "options": {"root": str(fs.path / "tier")}}]}
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        keys, values = _keys(6), _values(6)
        await mgr.put(list(zip(keys[:3], values[:3], strict=True)))
        fs.read_only()
        for key, value in zip(keys[3:], values[3:], strict=True):  # more failures than the breaker allows
            await mgr.put([(key, value)])
        assert _sample(mgr, "lmtier_tier_skipped_writes_total", tier="nvme", reason="error") == 3
        got = await mgr.get(keys)
        assert [bytes(v) if v is not None else None for v in got] == values[:3] + [None] * 3
        assert _sample(mgr, "lmtier_tier_circuit_open", tier="nvme") == 0


# -- 3. a full filesystem evicts instead of freezing ----------------------------------------------------
async def test_a_full_filesystem_evicts_the_least_recently_used_and_stores_every_new_key(
    scratch_fs: Callable[[int], ScratchFS], caplog: pytest.LogCaptureFixture, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger("disk: filesystem full before max_bytes (ENOSPC)")
    rec.notes.append("LRU files evicted to make room, as at max_bytes")
    fs = scratch_fs(1 << 20)  # 1 MiB, and max_bytes keeps its 20 GiB default: the disk fills first
    with caplog.at_level(logging.WARNING, logger="lmtier_backends.disk.backend"):
        backend = await _open(fs.path / "tier")
    assert "max_bytes=21474836480 is more than the filesystem" in caplog.text
    keys, values = _keys(20), _values(20, 100 * KiB)
    for key, value in zip(keys, values, strict=True):
        await rec.call(backend.put([(key, value)]))  # never raises: room is made
        (got,) = await rec.call(backend.get([key]))
        rec.values([got], [value])
        assert got is not None and bytes(got) == value
        del got
    stats = backend.stats()
    assert stats["full_filesystem_evictions"] > 0 and stats["bytes"] < fs.size
    present = await backend.contains(keys)
    assert present[-1] and not present[0]  # the oldest made room for the newest
    assert [bytes(v) for k, v in zip(keys, await backend.get(keys), strict=True) if v is not None] == [
        value for value, here in zip(values, present, strict=True) if here]
    assert "is full" in caplog.text
    await backend.aclose()


async def test_under_the_manager_a_full_filesystem_skips_no_write(scratch_fs: Callable[[int], ScratchFS]) -> None:
    fs = scratch_fs(1 << 20)
    config = {"tiers": [{"name": "nvme", "backend": "disk", "options": {"root": str(fs.path / "tier")}}]}
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        keys, values = _keys(20), _values(20, 100 * KiB)
        for key, value in zip(keys, values, strict=True):
            await mgr.put([(key, value)])
        assert sum(v is not None for v in await mgr.get(keys[-5:])) == 5
        assert _sample(mgr, "lmtier_tier_skipped_writes_total", tier="nvme", reason="full") == 0


# -- 4. the tier deletes only its own files ---------------------------------------------------------------
async def test_an_empty_root_is_refused_before_anything_opens() -> None:
    for root in ("", "  "):
        with pytest.raises(ValueError, match="root is empty"):
            DiskConfig(root=root)


async def test_a_non_empty_directory_without_the_marker_is_refused_and_left_untouched(
    tmp_path: Path, ledger: Callable[[str], FaultRecord]
) -> None:
    rec = ledger("disk: root is a user's non-empty directory")
    home = tmp_path / "home"
    home.mkdir()
    report = home / "report.tmp-2024.txt"
    report.write_text("quarterly figures")
    namespace_like = home / make_namespace(test="x") / "ab"
    namespace_like.mkdir(parents=True)
    short = namespace_like / f"{_keys(1, 'x')[0]}"  # shorter than a header: the scan would delete it
    short.write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"not empty .* has no \.lmtier_disk_root marker") as info:
        await _open(home)
    rec.typed_error()
    assert "new or empty directory" in str(info.value) and "touch" in str(info.value)
    rec.lost = (not report.exists()) + (not short.exists())
    assert report.read_text() == "quarterly figures" and short.read_bytes() == b"mine"
    assert sorted(p.name for p in home.iterdir()) == sorted([report.name, namespace_like.parent.name])


async def test_the_first_open_claims_the_root_and_later_opens_adopt_it(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    backend = await _open(root)
    assert (root / _files.MARKER).is_file()
    (key,) = _keys(1)
    await backend.put([(key, b"kept")])
    await backend.aclose()
    user_file = root / "notes.txt"  # a file someone left in the tier's root: never the tier's to delete
    user_file.write_text("mine")
    reopened = await _open(root)
    assert [bytes(v) for v in await reopened.get([key])] == [b"kept"]
    await reopened.aclose()
    assert user_file.read_text() == "mine"
    # an older tier without the marker is adopted once the user creates it, as the error says
    (root / _files.MARKER).unlink()
    with pytest.raises(ConfigError):
        await _open(root)
    (root / _files.MARKER).touch()
    adopted = await _open(root)
    assert await adopted.contains([key]) == [True]
    await adopted.aclose()
