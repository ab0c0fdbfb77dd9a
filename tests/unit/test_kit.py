"""lmtier.kit, piece by piece: the worker pool's ordering, bounds and cancellation; values that
carry their checksum; error mapping; argument checks; the shared file layout and its scan."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from lmtier.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    InvalidArgumentError,
)
from lmtier.framing import HEADER_BYTES, checksum, decode, encode_header
from lmtier.keys import ChunkKey, make_namespace
from lmtier.kit import (
    MARKER,
    OS_ERROR_RULES,
    CancelToken,
    ErrorMap,
    FileLayout,
    ForeignRootError,
    KeyFaults,
    Payload,
    RootGoneError,
    Rule,
    WorkerPool,
    check_items,
    check_keys,
    claim_root,
    into_views,
    object_name,
    put_items,
    scan_files,
)
from lmtier.kit import values as kit_values


def _keys(n: int) -> list[ChunkKey]:
    ns = make_namespace(test="kit")
    return [ChunkKey(ns, os.urandom(16)) for _ in range(n)]


# -- WorkerPool ------------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_results_come_back_in_order_one_outcome_per_call_and_errors_stay_per_call() -> None:
    pool = WorkerPool(3, "test")
    try:
        def call(i: int):
            def run(token: CancelToken) -> int:
                if i == 4:
                    raise ValueError("four")
                return i * i
            return run

        outcomes = await pool.run([call(i) for i in range(9)])
        assert [o.value for o in outcomes if o.ok] == [i * i for i in range(9) if i != 4]
        assert not outcomes[4].ok and isinstance(outcomes[4].error, ValueError)
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_at_most_max_workers_calls_run_at_once_and_all_of_them_are_used() -> None:
    pool = WorkerPool(3, "test")
    barrier = threading.Barrier(3, timeout=30)  # passes only if 3 calls run together
    running, peak, lock = 0, 0, threading.Lock()

    def call(token: CancelToken) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            barrier.wait()
        finally:
            with lock:
                running -= 1

    try:
        outcomes = await pool.run([call] * 9)
        assert all(o.ok for o in outcomes) and peak == 3
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_a_cancelled_batch_waits_for_calls_touching_caller_memory_and_aborts_the_others() -> None:
    pool = WorkerPool(2, "test")
    entered, release = threading.Event(), threading.Event()
    aborted = threading.Event()
    out = bytearray(4)

    def writer(token: CancelToken) -> None:  # fills the caller's buffer once released
        with token.touching_caller_memory():
            entered.set()
            release.wait(30)
            out[:] = b"late"

    def blocked(token: CancelToken) -> None:  # e.g. a read from a frozen server
        with token.on_cancel(aborted.set):
            aborted.wait(30)

    task = asyncio.ensure_future(pool.run([writer, blocked]))
    await asyncio.to_thread(entered.wait, 30)
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the batch, which now waits for `writer`
    assert aborted.is_set() and not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert out == b"late"  # written before the call unwound, never after
    await pool.aclose()


@pytest.mark.asyncio
async def test_a_call_cancelled_before_touching_caller_memory_is_refused_entry() -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Exception, match="cancelled"), token.touching_caller_memory():
        pytest.fail("entered after the cancellation")


@pytest.mark.asyncio
async def test_run_settled_waits_for_every_running_call_and_reports_the_cancellation() -> None:
    pool = WorkerPool(1, "test")
    started, release = threading.Event(), threading.Event()

    def slow(token: CancelToken) -> str:
        started.set()
        release.wait(30)
        return "done"

    task = asyncio.ensure_future(pool.run_settled([slow, lambda t: "never"]))
    await asyncio.to_thread(started.wait, 30)
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done()  # waits for `slow` despite the cancellation
    release.set()
    outcomes, cancelled = await task
    assert cancelled and outcomes[0].value == "done"
    assert not outcomes[1].ok and isinstance(outcomes[1].error, asyncio.CancelledError)
    await pool.aclose()


@pytest.mark.asyncio
async def test_a_closed_pool_refuses_with_an_unavailable_error_and_aclose_runs_last_once() -> None:
    pool = WorkerPool(1, "test")
    torn_down: list[str] = []
    await pool.aclose(last=lambda: torn_down.append("x"))
    await pool.aclose(last=lambda: torn_down.append("x"))
    assert torn_down == ["x"]
    with pytest.raises(BackendUnavailableError, match="closed"):
        await pool.run([lambda t: None])


# -- values that carry their checksum ------------------------------------------------------------------
def test_a_payload_computes_its_checksum_once_and_shares_it_with_its_copies(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(kit_values, "checksum", lambda data: calls.append(1) or checksum(data))
    data = os.urandom(10_000)
    original = Payload.of(bytearray(data))
    copy = Payload.of(bytes(data), like=original)
    assert copy.checksum() == original.checksum() == checksum(data) and len(calls) == 1
    assert Payload.copy_of(original).known_checksum == checksum(data)
    assert original[10:20].known_checksum is None  # a slice holds other bytes
    assert Payload.of(data, checksum=123).known_checksum == 123


def test_a_pass_run_ahead_is_settled_once_between_tiers_sharing_a_value() -> None:
    key = ChunkKey(make_namespace(test="settle"), b"\x05" * 16)
    data = os.urandom(5000)
    finished: list[str] = []

    def finish(who: str) -> int:
        finished.append(who)
        return checksum(data)

    (alone,) = put_items([(key, Payload.of(bytearray(data)))], tier="t")
    assert alone.unhashed and alone.settle_checksum(lambda: finish("alone")) == checksum(data)
    assert finished == ["alone"] and alone.known_checksum == checksum(data) and not alone.unhashed
    # another tier of the same value has the checksum: this tier's own pass is not finished
    (known,) = put_items([(key, Payload.of(bytearray(data), like=alone.value))], tier="t")  # type: ignore[arg-type]
    assert known.settle_checksum(lambda: finish("known")) == checksum(data) and finished == ["alone"]
    # another tier is computing it right now: wait for its value instead of completing a second pass
    shared = Payload.of(bytearray(data))
    (busy,) = put_items([(key, shared)], tier="t")
    shared._memo.lock.acquire()  # what Payload.checksum() holds while it hashes
    assert not busy.unhashed
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(busy.settle_checksum(lambda: finish("busy"))))
    waiter.start()
    shared._memo.value = checksum(data)  # the other tier's pass ends
    shared._memo.lock.release()
    waiter.join(timeout=10)
    assert got == [checksum(data)] and finished == ["alone"]


def test_a_store_item_makes_the_header_from_the_carried_checksum() -> None:
    (key,) = _keys(1)
    data = os.urandom(5000)
    (item,) = put_items([(key, Payload.of(data, checksum=checksum(data)))], tier="t")
    assert item.known_checksum == checksum(data)
    assert item.header() == encode_header(key, data)
    assert bytes(decode(key, item.header() + data)) == data


def test_put_items_keeps_the_last_value_of_a_key_and_refuses_oversized_values() -> None:
    a, b = _keys(2)
    items = put_items([(a, b"1"), (b, b"2"), (a, b"3")], tier="t")
    assert [(it.key, bytes(it.view)) for it in items] == [(b, b"2"), (a, b"3")]
    with pytest.raises(CapacityError, match=r"t: .* is 11 bytes, more than the tier's max_item_bytes of 10"):
        put_items([(a, b"x" * 11)], tier="t", max_item_bytes=10)
    with pytest.raises(InvalidArgumentError, match=r"t: items\[1\]\[1\]: values must be host buffers .* got str"):
        put_items([(b, b"ok"), (a, "text")], tier="t")


# -- argument checks ------------------------------------------------------------------------------------
def test_argument_checks_name_the_argument_and_what_was_expected() -> None:
    (key,) = _keys(1)
    with pytest.raises(InvalidArgumentError, match=r"keys\[1\] must be an lmtier.ChunkKey .* got str"):
        check_keys([key, "k"])
    with pytest.raises(InvalidArgumentError, match=r"keys must be a sequence of lmtier\.ChunkKey, got str"):
        check_keys("abc")
    with pytest.raises(InvalidArgumentError, match=r"items\[0\]\[1\]: values must be host buffers"):
        check_items([(key, 12)])
    with pytest.raises(InvalidArgumentError, match="one buffer per key: got 1 keys and 2 buffers"):
        into_views([key], [bytearray(1), bytearray(1)])
    with pytest.raises(InvalidArgumentError, match="writable"):
        into_views([key], [b"ro"])
    assert into_views([key], [np.zeros(3, dtype=np.uint16)])[0].nbytes == 6


# -- errors ---------------------------------------------------------------------------------------------
def test_the_os_error_rules_map_by_errno_with_advice() -> None:
    errors = ErrorMap("t", OS_ERROR_RULES)
    assert isinstance(errors(OSError(errno.ENOSPC, "full"), op="put"), CapacityError)
    assert isinstance(errors(OSError(errno.EIO, "io"), op="get"), BackendUnavailableError)
    assert isinstance(errors(OSError(errno.ETIMEDOUT, "slow"), op="get"), BackendTimeoutError)
    read_only = errors(OSError(errno.EROFS, "ro"), op="put", where="/x")
    assert type(read_only) is BackendError and "t: put /x failed" in str(read_only) and "read-only" in str(read_only)
    assert type(errors(ValueError("odd"), op="get")) is BackendError
    gone = errors(RootGoneError(errno.ENOENT, "the root is gone", "/r"), op="put")  # an ENOENT of the tier
    assert isinstance(gone, BackendUnavailableError) and "unmounted" in str(gone)
    assert type(errors(FileNotFoundError(errno.ENOENT, "one file"), op="get")) is BackendError


def test_the_first_matching_rule_wins_and_lmtier_errors_pass_through() -> None:
    errors = ErrorMap("t", [Rule(KeyError, ConfigError, "fix the key"), Rule(LookupError, CapacityError)])
    mapped = errors(KeyError("k"), op="open")
    assert isinstance(mapped, ConfigError) and str(mapped).endswith("; fix the key")
    assert isinstance(mapped.__cause__, KeyError)
    assert isinstance(errors(IndexError(), op="get"), CapacityError)
    original = BackendTimeoutError("already mapped")
    assert errors(original, op="get") is original


# -- names ------------------------------------------------------------------------------------------------
def test_key_faults_are_misses_counted_and_logged_while_the_other_keys_keep_their_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ns = make_namespace(test="kit-faults")
    keys = [ChunkKey(ns, bytes([i]) * 16) for i in range(4)]
    faults = KeyFaults("test tier", ErrorMap("test tier", OS_ERROR_RULES))
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    with caplog.at_level("WARNING", logger="lmtier.kit"):
        got = faults.settle("get", keys, [b"a", refused, None, TimeoutError("slow")], None)
    assert got == [b"a", None, None, None]
    assert faults.stats() == {"key_faults": 2}
    assert "test tier: get: 2 of 4 keys faulted and are misses (first: " + str(keys[1]) in caplog.text
    assert faults.settle("contains", keys[:2], [True, False], False) == [True, False]  # nothing to settle
    assert faults.stats() == {"key_faults": 2}


def test_a_batch_in_which_no_key_answered_raises_the_first_fault_mapped() -> None:
    ns = make_namespace(test="kit-faults")
    keys = [ChunkKey(ns, bytes([i]) * 16) for i in range(2)]
    faults = KeyFaults("test tier", ErrorMap("test tier", OS_ERROR_RULES))
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(BackendUnavailableError, match="test tier: get_into failed: Connection refused") as info:
        faults.settle("get_into", keys, [refused, OSError(errno.EIO, "I/O error")], False)
    assert info.value.__cause__ is refused
    already = BackendTimeoutError("mapped by the backend")
    with pytest.raises(BackendTimeoutError) as again:  # an lmtier error is raised as it is
        faults.settle("get", keys[:1], [already], None)
    assert again.value is already and again.value.__cause__ is None
    assert faults.stats() == {"key_faults": 0}


def test_files_and_objects_are_named_from_str_key(tmp_path: Path) -> None:
    (key,) = _keys(1)
    d = key.digest.hex()
    assert FileLayout(tmp_path).path_of(key) == str(tmp_path / key.namespace / d[:2] / d[2:4] / str(key))
    assert FileLayout(tmp_path, 0).path_of(key) == str(tmp_path / key.namespace / str(key))
    temp = FileLayout.temp_path(FileLayout(tmp_path).path_of(key))
    assert FileLayout.is_temp_name(os.path.basename(temp)) and not FileLayout.is_temp_name(f"{key}.tmp-x")
    assert object_name("lmtier/", key) == object_name("/lmtier", key) == f"lmtier/{key}"
    assert object_name("", key) == str(key)
    with pytest.raises(InvalidArgumentError, match="fan_out"):
        FileLayout(tmp_path, 5)


def test_the_file_tiers_configs_take_fan_out_from_the_kits_one_declaration(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from lmtier.kit import FileLayoutOptions
    from lmtier_backends.disk.config import DiskConfig
    from lmtier_backends.nixl.config import PosixOptions

    for config in (DiskConfig, PosixOptions):
        assert issubclass(config, FileLayoutOptions)
        assert config(root=tmp_path).fan_out == FileLayout(tmp_path).fan_out == 2
        assert config(root=tmp_path, fan_out=0).fan_out == 0
        with pytest.raises(ValidationError, match="fan_out"):
            config(root=tmp_path, fan_out=5)  # FileLayout's bound


def test_a_root_is_claimed_once_and_a_foreign_directory_is_refused(tmp_path: Path) -> None:
    assert claim_root(tmp_path / "new") and (tmp_path / "new" / MARKER).is_file()
    assert claim_root(tmp_path / "new")  # a tier's root: adopted again
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ForeignRootError, match=re.escape(f"touch '{foreign / MARKER}'")):
        claim_root(foreign)


def test_the_scan_cleans_only_names_a_tier_makes_and_moves_files_into_place(tmp_path: Path) -> None:
    claim_root(tmp_path)
    a, b, c = _keys(3)
    layout = FileLayout(tmp_path)
    for key in (a, b):
        Path(layout.dir_of(key)).mkdir(parents=True, exist_ok=True)
    Path(layout.path_of(a)).write_bytes(encode_header(a, b"v") + b"v")
    old = Path(FileLayout(tmp_path, 1).path_of(b))  # another depth: moved
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(encode_header(b, b"w") + b"w")
    temp = Path(FileLayout.temp_path(layout.path_of(a)))
    temp.write_bytes(b"half")
    short = Path(layout.path_of(c))
    short.parent.mkdir(parents=True, exist_ok=True)
    short.write_bytes(b"LMTR")
    user = Path(layout.dir_of(a)) / "report.tmp-2024.txt"
    user.write_text("a user's file")
    found = scan_files(layout)
    assert {k for k, _, _ in found.entries} == {a, b}
    assert (found.temp_removed, found.short_removed, found.moved) == (1, 1, 1)
    assert Path(layout.path_of(b)).exists() and not old.exists() and not temp.exists()
    assert user.read_text() == "a user's file"
    assert all(size == HEADER_BYTES + 1 for _, size, _ in found.entries)
