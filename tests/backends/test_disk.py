"""The disk tier against the conformance suite, plus restarts, corruption, eviction and faults."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from lmtier.errors import (
    BackendError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    InvalidArgumentError,
)
from lmtier.framing import HEADER_BYTES
from lmtier.keys import ChunkKey, make_namespace
from lmtier.kit import TEMP_MARK
from lmtier.memory import HostMemoryPool
from lmtier.registry import BackendRegistry
from lmtier.testing import BackendConformance
from lmtier.testing.backdoors import newer_format
from lmtier_backends.disk import _files
from lmtier_backends.disk._errors import map_os_error
from lmtier_backends.disk.backend import DiskBackend, open_disk_backend
from lmtier_backends.disk.config import DiskConfig
from tests.support.backdoors import RawFiles, UnmountedRoot

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


class TestDiskBackend(BackendConformance):
    """With the back doors to its files (the corruption scenarios) and to its root (unmounted and
    mounted again: the outage scenario). Other failing filesystems (read-only, full, EIO) are
    tests/faults/test_disk_faults.py's subject (a real tmpfs)."""

    @pytest.fixture
    def backend_factory(self, tmp_path):
        config = DiskConfig(root=tmp_path / "tier", max_bytes=256 * MiB, max_concurrency=4)
        return lambda: open_disk_backend(config)

    @pytest.fixture
    def raw_store(self, tmp_path):
        return RawFiles(tmp_path / "tier")

    @pytest.fixture
    def service(self, tmp_path):
        service = UnmountedRoot(tmp_path / "tier")
        try:
            yield service
        finally:
            service.start()


def _keys(n: int, tag: str = "disk") -> list[ChunkKey]:
    ns = make_namespace(test=tag)
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


async def _open(root: Path, **options: object) -> DiskBackend:
    return await open_disk_backend(DiskConfig(root=root, **options))


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_MARK in p.name]


# -- restart -------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_restart_rebuilds_the_index_with_sizes_and_lru_order(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    k = _keys(4)
    first = await _open(root, max_bytes=7000)
    await first.put([(k[0], b"a" * 1000), (k[1], b"b" * 2000), (k[2], b"c" * 3000)])
    await first.get([k[0]])  # recency now: k1, k2, k0
    stored = first.stats()
    await first.aclose()

    second = await _open(root, max_bytes=7000)
    evicted: list[ChunkKey] = []
    second.add_eviction_listener(lambda key, view: evicted.append(key))
    assert second.stats()["objects"] == 3
    assert second.stats()["bytes"] == stored["bytes"] == 6000 + 3 * HEADER_BYTES
    await second.put([(k[3], b"d" * 1000)])  # 7256 bytes > 7000: the least recent (k1) must go
    assert evicted == [k[1]]
    assert await second.contains(k) == [True, False, True, True]
    assert [bytes(v) for v in await second.get([k[0], k[2]])] == [b"a" * 1000, b"c" * 3000]
    await second.aclose()


