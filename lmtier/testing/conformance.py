"""The backend conformance suite: one test per sentence of the StorageBackend contract.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from lmtier.errors import CapacityError, InvalidArgumentError, LmtierError
from lmtier.keys import ChunkKey, make_namespace
from lmtier.memory import HostMemoryPool, live_pools
from lmtier.protocol import Capabilities, StorageBackend, SupportsGetInto, SupportsStats

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
        assert _bytes_of(got) == data

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
        assert _bytes_of(got) == data

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

    # -- errors ----------------------------------------------------------------------------------
    @pytest.mark.asyncio
    async def test_a_key_that_is_not_a_chunk_key_is_a_typed_error(self, backend: StorageBackend) -> None:
        for call in (backend.get(["not-a-key"]), backend.contains([b"\x00" * 16]),  # type: ignore[list-item]
                     backend.delete([42])):  # type: ignore[list-item]
            with pytest.raises(InvalidArgumentError) as info:
                await call
            assert isinstance(info.value, TypeError) and isinstance(info.value, LmtierError)

    @pytest.mark.asyncio
    async def test_a_value_without_the_buffer_protocol_is_a_typed_error(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        good, bad = self.keys(namespace, 2)
        with pytest.raises(InvalidArgumentError):
            await backend.put([(good, b"fine"), (bad, "a str is not bytes")])  # type: ignore[list-item]
        with pytest.raises(InvalidArgumentError):
            await backend.put([(bad, 12345)])  # type: ignore[list-item]

    @pytest.mark.asyncio
    async def test_aclose_is_idempotent_and_later_calls_raise_only_lmtier_errors(
        self, backend: StorageBackend, namespace: str
    ) -> None:
        await backend.aclose()
        await backend.aclose()
        (key,) = self.keys(namespace, 1)
        for call in (backend.get([key]), backend.put([(key, b"x")]), backend.contains([key]), backend.delete([key])):
            with contextlib.suppress(LmtierError):  # refusing is fine; any other type fails the test
                await call

    @pytest.mark.asyncio
    async def test_async_with_closes_the_backend(self, backend_factory: Callable[[], Any], namespace: str) -> None:
        b = await open_backend(backend_factory)
        async with b as entered:
            assert entered is b
            (key,) = self.keys(namespace, 1)
            await b.put([(key, b"ctx")])
        await b.aclose()  # already closed by the context manager; idempotent

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
            assert _bytes_of((await reopened.get([key]))[0]) == data
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
        assert bytes(outs[0]) == data
        wrong = [bytearray(len(data) - 1)]
        assert await backend.get_into([hit], wrong) == [False]

    @pytest.mark.asyncio
    async def test_stats_are_a_flat_dict_of_numbers(self, backend: StorageBackend, namespace: str) -> None:
        if not isinstance(backend, SupportsStats):
            pytest.skip("backend does not implement stats")
        await backend.put([(self.keys(namespace, 1)[0], b"s" * 100)])
        stats = backend.stats()
        assert isinstance(stats, dict)
        assert all(isinstance(v, (int, float)) for v in stats.values()), stats
