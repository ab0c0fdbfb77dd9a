"""The ``posix`` flavour of the nixl tier: files, index, eviction, corruption, staging, errors."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lmtier.errors import CapacityError, ConfigError
from lmtier.framing import HEADER_BYTES, encode_header
from lmtier.keys import ChunkKey, make_namespace
from lmtier.kit import FileLayout
from lmtier.memory import host_tensor_of
from lmtier.registry import BackendRegistry
from lmtier_backends.nixl import _nixl
from lmtier_backends.nixl.backend import NixlBackend, open_nixl_backend
from lmtier_backends.nixl.config import NixlConfig
from tests.backends.nixl._helpers import needs_nixl, posix_options
from tests.support.hashing import assert_the_disk_tiers_hash_travels_to

pytestmark = needs_nixl

MiB = 1 << 20


def _path(tmp_path: Path, key: ChunkKey) -> Path:
    """Where the tier under ``tmp_path/tier`` keeps ``key``: the disk tier's layout."""
    return Path(FileLayout(tmp_path / "tier").path_of(key))


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="nixl-posix", run=os.urandom(4).hex())
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


def _config(root: Path, **overrides: Any) -> NixlConfig:
    posix = posix_options(root, **overrides.pop("posix", {}))
    return NixlConfig(plugin="posix", posix=posix, **{"staging_slab_bytes": 4 * MiB, **overrides})


