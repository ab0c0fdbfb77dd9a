"""Optional backend capabilities are declared ``Supports*`` protocols, never found by ``getattr``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import lmtier
from lmtier.keys import ChunkKey, make_namespace
from lmtier.manager import StorageManager
from lmtier.protocol import (
    SupportsAllocate,
    SupportsEvictionListener,
    SupportsGetInto,
    SupportsStats,
    optional_capabilities,
)
from lmtier.registry import BackendRegistry, BackendSpec
from lmtier_backends.cpu.backend import CpuBackend
from lmtier_backends.cpu.config import CpuConfig


def test_no_module_of_lmtier_looks_capabilities_up_with_getattr() -> None:
    pattern = re.compile(r"""(getattr|hasattr)\([^)]*["'](allocate|add_eviction_listener|get_into)["']""")
    offenders = [f"{p}:{i}" for p in Path(lmtier.__file__).parent.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


@pytest.mark.asyncio
async def test_the_cpu_tier_declares_its_hot_tier_capabilities() -> None:
    backend = CpuBackend(CpuConfig(max_bytes=1 << 16, pinned=False))
    try:
        assert isinstance(backend, SupportsAllocate) and isinstance(backend, SupportsEvictionListener)
        assert isinstance(backend, SupportsStats) and not isinstance(backend, SupportsGetInto)
        assert optional_capabilities(backend) == ("stats", "allocate", "eviction_listener", "clear")
    finally:
        await backend.aclose()


class Plain:
    """A wrapper that forwards only the required protocol: it loses the hot-tier capabilities."""

    def __init__(self, config: CpuConfig) -> None:
        self.inner = CpuBackend(config)

    @property
    def capabilities(self):  # type: ignore[no-untyped-def]
        return self.inner.capabilities

    async def contains(self, keys):  # type: ignore[no-untyped-def]
        return await self.inner.contains(keys)

    async def get(self, keys):  # type: ignore[no-untyped-def]
        return await self.inner.get(keys)

    async def put(self, items):  # type: ignore[no-untyped-def]
        return await self.inner.put(items)

    async def delete(self, keys):  # type: ignore[no-untyped-def]
        return await self.inner.delete(keys)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Forwarding(Plain):
    """The same wrapper claiming (and forwarding) what the wrapped cpu tier supports."""

    def allocate(self, nbytes):  # type: ignore[no-untyped-def]
        return self.inner.allocate(nbytes)

    def add_eviction_listener(self, listener):  # type: ignore[no-untyped-def]
        self.inner.add_eviction_listener(listener)


@pytest.mark.parametrize(("wrapper", "demoted"), [("forwarding", 4), ("plain", 0)])
@pytest.mark.asyncio
async def test_a_wrapper_forwards_capabilities_or_visibly_loses_them(wrapper: str, demoted: int,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    registry = BackendRegistry.discover()
    registry.register(BackendSpec("forwarding", f"{__name__}:Forwarding", "lmtier_backends.cpu.config:CpuConfig"))
    registry.register(BackendSpec("plain", f"{__name__}:Plain", "lmtier_backends.cpu.config:CpuConfig"))
    config = {"chunk_tokens": 16, "tiers": [
        {"name": "hot", "backend": wrapper, "options": {"max_bytes": "4KiB", "pinned": False}},
        {"name": "cold", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}}]}
    with caplog.at_level(logging.INFO, logger="lmtier"):
        mgr = await StorageManager.from_config(config, registry=registry, metrics_registry=CollectorRegistry())
    async with mgr:
        shown = "allocate, eviction_listener" if wrapper == "forwarding" else "none"
        assert f"lmtier tier hot ({wrapper}): optional capabilities: {shown}" in caplog.text
        ns = make_namespace(test="caps")
        ks = [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(8)]
        for k in ks:  # 1 KiB each: the last four evict the first four from the 4 KiB hot tier
            await mgr.tier("hot").backend.put([(k, k.digest * 64)])
        await mgr.flush()
        assert await mgr.tier("cold").backend.contains(ks[:4]) == [demoted == 4] * 4


@pytest.mark.asyncio
async def test_clear_empties_the_tiers_that_can_clear_keeps_the_others_and_refuses_to_name_them() -> None:
    from lmtier.errors import InvalidArgumentError

    registry = BackendRegistry.discover()
    registry.register(BackendSpec("plain", f"{__name__}:Plain", "lmtier_backends.cpu.config:CpuConfig"))
    config = {"chunk_tokens": 16, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1MiB", "pinned": False}},
        {"name": "shared", "backend": "plain", "options": {"max_bytes": "1MiB", "pinned": False}}]}
    mgr = await StorageManager.from_config(config, registry=registry, metrics_registry=CollectorRegistry())
    async with mgr:
        ns, other = make_namespace(test="clear"), make_namespace(test="clear-other")
        ks = [ChunkKey(ns, i.to_bytes(16, "big")) for i in range(3)] + [ChunkKey(other, b"o" * 16)]
        await mgr.put([(k, b"v" * 100) for k in ks])
        with pytest.raises(InvalidArgumentError, match=r"tier\(s\) \['shared'\] cannot be cleared"):
            await mgr.clear(["hot", "shared"])
        with pytest.raises(InvalidArgumentError, match="no tier named 'ghost'"):
            await mgr.clear(["ghost"])
        with pytest.raises(InvalidArgumentError, match="16 lowercase hex"):
            await mgr.clear(namespaces=["nope"])
        assert await mgr.tier("hot").backend.contains(ks) == [True] * 4, "a refused clear cleared nothing"
        assert await mgr.clear(namespaces=[ns]) == {"hot": 3, "shared": None}
        assert await mgr.tier("hot").backend.contains(ks) == [False] * 3 + [True]
        assert await mgr.tier("shared").backend.contains(ks) == [True] * 4, "kept: it cannot clear"
        assert await mgr.clear(["hot"]) == {"hot": 1}
