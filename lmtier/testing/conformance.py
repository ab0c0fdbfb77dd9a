"""The backend conformance suite: the StorageBackend contract, and what faults must do to it.

Subclass it in your backend's tests and override one fixture::

    import pytest
    from lmtier.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend_factory(self, tmp_path):
            # a zero-argument callable giving a fresh handle on the SAME storage each call
            return lambda: MyBackend(MyConfig(root=tmp_path))

The callable may return the backend or an awaitable of it. The suite owns the async fixtures
(``backend`` is opened per test and closed after it), uses a fresh random namespace per test so
shared stores (Redis, S3) need no cleanup between tests, and verifies every declared capability:
``persistent`` means a value survives ``aclose()`` and a new handle; ``shared`` means two handles
see each other's writes. Only :class:`~lmtier.errors.LmtierError` may escape a backend.

Arguments reach a backend already checked (by the manager, or by :mod:`lmtier.kit` helpers the
backend may call): the suite calls backends with well-formed keys and buffers only.

Two optional fixtures turn on the fault and corruption scenarios (see
:mod:`lmtier.testing.backdoors`): ``raw_store`` (read and replace stored bytes behind the
backend's back: truncation, flipped bits in payload and header, swapped values, values of a newer
format; and, where it can, make one key unreadable by the store: that key alone is a miss) and
``service`` (stop and restart the store the backend talks to). Each scenario is a test
that is skipped where its fixture is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import random
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import pytest_asyncio

from lmtier.errors import BackendUnavailableError, CapacityError, LmtierError
from lmtier.framing import HEADER_BYTES, MAGIC
from lmtier.keys import ChunkKey, make_namespace
from lmtier.memory import HostMemoryPool, live_pools
from lmtier.protocol import (
    Capabilities,
    StorageBackend,
    SupportsAllocate,
    SupportsClear,
    SupportsEvictionListener,
    SupportsGetInto,
    SupportsStats,
)
from lmtier.testing.backdoors import (
    HEADER_FIELDS,
    RawStore,
    Service,
    UnreadableStore,
    flip_bit,
    maybe_await,
    newer_format,
    unknown_codec,
    version_1,
)

__all__ = ["BackendConformance", "leaked_host_pools", "open_backend"]

MiB = 1 << 20


async def open_backend(factory: Callable[[], Any]) -> StorageBackend:
    """Call a backend factory, awaiting it if it is async."""
    backend = factory()
    if inspect.isawaitable(backend):
        backend = await backend
    return backend  # type: ignore[no-any-return]


def leaked_host_pools(before: set[HostMemoryPool]) -> list[HostMemoryPool]:
    """Host pools created since ``before`` was taken (``set(live_pools())``) that still have
    buffers out, after garbage collection."""
    if not any(p.outstanding() for p in live_pools() if p not in before):
        return []  # gc.collect() costs ~0.1 s in a process holding torch: only when it can matter
    gc.collect()  # views caught in reference cycles are released only by the collector
    return [p for p in live_pools() if p not in before and p.outstanding()]


def _bytes_of(value: Any) -> bytes:
    assert value is not None, "expected a hit, got a miss (None)"
    return bytes(memoryview(value).cast("B"))


def _same_bytes(got: Any, want: Any) -> bool:
    """Whether two buffers hold the same bytes, as a plain bool.

    The suite's values reach 64 MiB; an ``assert a == b`` on them that fails makes pytest build a
    difflib diff of the two buffers, which runs for minutes on a slow machine (and looks like a
    hang). Comparing here keeps a failure's report to the assert's own message and
    :func:`_difference`'s one line.
    """
    return bytes(memoryview(got).cast("B")) == bytes(memoryview(want).cast("B"))


def _difference(got: Any, want: Any) -> str:
    """One line saying where two buffers part: lengths, then the first differing offset."""
    if got is None:
        return "expected a hit, got a miss (None)"
    a, b = bytes(memoryview(got).cast("B")), bytes(memoryview(want).cast("B"))
    if len(a) != len(b):
        return f"got {len(a)} bytes, expected {len(b)}"
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
    return "same bytes" if first is None else f"{len(a)} bytes, first difference at offset {first}"


def _corrupt_count(backend: StorageBackend) -> int | None:
    """``stats()["corrupt"]`` where the backend reports it."""
    if not isinstance(backend, SupportsStats):
        return None
    value = backend.stats().get("corrupt")
    return int(value) if value is not None else None


async def _answer(call: Callable[[], Any]) -> str:
    """What a call did, in words comparable between two handles: the error class it raised, or
    whether it answered a hit or a miss."""
    try:
        (value,) = await call()
    except LmtierError as exc:
        return f"raises {type(exc).__name__}"
    return "a miss" if value is None else "a hit"


class BackendConformance:
    """Mixin of contract tests. Not collected by itself; subclass it as ``Test<Name>``."""

    #: Items larger than this are not tried by the big-item test (override for slow stores).
    big_item_bytes: int = 64 * MiB

    @pytest.fixture
    def backend_factory(self) -> Callable[[], Any]:
        pytest.fail(
            f"{type(self).__name__} must override the `backend_factory` fixture: return a "
            "zero-argument callable that opens a fresh handle on the same storage"
        )

    @pytest.fixture
    def namespace(self) -> str:
        return make_namespace(conformance=os.urandom(8).hex())

    @pytest_asyncio.fixture
    async def backend(self, backend_factory: Callable[[], Any]) -> AsyncIterator[StorageBackend]:
        pools_before = set(live_pools())
        b = await open_backend(backend_factory)
        try:
            yield b
        finally:
            await b.aclose()
        leaked = leaked_host_pools(pools_before)
        assert not leaked, f"backend left host buffers outstanding after aclose(): {leaked}"

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def keys(namespace: str, n: int) -> list[ChunkKey]:
        return [ChunkKey(namespace, os.urandom(16)) for _ in range(n)]

    @staticmethod
    def value(n: int, seed: int | None = None) -> bytes:
        return random.Random(seed).randbytes(n)

    # -- capabilities ----------------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_capabilities_is_a_capabilities_instance(self, backend: StorageBackend) -> None:
        assert isinstance(backend.capabilities, Capabilities)

    @pytest.mark.asyncio
    async def test_satisfies_the_storage_backend_protocol(self, backend: StorageBackend) -> None:
        assert isinstance(backend, StorageBackend)

    # -- misses ----------------------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_get_of_a_missing_key_is_none(self, backend: StorageBackend, namespace: str) -> None:
        assert await backend.get(self.keys(namespace, 3)) == [None, None, None]

    @pytest.mark.asyncio
    async def test_contains_of_a_missing_key_is_false(self, backend: StorageBackend, namespace: str) -> None:
        assert await backend.contains(self.keys(namespace, 2)) == [False, False]

    # -- round trips -----------------------------------------------------------------------------
    @pytest.mark.asyncio
    @pytest.mark.parametrize("size", [1, 4096, 1 * MiB + 7])
    async def test_put_then_get_returns_the_same_bytes(self, backend: StorageBackend, namespace: str, size: int) -> None:
        (key,) = self.keys(namespace, 1)
        data = self.value(size, seed=size)
        await backend.put([(key, data)])
        assert await backend.contains([key]) == [True]
        (got,) = await backend.get([key])
        assert got is not None and _same_bytes(got, data), _difference(got, data)

    @pytest.mark.asyncio
    async def test_results_follow_the_order_of_the_keys(self, backend: StorageBackend, namespace: str) -> None:
        keys = self.keys(namespace, 8)
        stored = {k: self.value(100 + i, seed=i) for i, k in enumerate(keys) if i % 2 == 0}
        await backend.put(list(stored.items()))
        order = keys[:]
        random.Random(7).shuffle(order)
        got = await backend.get(order)
        present = await backend.contains(order)
        for k, g, p in zip(order, got, present, strict=True):
            if k in stored:
                assert _bytes_of(g) == stored[k] and p is True
            else:
                assert g is None and p is False

    @pytest.mark.asyncio
    async def test_the_same_key_twice_in_a_batch_answers_twice(self, backend: StorageBackend, namespace: str) -> None:
        (key,) = self.keys(namespace, 1)
        await backend.put([(key, b"twice")])
        got = await backend.get([key, key])
        assert [_bytes_of(g) for g in got] == [b"twice", b"twice"]

    @pytest.mark.asyncio
    async def test_empty_batches_return_empty_lists(self, backend: StorageBackend) -> None:
        assert await backend.get([]) == []
        assert await backend.contains([]) == []
        await backend.put([])
        await backend.delete([])

    @pytest.mark.asyncio
    async def test_a_batch_of_many_small_items_round_trips(self, backend: StorageBackend, namespace: str) -> None:
        keys = self.keys(namespace, 200)
        items = [(k, self.value(64, seed=i)) for i, k in enumerate(keys)]
        await backend.put(items)
        got = await backend.get(keys)
        assert [_bytes_of(g) for g in got] == [v for _, v in items]

    @pytest.mark.asyncio
    async def test_overwrite_replaces_the_value(self, backend: StorageBackend, namespace: str) -> None:
        (key,) = self.keys(namespace, 1)
        await backend.put([(key, b"first value")])
        await backend.put([(key, b"second, longer value")])
        (got,) = await backend.get([key])
        assert _bytes_of(got) == b"second, longer value"

    @pytest.mark.asyncio
    async def test_delete_removes_and_absent_keys_are_fine(self, backend: StorageBackend, namespace: str) -> None:
        present, absent = self.keys(namespace, 2)
        await backend.put([(present, b"x" * 10)])
        await backend.delete([present, absent])
        assert await backend.get([present, absent]) == [None, None]
        await backend.delete([present, absent])  # deleting again is still fine

    @pytest.mark.asyncio
    async def test_keys_with_the_same_digest_in_other_namespaces_are_distinct(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        digest = os.urandom(16)
        a, b = ChunkKey(namespace, digest), ChunkKey(make_namespace(other=namespace), digest)
        await backend.put([(a, b"model A")])
        assert await backend.get([b]) == [None]
        await backend.put([(b, b"model B")])
        assert [_bytes_of(v) for v in await backend.get([a, b])] == [b"model A", b"model B"]

    # -- buffers ---------------------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_any_buffer_protocol_value_is_accepted(self, backend: StorageBackend, namespace: str) -> None:
        import numpy as np

        data = self.value(1000, seed=1)
        values: list[Any] = [data, bytearray(data), memoryview(data), np.frombuffer(data, dtype=np.uint8),
                             np.frombuffer(data, dtype=np.uint16)]
        keys = self.keys(namespace, len(values))
        await backend.put(list(zip(keys, values, strict=True)))
        assert [_bytes_of(g) for g in await backend.get(keys)] == [data] * len(values)

    @pytest.mark.asyncio
    async def test_put_does_not_keep_a_reference_to_the_callers_buffer(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        (key,) = self.keys(namespace, 1)
        data = bytearray(b"original" * 100)
        await backend.put([(key, data)])
        data[:] = b"mutated!" * 100
        (got,) = await backend.get([key])
        assert _bytes_of(got) == b"original" * 100

    @pytest.mark.asyncio
    async def test_a_returned_value_is_unchanged_by_later_writes(self, backend: StorageBackend, namespace: str) -> None:
        (key,) = self.keys(namespace, 1)
        await backend.put([(key, b"A" * 4096)])
        (got,) = await backend.get([key])
        await backend.put([(key, b"B" * 4096)])
        await backend.delete([key])
        for k2, v2 in zip(self.keys(namespace, 4), [b"C" * 4096] * 4, strict=True):
            await backend.put([(k2, v2)])
        assert _bytes_of(got) == b"A" * 4096

    @pytest.mark.asyncio
    async def test_a_big_item_round_trips_or_is_refused_with_capacity_error(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        (key,) = self.keys(namespace, 1)
        data = self.value(self.big_item_bytes, seed=64)
        limit = backend.capabilities.max_item_bytes
        if limit is not None and limit < len(data):
            with pytest.raises(CapacityError):
                await backend.put([(key, data)])
            return
        await backend.put([(key, data)])
        (got,) = await backend.get([key])
        assert got is not None and _same_bytes(got, data), _difference(got, data)

    # -- atomicity -------------------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_concurrent_put_and_get_never_see_a_partial_value(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        (key,) = self.keys(namespace, 1)
        size = 1 * MiB
        values = [bytes([0x11]) * size, bytes([0x22]) * size, bytes([0x33]) * (size // 2)]
        await backend.put([(key, values[0])])

        async def writer() -> None:
            for i in range(20):
                await backend.put([(key, values[i % 3])])

        async def reader() -> list[bytes | None]:
            seen: list[bytes | None] = []
            for _ in range(20):
                (got,) = await backend.get([key])
                seen.append(None if got is None else _bytes_of(got))
            return seen

        _, *reads = await asyncio.gather(writer(), reader(), reader())
        for seen in reads:
            for value in seen:
                assert value is None or value in values, "a get observed a partially written value"

    # -- closing ---------------------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_a_closed_backend_refuses_or_forgets_and_aclose_is_idempotent(
        self, backend: StorageBackend, backend_factory: Callable[[], Any], namespace: str
    ) -> None:
        kept, late = self.keys(namespace, 2)
        await backend.put([(kept, b"stored before close")])
        await backend.aclose()
        await backend.aclose()
        calls: dict[str, Callable[[], Any]] = {  # made one at a time: none is left un-awaited
            "get": lambda: backend.get([kept]),
            "contains": lambda: backend.contains([kept]),
            "put": lambda: backend.put([(late, b"stored after close")]),
            "delete": lambda: backend.delete([kept]),
        }
        for name, call in calls.items():
            try:
                answer = await call()
            except LmtierError:
                continue  # refusing is fine; any other exception fails the test
            if name in ("get", "contains"):
                assert isinstance(answer, list) and len(answer) == 1, f"{name} after aclose() answered {answer!r}"
        if backend.capabilities.persistent:  # a closed handle stores and deletes nothing
            reopened = await open_backend(backend_factory)
            try:
                assert await reopened.get([late]) == [None], "a put after aclose() still stored its value"
                assert _bytes_of((await reopened.get([kept]))[0]) == b"stored before close", \
                    "a delete after aclose() still deleted"
            finally:
                await reopened.aclose()

    @pytest.mark.asyncio
    async def test_async_with_closes_the_backend(self, backend_factory: Callable[[], Any], namespace: str) -> None:
        # a handle left by `async with` must behave exactly like one closed with aclose()
        closed_key, with_key = self.keys(namespace, 2)
        closed = await open_backend(backend_factory)
        await closed.put([(closed_key, b"ctx")])
        await closed.aclose()
        expected = await _answer(lambda: closed.get([closed_key]))
        b = await open_backend(backend_factory)
        try:
            async with b as entered:
                assert entered is b
                await b.put([(with_key, b"ctx")])
            got = await _answer(lambda: b.get([with_key]))
        finally:
            await b.aclose()  # idempotent: a no-op when async with closed it
        assert got == expected, (
            f"after `async with` the backend answers get with {got}, but a backend closed with aclose() "
            f"answers {expected}: __aexit__ must close it"
        )

    # -- declared capabilities -------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_persistent_backends_keep_data_across_close_and_reopen(
        self, backend: StorageBackend, backend_factory: Callable[[], Any], namespace: str
    ) -> None:
        if not backend.capabilities.persistent:
            pytest.skip("backend does not claim persistence")
        (key,) = self.keys(namespace, 1)
        data = self.value(10_000, seed=3)
        await backend.put([(key, data)])
        await backend.aclose()
        reopened = await open_backend(backend_factory)
        try:
            assert await reopened.contains([key]) == [True]
            (again,) = await reopened.get([key])
            assert again is not None and _same_bytes(again, data), _difference(again, data)
        finally:
            await reopened.aclose()

    @pytest.mark.asyncio
    async def test_shared_backends_see_each_others_writes(
        self, backend: StorageBackend, backend_factory: Callable[[], Any], namespace: str
    ) -> None:
        if not backend.capabilities.shared:
            pytest.skip("backend does not claim to be shared")
        other = await open_backend(backend_factory)
        try:
            (key,) = self.keys(namespace, 1)
            await other.put([(key, b"from the other handle")])
            assert _bytes_of((await backend.get([key]))[0]) == b"from the other handle"
            await backend.delete([key])
            assert await other.get([key]) == [None]
        finally:
            await other.aclose()

    # -- optional protocols ----------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_get_into_fills_caller_buffers(self, backend: StorageBackend, namespace: str) -> None:
        if not isinstance(backend, SupportsGetInto):
            pytest.skip("backend does not implement get_into")
        hit, miss = self.keys(namespace, 2)
        data = self.value(300_000, seed=5)
        await backend.put([(hit, data)])
        outs = [bytearray(len(data)), bytearray(len(data))]
        assert await backend.get_into([hit, miss], outs) == [True, False]
        assert _same_bytes(outs[0], data), _difference(outs[0], data)
        wrong = [bytearray(len(data) - 1)]
        assert await backend.get_into([hit], wrong) == [False]

    @pytest.mark.asyncio
    async def test_clear_drops_the_values_of_the_namespaces_named_or_every_value(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        if not isinstance(backend, SupportsClear):
            pytest.skip("backend does not implement clear")
        other = make_namespace(conformance_other=os.urandom(8).hex())
        mine, theirs = self.keys(namespace, 3), self.keys(other, 2)
        await backend.put([(k, self.value(1000, seed=i)) for i, k in enumerate(mine + theirs)])
        assert await backend.clear([namespace]) == 3
        assert await backend.contains(mine + theirs) == [False] * 3 + [True] * 2
        assert await backend.get(mine) == [None] * 3
        (kept,) = await backend.get(theirs[:1])
        assert _bytes_of(kept) == self.value(1000, seed=3)
        del kept
        assert await backend.clear([namespace]) == 0
        assert await backend.clear() >= 2  # every value, whoever stored it
        assert await backend.contains(theirs) == [False, False]
        await backend.put([(mine[0], b"again")])  # a cleared tier stores as before
        (got,) = await backend.get(mine[:1])
        assert _bytes_of(got) == b"again"

    @pytest.mark.asyncio
    async def test_stats_are_a_flat_dict_of_numbers(self, backend: StorageBackend, namespace: str) -> None:
        if not isinstance(backend, SupportsStats):
            pytest.skip("backend does not implement stats")
        await backend.put([(self.keys(namespace, 1)[0], b"s" * 100)])
        stats = backend.stats()
        assert isinstance(stats, dict)
        assert all(isinstance(v, (int, float)) for v in stats.values()), stats

    @pytest.mark.asyncio
    async def test_allocated_buffers_are_writable_exact_and_adopted_by_put(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        if not isinstance(backend, SupportsAllocate):
            pytest.skip("backend does not implement allocate")
        (key,) = self.keys(namespace, 1)
        data = self.value(100_000, seed=21)
        buf = backend.allocate(len(data))
        view = buf.view()
        assert view.nbytes == len(data) and not view.readonly
        view[:] = data
        del view
        await backend.put([(key, cast(Any, buf))])
        buf.release()  # the caller's reference; the tier holds its own
        (got,) = await backend.get([key])
        assert got is not None and _same_bytes(got, data), _difference(got, data)
        assert memoryview(got).readonly  # type: ignore[arg-type]
        del got
        unstored = backend.allocate(4096)
        unstored.release()  # never put: freed (the leak check after aclose() would say otherwise)

    @pytest.mark.asyncio
    async def test_an_allocation_larger_than_the_tier_is_a_capacity_error(self, backend: StorageBackend) -> None:
        if not isinstance(backend, SupportsAllocate):
            pytest.skip("backend does not implement allocate")
        limit = backend.capabilities.max_item_bytes
        if limit is None:
            pytest.skip("backend declares no max_item_bytes")
        with pytest.raises(CapacityError):
            backend.allocate(limit + 1)

    @pytest.mark.asyncio
    async def test_the_eviction_listener_sees_each_evicted_value_before_its_memory_is_reused(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        if not isinstance(backend, SupportsEvictionListener):
            pytest.skip("backend does not implement add_eviction_listener")
        limit = backend.capabilities.max_item_bytes
        if not backend.capabilities.evicts or limit is None or limit > 512 * MiB:
            pytest.skip("needs an evicting backend whose max_item_bytes bounds what it holds")
        size = limit // 3
        keys = self.keys(namespace, 6)
        values = {k: self.value(size, seed=30 + i) for i, k in enumerate(keys)}
        seen: list[ChunkKey] = []
        intact: list[bool] = []

        def listener(key: ChunkKey, value: Any) -> None:  # the value is checked during the call
            seen.append(key)
            intact.append(key in values and bytes(memoryview(value).cast("B")) == values[key])

        backend.add_eviction_listener(listener)
        for key in keys:
            await backend.put([(key, values[key])])
        if not seen:
            pytest.skip(f"no eviction after {len(keys)} values of max_item_bytes/3: its bound is elsewhere")
        assert all(intact), "a listener was handed a value other than the one evicted"
        assert len(set(seen)) == len(seen) and seen == [k for k in keys if k in seen], \
            "evictions are reported once each, oldest first"
        assert await backend.contains(seen) == [False] * len(seen)

    @pytest.mark.asyncio
    async def test_a_cancelled_get_into_writes_nothing_after_it_has_unwound(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        if not isinstance(backend, SupportsGetInto):
            pytest.skip("backend does not implement get_into")
        (key,) = self.keys(namespace, 1)
        size = min(8 * MiB, self.big_item_bytes)
        await backend.put([(key, self.value(size, seed=9))])
        sentinel = b"\xa5" * size
        outs: list[bytearray] = []
        for spins in range(10):  # cancel at ten different points of the call
            out = bytearray(size)
            task = asyncio.ensure_future(backend.get_into([key], [out]))
            for _ in range(spins):
                await asyncio.sleep(0)  # let the call get further before it is cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # it may also have finished before the cancellation reached it
            out[:] = sentinel  # from here on, nothing may write into `out`
            outs.append(out)
        await backend.aclose()  # every worker has stopped once this returns
        for i, out in enumerate(outs):
            assert _same_bytes(out, sentinel), \
                f"get_into cancelled after {i} loop turns wrote into the buffer after unwinding: {_difference(out, sentinel)}"

    # -- fault and corruption scenarios (optional back doors: lmtier.testing.backdoors) ----------
    @pytest.fixture
    def raw_store(self) -> RawStore | None:
        """Override to return a :class:`~lmtier.testing.backdoors.RawStore` over the same storage
        as ``backend_factory``: the corruption scenarios run only then."""
        return None

    @pytest.fixture
    def service(self) -> Service | None:
        """Override to return a :class:`~lmtier.testing.backdoors.Service` controlling the store
        ``backend_factory``'s backends talk to: the outage scenarios run only then."""
        return None

    @staticmethod
    def _need(fixture: Any, what: str) -> Any:
        if fixture is None:
            pytest.skip(f"no `{what}` fixture: this scenario needs it")
        return fixture

    async def _stored(self, backend: StorageBackend, raw: RawStore, key: ChunkKey, data: bytes) -> bytes:
        """Put ``data`` through the backend and return the bytes the back door finds stored."""
        await backend.put([(key, data)])
        stored = await maybe_await(raw.read(key))
        assert isinstance(stored, bytes), f"raw_store.read found nothing stored for a key just put ({stored!r:.60})"
        assert stored[:4] == MAGIC and _same_bytes(stored[HEADER_BYTES:], data), \
            "raw_store.read must return the stored header and payload exactly"
        return stored

    @pytest.mark.asyncio
    @pytest.mark.parametrize("damage", ["truncated", "payload bit", "emptied", "header only",
                                        *(f"header {field}" for field in HEADER_FIELDS)])
    async def test_a_damaged_value_is_a_miss_and_is_deleted(
        self, backend: StorageBackend, raw_store: RawStore | None, namespace: str, damage: str
    ) -> None:
        raw = self._need(raw_store, "raw_store")
        (key,) = self.keys(namespace, 1)
        # large enough that tiers receive it into their slabs: a refused value must give its range back
        stored = await self._stored(backend, raw, key, self.value(300_000, seed=11))
        whole = {"truncated": stored[:-1], "payload bit": flip_bit(stored, HEADER_BYTES + 4321, 6),
                 "emptied": b"", "header only": stored[:HEADER_BYTES]}
        damaged = whole[damage] if damage in whole else \
            flip_bit(stored, HEADER_FIELDS[damage.removeprefix("header ")], 1)
        await maybe_await(raw.write(key, damaged))
        counted = _corrupt_count(backend)
        assert await backend.get([key]) == [None], f"a value with its {damage} damaged was served"
        assert await maybe_await(raw.read(key)) is None, f"a value with its {damage} damaged was not deleted"
        assert await backend.contains([key]) == [False]
        if counted is not None:
            assert _corrupt_count(backend) == counted + 1, "stats()['corrupt'] must count the damaged value"

    @pytest.mark.asyncio
    @pytest.mark.parametrize("damage", ["payload length", "payload bit", "header check"])
    async def test_a_damaged_value_is_a_get_into_miss_and_is_deleted(
        self, backend: StorageBackend, raw_store: RawStore | None, namespace: str, damage: str
    ) -> None:
        raw = self._need(raw_store, "raw_store")
        if not isinstance(backend, SupportsGetInto):
            pytest.skip("backend does not implement get_into")
        (key,) = self.keys(namespace, 1)
        data = self.value(300_000, seed=12)
        stored = await self._stored(backend, raw, key, data)
        damaged = {  # the size the caller's buffer expects, so that only the check can refuse it
            "payload length": flip_bit(stored, HEADER_FIELDS["payload length"], 0),
            "payload bit": flip_bit(stored, HEADER_BYTES + 7, 0),
            "header check": flip_bit(stored, HEADER_FIELDS["header check"], 3),
        }[damage]
        await maybe_await(raw.write(key, damaged))
        assert await backend.get_into([key], [bytearray(len(data))]) == [False]
        assert await maybe_await(raw.read(key)) is None, f"a value with its {damage} damaged was not deleted"

    @pytest.mark.asyncio
    async def test_two_swapped_values_are_misses_and_are_deleted(
        self, backend: StorageBackend, raw_store: RawStore | None, namespace: str
    ) -> None:
        raw = self._need(raw_store, "raw_store")
        a, b = self.keys(namespace, 2)
        stored_a = await self._stored(backend, raw, a, self.value(3000, seed=13))
        stored_b = await self._stored(backend, raw, b, self.value(3000, seed=14))
        await maybe_await(raw.write(a, stored_b))
        await maybe_await(raw.write(b, stored_a))
        assert await backend.get([a, b]) == [None, None], "a value was served under another key"
        assert [await maybe_await(raw.read(k)) for k in (a, b)] == [None, None]

    @pytest.mark.asyncio
    @pytest.mark.parametrize("newer", ["format version", "codec"])
    async def test_a_value_of_a_newer_format_is_a_miss_left_in_place(
        self, backend: StorageBackend, raw_store: RawStore | None, namespace: str, newer: str
    ) -> None:
        raw = self._need(raw_store, "raw_store")
        (key,) = self.keys(namespace, 1)
        data = self.value(4000, seed=15)
        stored = await self._stored(backend, raw, key, data)
        written = newer_format(stored) if newer == "format version" else unknown_codec(stored)
        await maybe_await(raw.write(key, written))
        if backend.capabilities.shared:  # a newer writer's value, seen by an older reader
            assert await backend.contains([key]) == [False], "contains counts a value get will refuse"
        assert await backend.get([key]) == [None]
        if isinstance(backend, SupportsGetInto):
            assert await backend.get_into([key], [bytearray(len(data))]) == [False]
        assert await backend.contains([key]) == [False], "contains counts a value get refused"
        still = await maybe_await(raw.read(key))
        assert still is not None and _same_bytes(still, written), \
            f"a value of a newer {newer} was deleted or changed: newer readers sharing the store lose it"

    @pytest.mark.asyncio
    async def test_a_newer_format_value_a_new_handle_finds_is_not_counted(
        self, backend: StorageBackend, backend_factory: Callable[[], Any], raw_store: RawStore | None,
        namespace: str
    ) -> None:
        raw = self._need(raw_store, "raw_store")
        if not backend.capabilities.persistent:
            pytest.skip("backend does not claim persistence")
        (key,) = self.keys(namespace, 1)
        written = newer_format(await self._stored(backend, raw, key, self.value(4000, seed=16)))
        await maybe_await(raw.write(key, written))
        await backend.aclose()
        reopened = await open_backend(backend_factory)
        try:
            assert await reopened.contains([key]) == [False], "contains counts a value get will refuse"
            assert await reopened.get([key]) == [None]
        finally:
            await reopened.aclose()
        still = await maybe_await(raw.read(key))
        assert still is not None and _same_bytes(still, written), _difference(still, written)

    @pytest.mark.asyncio
    async def test_a_value_stored_in_format_version_1_is_still_read(
        self, backend: StorageBackend, raw_store: RawStore | None, namespace: str
    ) -> None:
        raw = self._need(raw_store, "raw_store")
        (key,) = self.keys(namespace, 1)
        data = self.value(6000, seed=17)
        await self._stored(backend, raw, key, data)
        await maybe_await(raw.write(key, version_1(key, data)))  # what lmtier 0.1 wrote
        assert await backend.contains([key]) == [True]
        (got,) = await backend.get([key])
        assert got is not None and _same_bytes(got, data), _difference(got, data)

    @pytest.mark.asyncio
    async def test_a_key_the_store_cannot_read_is_a_miss_and_the_batch_serves_the_others(
        self, backend: StorageBackend, raw_store: RawStore | None, namespace: str
    ) -> None:
        raw = self._need(raw_store, "raw_store")
        if not isinstance(raw, UnreadableStore):
            pytest.skip("raw_store has no make_unreadable: this scenario needs it")
        keys = self.keys(namespace, 6)
        values = [self.value(50_000, seed=30 + i) for i in range(len(keys))]
        await backend.put(list(zip(keys, values, strict=True)))
        bad = 3
        await maybe_await(raw.make_unreadable(keys[bad]))  # type: ignore[func-returns-value]
        got = await backend.get(keys)
        assert got[bad] is None, "a key the store cannot read was served"
        for i, (value, data) in enumerate(zip(got, values, strict=True)):
            if i != bad:
                assert value is not None and _same_bytes(value, data), \
                    f"key {i} was not served: one failing key sank the batch ({_difference(value, data)})"
        del got
        if isinstance(backend, SupportsGetInto):
            outs = [bytearray(len(v)) for v in values]
            assert await backend.get_into(keys, outs) == [i != bad for i in range(len(keys))]
            assert all(_same_bytes(o, v) for i, (o, v) in enumerate(zip(outs, values, strict=True)) if i != bad)
        # alone, the failing key is the tier's fault (typed) or a miss; never wrong bytes
        try:
            alone = await backend.get([keys[bad]])
        except LmtierError:
            pass
        else:
            assert alone == [None]

    @pytest.mark.asyncio
    async def test_a_stopped_service_fails_fast_and_typed_then_works_again(
        self, backend: StorageBackend, service: Service | None, namespace: str
    ) -> None:
        svc = self._need(service, "service")
        kept, fresh = self.keys(namespace, 2)
        data = self.value(100_000, seed=18)
        await backend.put([(kept, data)])
        reads: dict[str, tuple[Callable[[], Any], Any]] = {
            "get": (lambda: backend.get([kept]), [None]),
            "contains": (lambda: backend.contains([kept]), [False]),
        }
        if isinstance(backend, SupportsGetInto):
            reads["get_into"] = (lambda: backend.get_into([kept], [bytearray(len(data))]), [False])
        writes: dict[str, Callable[[], Any]] = {
            "put": lambda: backend.put([(fresh, data)]),
            "delete": lambda: backend.delete([kept]),
        }
        await maybe_await(svc.stop())
        try:
            for name, (read, miss) in reads.items():
                try:
                    answer = await asyncio.wait_for(read(), svc.deadline_s)
                except BackendUnavailableError:
                    continue
                except TimeoutError:
                    pytest.fail(f"{name} hung for {svc.deadline_s}s on a stopped service")
                assert answer == miss, f"{name} on a stopped service answered {answer!r}, not an error or a miss"
            for name, write in writes.items():
                with pytest.raises(BackendUnavailableError):
                    try:
                        await asyncio.wait_for(write(), svc.deadline_s)
                    except TimeoutError:
                        pytest.fail(f"{name} hung for {svc.deadline_s}s on a stopped service")
        finally:
            await maybe_await(svc.start())
        # back: the same handle works again (a call or two may still meet connections made before)
        failures: list[BaseException] = []
        for _ in range(3):
            try:
                await asyncio.wait_for(backend.put([(fresh, data)]), svc.deadline_s)
                (got,) = await asyncio.wait_for(backend.get([fresh]), svc.deadline_s)
            except BackendUnavailableError as exc:
                failures.append(exc)
                continue
            assert got is not None and _same_bytes(got, data), _difference(got, data)
            return
        pytest.fail(f"the backend did not work again after the service came back: {failures}")