@pytest_asyncio.fixture
async def opener(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Opens tiers on ``tmp_path/tier`` (options overridable) and closes them all afterwards."""
    opened: list[NixlBackend] = []

    async def open_tier(**overrides: Any) -> NixlBackend:
        backend = await open_nixl_backend(_config(tmp_path / "tier", **overrides))
        opened.append(backend)
        return backend

    try:
        yield open_tier
    finally:
        for backend in opened:
            await backend.aclose()


@pytest.mark.asyncio
async def test_each_chunk_is_one_file_under_its_namespace_starting_with_the_codec_header(
    tmp_path: Path, opener: Callable[..., Any]
) -> None:
    tier = await opener()
    (key,) = _keys(1)
    await tier.put([(key, b"payload" * 100)])
    path = _path(tmp_path, key)
    data = path.read_bytes()
    assert data[:HEADER_BYTES] == encode_header(key, b"payload" * 100)
    assert data[HEADER_BYTES:] == b"payload" * 100
    assert [p.name for p in path.parent.iterdir()] == [str(key)]  # no temp file left behind


@pytest.mark.asyncio
async def test_the_index_is_rebuilt_at_open_and_a_crashed_writers_temp_files_are_deleted(
    tmp_path: Path, opener: Callable[..., Any]
) -> None:
    tier = await opener()
    keys = _keys(3)
    await tier.put([(k, os.urandom(1000 * (i + 1))) for i, k in enumerate(keys)])
    await tier.aclose()
    stale = Path(FileLayout.temp_path(os.fspath(_path(tmp_path, keys[0]))))
    stale.write_bytes(b"half a write")
    foreign = _path(tmp_path, keys[0]).with_name("notes.tmp-by-a-user.txt")  # not a name the tier makes
    foreign.write_bytes(b"keep me")

    reopened = await opener()
    assert reopened.stats()["objects"] == 3
    assert reopened.stats()["bytes"] == sum(HEADER_BYTES + 1000 * (i + 1) for i in range(3))
    assert not stale.exists()
    assert foreign.read_bytes() == b"keep me"
    assert await reopened.contains(keys) == [True, True, True]


@pytest.mark.asyncio
async def test_max_bytes_deletes_the_oldest_files(opener: Callable[..., Any]) -> None:
    item = 100_000
    tier = await opener(posix={"max_bytes": 3 * (item + HEADER_BYTES)})
    assert tier.capabilities.evicts
    keys = _keys(5)
    for k in keys:
        await tier.put([(k, os.urandom(item))])
    assert await tier.contains(keys) == [False, False, True, True, True]
    assert tier.stats()["evictions"] == 2
    assert tier.stats()["bytes"] <= 3 * (item + HEADER_BYTES)


@pytest.mark.asyncio
async def test_contains_reads_the_files_not_the_index(
    tmp_path: Path, opener: Callable[..., Any]
) -> None:
    first, second = await opener(), await opener()
    written_elsewhere, removed_behind = _keys(2)
    await second.put([(written_elsewhere, b"from the other handle"), (removed_behind, b"x")])
    assert await first.contains([written_elsewhere]) == [True]
    assert bytes((await first.get([written_elsewhere]))[0]) == b"from the other handle"
    os.unlink(_path(tmp_path, removed_behind))
    assert await second.contains([removed_behind]) == [False]


@pytest.mark.asyncio
async def test_staging_is_registered_once_and_reused_across_calls(opener: Callable[..., Any]) -> None:
    tier = await opener()
    for key in _keys(20):
        await tier.put([(key, os.urandom(MiB))])
        got = await tier.get([key])
        assert got[0] is not None
        del got
    assert tier.stats()["staging_slabs"] == 1
    assert tier.stats()["staging_bytes"] == 4 * MiB


@pytest.mark.asyncio
async def test_staging_grows_in_slab_steps_and_refuses_past_its_bound(opener: Callable[..., Any]) -> None:
    tier = await opener(staging_slab_bytes=MiB, max_staging_bytes=4 * MiB)
    small, big, too_big = _keys(3)
    await tier.put([(small, b"s" * 1000), (big, os.urandom(2 * MiB + 1)), (too_big, os.urandom(3 * MiB))])
    assert (tier.stats()["staging_slabs"], tier.stats()["staging_bytes"]) == (1, MiB)  # payloads written in place
    (held,) = await tier.get([big])  # needs a slab of 3 slab steps, held by the view
    assert (tier.stats()["staging_slabs"], tier.stats()["staging_bytes"]) == (2, 4 * MiB)
    with pytest.raises(CapacityError, match="max_staging_bytes"):
        await tier.get([too_big])
    with pytest.raises(CapacityError, match="max_item_bytes"):
        await tier.put([(too_big, os.urandom(4 * MiB))])
    assert held is not None and tier.stats()["staging_outstanding"] == 1


@pytest.mark.asyncio
async def test_put_has_nixl_write_payloads_from_the_callers_buffers_in_place(opener: Callable[..., Any]) -> None:
    tier = await opener(staging_slab_bytes=MiB, max_staging_bytes=2 * MiB)
    keys = _keys(4)
    values = [os.urandom(MiB) for _ in keys]  # 4 MiB of payloads through 2 MiB of staging
    await tier.put(list(zip(keys, values, strict=True)))
    assert tier.stats()["staging_slabs"] == 1
    outs = [bytearray(MiB) for _ in keys]
    assert await tier.get_into(keys, outs) == [True] * 4 and [bytes(o) for o in outs] == values


@pytest.mark.asyncio
async def test_a_returned_value_is_a_zero_copy_view_that_holds_staging_until_dropped(
    opener: Callable[..., Any]
) -> None:
    tier = await opener()
    (key,) = _keys(1)
    await tier.put([(key, b"v" * 10_000)])
    (view,) = await tier.get([key])
    assert tier.stats()["staging_outstanding"] == 1
    assert host_tensor_of(view) is None  # never mistaken for the whole staging buffer (header included)
    assert memoryview(view).readonly and bytes(view) == b"v" * 10_000
    del view
    gc.collect()
    assert tier.stats()["staging_outstanding"] == 0


async def _cancel_once_running(tier: NixlBackend, task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` once its worker holds staging memory (it is mid-transfer)."""
    deadline = asyncio.get_running_loop().time() + 30
    while tier.stats()["staging_outstanding"] == 0 and not task.done():
        assert asyncio.get_running_loop().time() < deadline, "the call never started"
        await asyncio.sleep(0.0005)  # poll interval, not synchronisation
    assert not task.done(), "the call finished before it could be cancelled mid-transfer"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
async def test_calls_cancelled_mid_transfer_leave_no_buffer_or_handle_behind(opener: Callable[..., Any]) -> None:
    tier = await opener(max_staging_bytes=256 * MiB)
    keys = _keys(32)
    value = os.urandom(2 * MiB)
    await _cancel_once_running(tier, asyncio.create_task(tier.put([(k, value) for k in keys])))
    deadline = asyncio.get_running_loop().time() + 30
    while tier.stats()["staging_outstanding"]:  # the worker finishes the cancelled put by itself
        assert asyncio.get_running_loop().time() < deadline, "a cancelled put never released its buffers"
        await asyncio.sleep(0.001)  # poll interval, not synchronisation
    await tier.put([(k, value) for k in keys[:16]])
    await _cancel_once_running(tier, asyncio.create_task(tier.get(keys)))
    staging = tier._staging
    await tier.aclose()  # waits for the worker still finishing the cancelled get
    gc.collect()
    assert staging is not None and staging.outstanding() == 0 and staging.quarantined_bytes == 0


@pytest.mark.asyncio
async def test_a_cancelled_put_never_reads_the_callers_buffers_after_it_unwinds(opener: Callable[..., Any]) -> None:
    tier = await opener(max_staging_bytes=256 * MiB)
    keys = _keys(48)  # a long enough call to be caught mid-transfer on a busy machine
    originals = [os.urandom(2 * MiB) for _ in keys]  # big enough to be written in place
    buffers = [bytearray(v) for v in originals]
    await _cancel_once_running(tier, asyncio.create_task(tier.put(list(zip(keys, buffers, strict=True)))))
    for b in buffers:  # the caller reuses its buffers as soon as the call has unwound
        b[:] = bytes(len(b))
    deadline = asyncio.get_running_loop().time() + 30
    while tier._workers.running:  # the worker of the cancelled call, if any, finishes by itself
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)  # poll interval, not synchronisation
    got = await tier.get(keys)
    assert all(g is None or bytes(g) == v for g, v in zip(got, originals, strict=True))
    assert tier.stats()["corrupt"] == 0  # no file holds bytes written after their checksum was taken