@pytest.mark.asyncio
async def test_stale_temp_files_are_deleted_at_open_and_stored_files_kept(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    (key,) = _keys(1)
    backend = await _open(root)
    await backend.put([(key, b"kept")])
    await backend.aclose()
    path = backend.path_of(key)
    # exactly the names the tier creates: a writer's temp file, an open's probe and marker temp
    stale = [Path(f"{path}.tmp-0a1b2c3d4e5f"), root / ".probe.tmp-00112233aabb",
             root / ".lmtier_disk_root.tmp-ffeeddccbbaa"]
    # look-alikes it never creates: not its own, never deleted
    foreign = [Path(f"{path}.tmp-0a1b2c"), path.parent.parent / "x.tmp-99", root / ".probe.tmp-1234",
               root / "report.tmp-2024.txt", path.parent / f"{path.name}\n", path.parent / f"{path.name}.bak"]
    for p in stale + foreign:
        p.write_bytes(b"half a write")

    reopened = await _open(root)
    assert [p for p in stale if p.exists()] == []
    assert [p for p in foreign if not p.exists()] == []
    assert reopened.stats()["stale_tmp_removed"] == 3 and reopened.stats()["corrupt"] == 0
    assert [bytes(v) for v in await reopened.get([key])] == [b"kept"]
    await reopened.aclose()


@pytest.mark.asyncio
async def test_a_file_shorter_than_a_header_is_removed_and_counted_at_open(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    good, bad = _keys(2)
    backend = await _open(root)
    await backend.put([(good, b"good"), (bad, b"bad")])
    await backend.aclose()
    backend.path_of(bad).write_bytes(b"LMTR")

    reopened = await _open(root)
    assert reopened.stats()["corrupt"] == 1 and reopened.stats()["objects"] == 1
    assert not reopened.path_of(bad).exists()
    assert await reopened.contains([good, bad]) == [True, False]
    await reopened.aclose()


@pytest.mark.asyncio
async def test_lowering_max_bytes_trims_the_least_recently_used_files_at_open(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    k = _keys(3)
    backend = await _open(root)
    for i, key in enumerate(k):
        await backend.put([(key, bytes([i]) * 1000)])
    await backend.aclose()

    smaller = await _open(root, max_bytes=2 * (1000 + HEADER_BYTES))
    assert await smaller.contains(k) == [False, True, True]
    assert not smaller.path_of(k[0]).exists()
    assert smaller.stats()["bytes"] == 2 * (1000 + HEADER_BYTES)
    await smaller.aclose()


@pytest.mark.asyncio
async def test_changing_fan_out_moves_existing_files_to_their_new_place(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    (key,) = _keys(1)
    deep = await _open(root, fan_out=2)
    await deep.put([(key, b"moved")])
    old_path = deep.path_of(key)
    await deep.aclose()

    flat = await _open(root, fan_out=0)
    assert flat.path_of(key) == root / key.namespace / str(key)
    assert flat.path_of(key).exists() and not old_path.exists()
    assert [bytes(v) for v in await flat.get([key])] == [b"moved"]
    await flat.aclose()


@pytest.mark.asyncio
async def test_fsync_puts_round_trip_and_persist(tmp_path: Path) -> None:
    root = tmp_path / "tier"
    keys = _keys(3)
    backend = await _open(root, fsync=True)
    await backend.put([(k, bytes([i]) * 5000) for i, k in enumerate(keys)])
    await backend.aclose()
    reopened = await _open(root, fsync=True)
    assert [bytes(v) for v in await reopened.get(keys)] == [bytes([i]) * 5000 for i in range(3)]
    assert _tmp_files(root) == []
    await reopened.aclose()


# -- corruption ----------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_get_into_a_buffer_of_the_wrong_size_is_false_and_keeps_the_file(tmp_path: Path) -> None:
    backend = await _open(tmp_path / "tier")
    (key,) = _keys(1)
    await backend.put([(key, b"x" * 1000)])
    assert await backend.get_into([key], [bytearray(999)]) == [False]
    assert backend.path_of(key).exists() and backend.stats()["corrupt"] == 0
    with pytest.raises(InvalidArgumentError):
        await backend.get_into([key], [b"\x00" * 1000])  # read-only
    with pytest.raises(InvalidArgumentError):
        await backend.get_into([key], [])
    await backend.aclose()


@pytest.mark.asyncio
async def test_get_into_fills_host_pool_buffers_numpy_arrays_and_cpu_tensors(tmp_path: Path) -> None:
    import torch

    backend = await _open(tmp_path / "tier")
    keys = _keys(3)
    data = [os.urandom(4096) for _ in keys]
    await backend.put(list(zip(keys, data, strict=True)))
    pool = HostMemoryPool(1 * MiB, pin=False, name="disk-test")
    host = pool.allocate(4096)
    try:
        arr = np.zeros(1024, dtype=np.float32)  # a typed array of the right byte size
        tensor = torch.zeros(2048, dtype=torch.bfloat16)  # any dtype: filled as raw bytes
        assert await backend.get_into(keys, [host, arr, tensor]) == [True, True, True]
        assert bytes(host.tensor.numpy()) == data[0]
        assert arr.tobytes() == data[1]
        assert tensor.view(torch.uint8).numpy().tobytes() == data[2]
    finally:
        host.release()
        pool.close()
        await backend.aclose()


@pytest.mark.asyncio
async def test_get_reuses_a_large_buffer_only_after_every_view_of_it_is_gone(tmp_path: Path) -> None:
    backend = await _open(tmp_path / "tier")
    a, b = _keys(2)
    da, db = os.urandom(2 * MiB), os.urandom(2 * MiB)
    await backend.put([(a, da), (b, db)])
    (va,) = await backend.get([a])
    with pytest.raises(TypeError):
        va[0] = 0  # type: ignore[index]  # results are read-only
    part = np.frombuffer(va, dtype=np.uint8)[10:20]  # a derived view keeps the buffer lent
    del va
    gc.collect()
    (vb,) = await backend.get([b])
    assert bytes(part) == da[10:20] and bytes(vb) == db
    assert backend.stats()["idle_get_buffer_bytes"] == 0
    del part, vb
    gc.collect()
    assert backend.stats()["idle_get_buffer_bytes"] == 4 * MiB
    (va,) = await backend.get([a])  # served from a recycled buffer
    assert bytes(va) == da and backend.stats()["idle_get_buffer_bytes"] == 2 * MiB
    del va
    await backend.aclose()
    assert backend.stats()["idle_get_buffer_bytes"] == 0


# -- eviction ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_lru_eviction_stays_within_max_bytes_and_hands_the_listener_the_payload(tmp_path: Path) -> None:
    item = 1024 + HEADER_BYTES
    backend = await _open(tmp_path / "tier", max_bytes=3 * item)
    views: list[tuple[ChunkKey, memoryview]] = []
    backend.add_eviction_listener(lambda key, view: views.append((key, view)))
    k = _keys(5)
    await backend.put([(k[0], b"a" * 1024), (k[1], b"b" * 1024), (k[2], b"c" * 1024)])
    await backend.get([k[0]])  # k0 becomes most recently used
    await backend.put([(k[3], b"d" * 1024)])
    await backend.put([(k[4], b"e" * 1024)])

    assert [key for key, _ in views] == [k[1], k[2]]
    assert not backend.path_of(k[1]).exists() and not backend.path_of(k[2]).exists()
    # the views outlive the unlinked files: they map them until dropped
    assert [bytes(v) for _, v in views] == [b"b" * 1024, b"c" * 1024]
    assert await backend.contains(k) == [True, False, False, True, True]
    stats = backend.stats()
    assert stats["bytes"] == 3 * item <= backend.max_bytes and stats["evictions"] == 2
    views.clear()
    await backend.aclose()


@pytest.mark.asyncio
async def test_an_evicted_file_that_fails_validation_is_counted_not_offered(tmp_path: Path) -> None:
    item = 1000 + HEADER_BYTES
    backend = await _open(tmp_path / "tier", max_bytes=2 * item)
    offered: list[ChunkKey] = []
    backend.add_eviction_listener(lambda key, view: offered.append(key))
    k = _keys(3)
    await backend.put([(k[0], os.urandom(1000)), (k[1], os.urandom(1000))])
    raw = bytearray(backend.path_of(k[0]).read_bytes())
    raw[-1] ^= 0xFF  # the least recently used file goes bad on disk
    backend.path_of(k[0]).write_bytes(bytes(raw))
    await backend.put([(k[2], os.urandom(1000))])
    assert offered == []
    assert backend.stats()["corrupt"] == 1 and not backend.path_of(k[0]).exists()
    await backend.aclose()


@pytest.mark.asyncio
async def test_an_evicted_file_of_a_newer_format_is_removed_not_offered(tmp_path: Path) -> None:
    # a newer lmtier's file in the tier's own root counts toward max_bytes and is evicted like any
    # other: its file goes (it had stayed on disk, out of the index, until the next open)
    item = 1000 + HEADER_BYTES
    backend = await _open(tmp_path / "tier", max_bytes=2 * item)
    offered: list[ChunkKey] = []
    backend.add_eviction_listener(lambda key, view: offered.append(key))
    k = _keys(3)
    await backend.put([(k[0], os.urandom(1000)), (k[1], os.urandom(1000))])
    backend.path_of(k[0]).write_bytes(newer_format(backend.path_of(k[0]).read_bytes()))
    await backend.put([(k[2], os.urandom(1000))])
    assert offered == [] and not backend.path_of(k[0]).exists()
    assert backend.stats()["newer_format"] == 1 and backend.stats()["corrupt"] == 0
    await backend.aclose()


@pytest.mark.asyncio
async def test_a_failing_eviction_listener_does_not_fail_the_put(tmp_path: Path, caplog) -> None:
    backend = await _open(tmp_path / "tier", max_bytes=2 * (100 + HEADER_BYTES))

    def broken(key: ChunkKey, view: memoryview) -> None:
        raise RuntimeError("listener bug")

    backend.add_eviction_listener(broken)
    k = _keys(3)
    for key in k:
        await backend.put([(key, b"z" * 100)])
    assert await backend.contains(k) == [False, True, True]
    assert "listener bug" in caplog.text
    await backend.aclose()


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_root_that_cannot_be_a_directory_is_a_config_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-regular-file"
    blocker.write_bytes(b"")
    for root in (blocker / "tier", blocker):  # under a file (even root cannot), or a file itself
        with pytest.raises(ConfigError, match="not a writable directory") as info:
            await _open(root)
        assert str(root) in str(info.value)


@pytest.mark.asyncio
async def test_the_registry_builds_the_tier_and_reports_config_errors(tmp_path: Path) -> None:
    registry = BackendRegistry.discover()
    assert registry.spec("disk").install_hint == "pip install lmtier"
    backend = await registry.create("disk", {"root": str(tmp_path / "tier"), "max_bytes": "1MiB"})
    assert isinstance(backend, DiskBackend) and backend.max_bytes == 1 << 20
    assert backend.capabilities.persistent and not backend.capabilities.shared
    await backend.aclose()
    with pytest.raises(ConfigError, match="allowed keys"):
        await registry.create("disk", {"root": str(tmp_path), "bogus": 1})
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(ConfigError, match=str(tmp_path / "f" / "tier")):
        await registry.create("disk", {"root": str(tmp_path / "f" / "tier")})


def test_root_expands_the_home_directory() -> None:
    assert DiskConfig(root="~/lmtier-cache").root == Path.home() / "lmtier-cache"


def test_os_errors_map_to_the_lmtier_error_tree() -> None:
    assert isinstance(map_os_error(OSError(errno.ENOSPC, "full"), op="write"), CapacityError)
    assert isinstance(map_os_error(OSError(errno.EDQUOT, "quota"), op="write"), CapacityError)
    assert isinstance(map_os_error(OSError(errno.EIO, "io"), op="read"), BackendUnavailableError)
    read_only = map_os_error(OSError(errno.EROFS, "ro"), op="write")  # writes fail, reads go on: no breaker
    assert type(read_only) is BackendError and "read-only" in str(read_only)
    other = map_os_error(OSError(errno.ENAMETOOLONG, "long"), op="write", path="/x")
    assert type(other) is BackendError and "/x" in str(other)


# -- faults --------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_put_refused_for_size_writes_nothing_and_loses_nothing(tmp_path: Path) -> None:
    backend = await _open(tmp_path / "tier", max_bytes=4096)
    old, small, huge = _keys(3)
    await backend.put([(old, b"o" * 3000)])
    with pytest.raises(CapacityError):
        await backend.put([(small, b"s" * 10), (huge, b"h" * 4096)])
    assert await backend.contains([old, small, huge]) == [True, False, False]
    assert [bytes(v) for v in await backend.get([old])] == [b"o" * 3000]
    assert _tmp_files(tmp_path / "tier") == []
    await backend.aclose()


_FILE_SIZE_LIMIT_SCRIPT = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from lmtier.errors import CapacityError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.kit import TEMP_MARK, FileLayout
from lmtier_backends.disk.backend import open_disk_backend
from lmtier_backends.disk.config import DiskConfig

async def main():
    ns = make_namespace(test="efbig")
    key, other = ChunkKey(ns, b"k" * 16), ChunkKey(ns, b"o" * 16)
    backend = await open_disk_backend(DiskConfig(root=sys.argv[1]))
    await backend.put([(key, b"old" * 1000), (other, b"other")])
    # the kernel refuses writes past 64 KiB from now on (EFBIG): a real filesystem fault
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
    try:
        await backend.put([(key, b"new" * 100_000)])
        raised = None
    except CapacityError as exc:
        raised = type(exc).__name__
    got = [bytes(v) if v is not None else None for v in await backend.get([key, other])]
    tmp = [str(p) for p in Path(sys.argv[1]).rglob("*.tmp-*")]
    await backend.aclose()
    print(json.dumps({"raised": raised, "kept_old": got[0] == b"old" * 1000,
                      "kept_other": got[1] == b"other", "tmp": tmp}))

asyncio.run(main())
"""


def test_a_write_the_kernel_refuses_is_a_capacity_error_and_keeps_the_old_value(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FILE_SIZE_LIMIT_SCRIPT), str(tmp_path / "tier")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"raised": "CapacityError", "kept_old": True, "kept_other": True, "tmp": []}


@pytest.mark.asyncio
async def test_an_io_error_is_a_miss_for_that_key_and_keeps_the_file(tmp_path: Path, monkeypatch, caplog) -> None:
    backend = await _open(tmp_path / "tier")
    (key,) = _keys(1)
    await backend.put([(key, b"v" * 100)])

    def failing(*args: object) -> None:  # a fake only to inject the fault
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_files, "_read_payload", failing)
    assert await backend.get([key]) == [None]
    assert await backend.get_into([key], [bytearray(100)]) == [False]
    assert "disk tier: a miss for" in caplog.text and "EIO" in caplog.text
    monkeypatch.setattr(_files, "_write_all", failing)
    with pytest.raises(BackendUnavailableError):
        await backend.put([(key, b"w" * 100)])
    monkeypatch.undo()
    assert backend.path_of(key).exists()
    assert backend.stats()["corrupt"] == 0 and backend.stats()["read_errors"] == 2
    assert [bytes(v) for v in await backend.get([key])] == [b"v" * 100]
    assert _tmp_files(tmp_path / "tier") == []
    await backend.aclose()


@pytest.mark.asyncio
async def test_a_cancelled_get_into_returns_only_after_its_reads_stopped(tmp_path: Path, monkeypatch) -> None:
    backend = await _open(tmp_path / "tier", max_concurrency=1)
    keys = _keys(2)
    await backend.put([(k, b"p" * 100) for k in keys])
    started, release = threading.Event(), threading.Event()
    real = _files.read_file_into

    def slow_read(path: str, key: ChunkKey, out: memoryview, stamp: int) -> bool:
        started.set()
        release.wait(timeout=30)
        return real(path, key, out, stamp)

    monkeypatch.setattr(_files, "read_file_into", slow_read)
    outs = [bytearray(100), bytearray(100)]
    task = asyncio.create_task(backend.get_into(keys, outs))
    assert await asyncio.to_thread(started.wait, 10), "the read never started"
    task.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done(), "get_into returned while a thread still writes into the caller's buffer"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bytes(outs[0]) == b"p" * 100  # the running read finished
    assert bytes(outs[1]) == bytes(100)  # the queued one never started
    await backend.aclose()


@pytest.mark.asyncio
async def test_file_operations_run_at_most_max_concurrency_at_once_and_use_all_of_it(
    tmp_path: Path, monkeypatch
) -> None:
    backend = await _open(tmp_path / "tier", max_concurrency=2)
    keys = _keys(8)
    data = {k: os.urandom(1000) for k in keys}
    await backend.put(list(data.items()))
    real = _files.read_file
    lock = threading.Lock()
    inside, most, threads = 0, 0, set()
    both_busy = threading.Barrier(2, timeout=30)  # broken (an error) unless two reads overlap

    def counted_read(*args, **kwargs):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
            first_on_this_thread = threading.get_ident() not in threads
            threads.add(threading.get_ident())
        try:
            if first_on_this_thread:
                both_busy.wait()
            return real(*args, **kwargs)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(_files, "read_file", counted_read)
    got = await backend.get(keys)
    assert [bytes(v) for v in got] == list(data.values())
    assert most == 2 and len(threads) == 2
    await backend.aclose()


@pytest.mark.asyncio
async def test_closed_backends_refuse_with_an_lmtier_error(tmp_path: Path) -> None:
    backend = await _open(tmp_path / "tier")
    await backend.aclose()
    with pytest.raises(BackendUnavailableError, match="closed"):
        await backend.get(_keys(1))


# -- under the manager ---------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_under_the_manager_evicted_chunks_are_demoted_and_survive_a_restart(tmp_path: Path) -> None:
    from lmtier.manager import StorageManager

    item = 1000 + HEADER_BYTES
    cfg = {"chunk_tokens": 256, "tiers": [
        {"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path / "nvme"), "max_bytes": 2 * item}},
        {"name": "cold", "backend": "disk", "options": {"root": str(tmp_path / "cold")}},
    ]}
    keys = _keys(3)
    data = [os.urandom(1000) for _ in keys]
    mgr = await StorageManager.from_config(cfg)
    await mgr.put(list(zip(keys, data, strict=True)))
    await mgr.flush()
    assert await mgr.tier("nvme").backend.contains(keys) == [False, True, True]
    assert await mgr.tier("cold").backend.contains(keys[:1]) == [True]
    await mgr.aclose()

    mgr = await StorageManager.from_config(cfg)
    assert await mgr.lookup(keys) == 3
    assert [bytes(memoryview(v).cast("B")) for v in await mgr.get(keys)] == data
    await mgr.aclose()
