"""A fault injector for tests: a tier whose reads are slowed to a set speed, changeable mid-run.

``throttled(inner, bytes_per_s=1e6)`` wraps any backend: ``get`` and ``get_into`` answer after
``latency_s + bytes / bytes_per_s`` (the bytes they returned), everything else passes through.
``backend.throttle.set(bytes_per_s=None)`` lifts it (or changes it) while the tier is in use.

It claims exactly the optional capabilities (:mod:`lmtier.protocol`'s ``Supports*``) of the
backend it wraps: the class of the wrapper is chosen per wrapped backend, with a method only for
each protocol the inner one implements, so ``isinstance`` checks (and the manager's "optional
capabilities" log line) see through it. ``get_into`` is throttled too; ``allocate``, eviction
listeners, ``stats`` and ``carries_codecs`` are forwarded untouched.

As a tier in a config (the ``throttled`` backend; tests register :func:`lmtier_backend_specs`
through an entry point, as a third-party package would)::

    {"name": "slow", "backend": "throttled",
     "options": {"inner": {"backend": "disk", "options": {"root": "/tmp/x"}}, "bytes_per_s": 2e6}}
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmtier.buffers import as_bytes_view
from lmtier.keys import ChunkKey
from lmtier.protocol import (
    Buffer,
    Capabilities,
    EvictionListener,
    StorageBackend,
    SupportsAllocate,
    SupportsClear,
    SupportsCodecs,
    SupportsEvictionListener,
    SupportsGetInto,
    SupportsStats,
)
from lmtier.registry import BackendSpec, hookimpl

__all__ = ["InnerTier", "Throttle", "ThrottleConfig", "ThrottledBackend", "install_entry_point",
           "lmtier_backend_specs", "make", "throttled"]


class Throttle:
    """The knob: reads take ``latency_s + bytes / bytes_per_s`` (``bytes_per_s=None``: no limit)."""

    def __init__(self, bytes_per_s: float | None = None, latency_s: float = 0.0) -> None:
        self.bytes_per_s = bytes_per_s
        self.latency_s = latency_s
        self.reads = 0
        self.bytes_read = 0

    def set(self, bytes_per_s: float | None = None, latency_s: float = 0.0) -> None:
        self.bytes_per_s, self.latency_s = bytes_per_s, latency_s

    def delay(self, nbytes: int) -> float:
        self.reads += 1
        self.bytes_read += nbytes
        seconds = self.latency_s
        if self.bytes_per_s:
            seconds += nbytes / self.bytes_per_s
        return seconds


class ThrottledBackend:
    """The wrapper's always-present part; :func:`throttled` picks the subclass with the capabilities."""

    def __init__(self, inner: StorageBackend, throttle: Throttle) -> None:
        self.inner = inner
        self.throttle = throttle

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return await self.inner.contains(keys)

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        values = await self.inner.get(keys)
        await self._wait(sum(as_bytes_view(v).nbytes for v in values if v is not None))
        return values

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        await self.inner.put(items)

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        await self.inner.delete(keys)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> ThrottledBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _wait(self, nbytes: int) -> None:
        seconds = self.throttle.delay(nbytes)
        if seconds > 0:
            await asyncio.sleep(seconds)


class _GetInto:
    inner: Any
    _wait: Any

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        filled = await self.inner.get_into(keys, outs)
        await self._wait(sum(as_bytes_view(o).nbytes for o, ok in zip(outs, filled, strict=True) if ok))
        return list(filled)


class _Stats:
    inner: Any

    def stats(self) -> dict[str, Any]:
        return dict(self.inner.stats())


class _Allocate:
    inner: Any

    def allocate(self, nbytes: int) -> Any:
        return self.inner.allocate(nbytes)


class _EvictionListener:
    inner: Any

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        self.inner.add_eviction_listener(listener)


class _Codecs:
    inner: Any

    @property
    def carries_codecs(self) -> bool:
        return bool(self.inner.carries_codecs)


class _Clear:
    inner: Any

    async def clear(self, namespaces: Collection[str] | None = None) -> int:
        return int(await self.inner.clear(namespaces))


_MIXINS = ((SupportsGetInto, _GetInto), (SupportsStats, _Stats), (SupportsAllocate, _Allocate),
           (SupportsEvictionListener, _EvictionListener), (SupportsCodecs, _Codecs), (SupportsClear, _Clear))


@functools.cache
def _wrapper_class(mixins: tuple[type, ...]) -> type[ThrottledBackend]:
    if not mixins:
        return ThrottledBackend
    name = "Throttled" + "".join(m.__name__.strip("_") for m in mixins)
    return type(name, (*mixins, ThrottledBackend), {})


def throttled(inner: StorageBackend, *, bytes_per_s: float | None = None, latency_s: float = 0.0) -> ThrottledBackend:
    """Wrap ``inner``: reads slowed to ``bytes_per_s`` (+ ``latency_s`` per call); same capabilities."""
    mixins = tuple(mixin for proto, mixin in _MIXINS if isinstance(inner, proto))
    return _wrapper_class(mixins)(inner, Throttle(bytes_per_s, latency_s))


# -- as a backend in a config ------------------------------------------------------------------
class InnerTier(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backend: str
    options: dict[str, Any] = Field(default_factory=dict)


class ThrottleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: InnerTier
    bytes_per_s: float | None = Field(None, gt=0)
    latency_s: float = Field(0.0, ge=0)


async def make(config: ThrottleConfig) -> ThrottledBackend:
    from lmtier.registry import BackendRegistry

    registry = BackendRegistry.discover()
    inner = await registry.create(config.inner.backend, config.inner.options, path="options.inner.options")
    return throttled(inner, bytes_per_s=config.bytes_per_s, latency_s=config.latency_s)


@hookimpl
def lmtier_backend_specs() -> list[BackendSpec]:
    return [BackendSpec(name="throttled", factory="tests.support.throttle:make",
                        config="tests.support.throttle:ThrottleConfig", install_hint="(tests only)",
                        description="test fault injector: another backend with its reads slowed")]


def install_entry_point(site: Path) -> Path:
    """As if a package providing ``throttled`` were pip-installed: a dist-info under ``site`` with an
    ``lmtier`` entry point (put ``site`` on ``sys.path``; engines then find it by discovery)."""
    dist = site / "lmtier_test_throttle-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lmtier-test-throttle\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[lmtier]\nthrottled = {__name__}\n")
    return dist