@pytest.mark.asyncio
async def test_a_root_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"posix\.root"):
        await open_nixl_backend(_config(blocker / "tier"))


def test_a_plugin_this_host_cannot_load_is_a_config_error_naming_the_usable_ones() -> None:
    api = _nixl.load_api()
    with pytest.raises(ConfigError, match=r"'GDS' is not available on this host; usable plugins here: .*POSIX"):
        _nixl.create_agent(api, f"probe-{os.urandom(4).hex()}", "GDS", {})


@pytest.mark.asyncio
async def test_the_registry_builds_the_tier_from_yaml_style_options(tmp_path: Path) -> None:
    registry = BackendRegistry.discover()
    backend = await registry.create("nixl", {"plugin": "posix", "posix": {"root": str(tmp_path / "t")},
                                             "staging_slab_bytes": "4MiB"})
    try:
        (key,) = _keys(1)
        await backend.put([(key, b"via the registry")])
        assert bytes((await backend.get([key]))[0]) == b"via the registry"  # type: ignore[arg-type]
    finally:
        await backend.aclose()


@pytest.mark.asyncio
async def test_get_into_has_nixl_read_payloads_straight_into_the_callers_buffers(
    opener: Callable[..., Any]
) -> None:
    tier = await opener()
    keys = _keys(3)
    values = [os.urandom(MiB + i) for i in range(3)]
    await tier.put(list(zip(keys, values, strict=True)))
    outs = [bytearray(len(v)) for v in values]
    assert await tier.get_into(keys, outs) == [True, True, True]
    assert [bytes(o) for o in outs] == values
    assert tier.stats()["get_into_direct"] == 3
    assert tier.stats()["staging_outstanding"] == 0


@pytest.mark.asyncio
async def test_get_into_a_buffer_of_another_size_is_false_and_keeps_the_file(opener: Callable[..., Any]) -> None:
    tier = await opener()
    (key,) = _keys(1)
    await tier.put([(key, b"x" * 1000)])
    assert await tier.get_into([key], [bytearray(999)]) == [False]
    assert await tier.contains([key]) == [True] and tier.stats()["corrupt"] == 0


@pytest.mark.asyncio
async def test_get_into_the_same_buffer_twice_goes_through_staging(opener: Callable[..., Any]) -> None:
    tier = await opener()
    (key,) = _keys(1)
    await tier.put([(key, b"twice" * 100)])
    out = bytearray(500)
    assert await tier.get_into([key, key], [out, out]) == [True, True]
    assert bytes(out) == b"twice" * 100
    assert tier.stats()["get_into_direct"] == 0 and tier.stats()["corrupt"] == 0


@pytest.mark.asyncio
async def test_a_cancelled_get_into_never_writes_the_callers_buffers_after_it_unwinds(
    opener: Callable[..., Any]
) -> None:
    tier = await opener()
    keys = _keys(48)  # a long enough call to be caught mid-transfer on a busy machine
    await tier.put([(k, os.urandom(2 * MiB)) for k in keys])
    outs = [bytearray(2 * MiB) for _ in keys]
    task = asyncio.create_task(tier.get_into(keys, outs))
    await _cancel_once_running(tier, task)
    snapshot = [bytes(o) for o in outs]
    deadline = asyncio.get_running_loop().time() + 30
    while tier._workers.running:  # the worker of the cancelled call, if any, finishes by itself
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)  # poll interval, not synchronisation
    assert [bytes(o) for o in outs] == snapshot


@pytest.fixture
def rounds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch of transfers the posix store hands NIXL, in order."""
    from lmtier_backends.nixl import _xfer

    seen: list[int] = []
    real = _xfer.transfer_each

    def spy(agent: Any, op: str, pairs: Any, **kw: Any) -> Any:
        seen.append(len(pairs))
        return real(agent, op, pairs, **kw)

    monkeypatch.setattr(_xfer, "transfer_each", spy)
    return seen


@pytest.mark.asyncio
async def test_big_batches_are_split_into_rounds_of_batch_descriptors(
    opener: Callable[..., Any], rounds: list[int]
) -> None:
    tier = await opener(batch_descriptors=3, io_threads=1)  # one worker: the batch is not split among threads
    keys = _keys(10)
    values = [os.urandom(100 + i) for i in range(10)]
    await tier.put(list(zip(keys, values, strict=True)))
    assert [bytes(v) for v in await tier.get(keys)] == values  # type: ignore[arg-type]
    outs = [bytearray(len(v)) for v in values]
    assert await tier.get_into(keys, outs) == [True] * 10 and [bytes(o) for o in outs] == values
    assert rounds == [3, 3, 3, 1] * 2 + [6, 6, 6, 2]  # get_into: a header and a payload request per item


@pytest.mark.asyncio
async def test_a_batch_is_split_into_one_piece_per_io_thread(
    opener: Callable[..., Any], rounds: list[int]
) -> None:
    tier = await opener(io_threads=3)
    keys = _keys(7)
    values = [os.urandom(100 + i) for i in range(7)]
    await tier.put(list(zip(keys, values, strict=True)))
    assert sorted(rounds) == [2, 2, 3]  # 7 items over 3 workers, each piece its own round
    rounds.clear()
    assert [bytes(v) for v in await tier.get(keys)] == values  # type: ignore[arg-type]
    assert sorted(rounds) == [2, 2, 3]


def _io_uring_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]"
        except OSError:  # closed meanwhile
            continue
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc to see io_uring instances")
@pytest.mark.asyncio
async def test_the_posix_plugin_runs_on_io_uring_unless_params_choose_a_queue(
    opener: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    before = _io_uring_fds()
    await opener(posix={"params": {"use_aio": "true"}})
    assert _io_uring_fds() == before
    caplog.set_level(logging.INFO, logger="lmtier_backends.nixl.backend")
    tier = await opener()
    fell_back = any("io_uring unavailable" in r.getMessage() for r in caplog.records)
    assert _io_uring_fds() == before + (0 if fell_back else 1)
    (key,) = _keys(1)
    await tier.put([(key, b"u" * MiB)])
    assert bytes((await tier.get([key]))[0]) == b"u" * MiB  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_where_io_uring_cannot_start_the_posix_plugin_uses_nixls_default_queue(
    opener: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = _nixl.create_agent

    def no_uring(api: Any, name: str, plugin: str, params: dict[str, str], **kw: Any) -> Any:
        if params.get("use_uring") == "true":  # fault injection: a host where io_uring is blocked
            raise ConfigError("NIXL refused to start its POSIX plugin with these options: io_uring blocked")
        return real(api, name, plugin, params, **kw)

    monkeypatch.setattr(_nixl, "create_agent", no_uring)
    caplog.set_level(logging.INFO, logger="lmtier_backends.nixl.backend")
    tier = await opener()
    assert any("io_uring unavailable" in r.getMessage() for r in caplog.records)
    (key,) = _keys(1)
    await tier.put([(key, b"a" * MiB)])
    assert bytes((await tier.get([key]))[0]) == b"a" * MiB  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_value_the_disk_tier_hashed_reaches_nixl_without_another_hash(tmp_path: Path) -> None:
    await assert_the_disk_tiers_hash_travels_to(
        {"name": "nixl", "backend": "nixl", "write": "through",
         "options": {"plugin": "posix", "posix": posix_options(tmp_path / "nixl"), "staging_slab_bytes": 16 << 20}},
        tmp_path)
