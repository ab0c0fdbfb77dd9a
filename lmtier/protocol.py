"""The storage backend protocol: one async, batched get/put/contains/delete contract.

Every tier (built-in or third-party) implements :class:`StorageBackend`. Calls are batched:
``result[i]`` always answers ``keys[i]``. The manager owns retries, fallbacks and metrics, so
backends stay small: map client errors to the :mod:`lmtier.errors` tree in one place and let
them propagate.

Semantics every backend must honour (checked by :class:`lmtier.testing.BackendConformance`):

* A miss is ``None`` (``get``) or ``False`` (``contains``); it is never an exception.
* Empty batches are valid and return empty lists without touching the store.
* ``put`` is atomic per item: a concurrent ``get`` sees the old value, the new one, or a miss,
  never a partial value. Overwriting an existing key is allowed.
* ``delete`` of an absent key is not an error.
* Only :class:`~lmtier.errors.LmtierError` subclasses escape; a wrong argument type raises
  :class:`~lmtier.errors.InvalidArgumentError` (a ``TypeError``).
* ``aclose`` is idempotent; backends are async context managers.
* Stored bytes that fail validation are a miss: the backend deletes them and counts them
  (``corrupt`` in :meth:`SupportsStats.stats`).

**Optional capabilities** are declared by implementing a ``Supports*`` protocol below, never
found by ``getattr``: the manager and the conformance suite test ``isinstance(backend,
SupportsX)`` and :func:`optional_capabilities` names them (the manager logs them per tier at open).

* :class:`SupportsGetInto` — reads into caller buffers (one host copy per hit: disk, redis, s3, nixl);
* :class:`SupportsStats` — backend counters for metrics and ``lmtier doctor``;
* :class:`SupportsAllocate` — host buffers inside the tier's own memory, adopted by ``put``
  without a copy (the cpu tier: the engine copies pages straight into the tier);
* :class:`SupportsEvictionListener` — the tier tells the manager what it evicts (demotion);
* :class:`SupportsClear` — drop everything, or every value of some namespaces, at once (cpu, disk).

A backend that **wraps** another (a fault injector, a metrics shim) must claim exactly what it
forwards: define a ``Supports*`` method only when the wrapped backend has it (for instance by
choosing a subclass that adds it; ``isinstance`` checks only that the method exists, so a
wrapper that defines it and then fails would be called). One that does not forward a capability
loses it visibly: the tier's line in the manager's ``lmtier storage ready`` log shows what each
tier supports.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from typing_extensions import Buffer  # collections.abc.Buffer (PEP 688) exists only from 3.12

if TYPE_CHECKING:
    from types import TracebackType

    from lmtier.keys import ChunkKey
    from lmtier.memory import HostBuffer

__all__ = [
    "Buffer",
    "Capabilities",
    "EvictionListener",
    "StorageBackend",
    "SupportsAllocate",
    "SupportsClear",
    "SupportsCodecs",
    "SupportsEvictionListener",
    "SupportsGetInto",
    "SupportsStats",
    "optional_capabilities",
]

#: ``listener(key, value)``: called by a :class:`SupportsEvictionListener` tier for each entry it
#: evicts, before the memory is reused; ``value`` is valid only during the call (copy what you keep).
EvictionListener = Callable[["ChunkKey", memoryview], None]


@dataclass(frozen=True)
class Capabilities:
    """What a backend promises; the conformance suite verifies each claim.

    Attributes:
        persistent: data survives ``aclose()`` and a fresh handle on the same storage
            (a new process, a restart).
        shared: several processes/hosts may use the same storage concurrently and see each
            other's writes (Redis, S3); the manager then never assumes it knows the contents.
        evicts: the backend may drop entries by itself (byte bound, TTL, maxmemory); callers
            must treat ``contains`` as a hint, and ``get`` as the truth.
        max_item_bytes: the largest value ``put`` accepts, or ``None`` for no limit.
    """

    persistent: bool = False
    shared: bool = False
    evicts: bool = False
    max_item_bytes: int | None = None


@runtime_checkable
class StorageBackend(Protocol):
    """An async, batched key/value store for KV-cache chunks.

    Keys are :class:`~lmtier.keys.ChunkKey`; ``str(key)`` is lowercase hex and ``-`` only and is
    what a backend uses as a file name, Redis key or S3 key. Values are C-contiguous buffer-protocol
    objects (``bytes``, ``bytearray``, ``memoryview``, ``numpy`` arrays): the
    :class:`~lmtier.manager.StorageManager` turns the HostBuffers and CPU torch tensors its callers
    pass into zero-copy memoryviews first. :func:`lmtier.buffers.as_bytes_view` gives a flat byte view
    of any of them (and raises :class:`~lmtier.errors.InvalidArgumentError` for anything else).
    Backends must not keep a reference to a caller's buffer after ``put`` returns, unless they copy
    it.
    """

    @property
    def capabilities(self) -> Capabilities:
        """The backend's promises (see :class:`Capabilities`)."""
        ...

    async def contains(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Return, for each key, whether a ``get`` would likely hit.

        May be answered from an index or metadata only; for backends that evict (``evicts``)
        a ``True`` may still turn into a miss on ``get``.
        """
        ...

    async def get(self, keys: Sequence[ChunkKey]) -> list[Buffer | None]:
        """Return the stored value for each key, or ``None`` for a miss.

        Returned buffers are read-only views the caller may keep; a corrupt entry is a miss and
        is deleted.
        """
        ...

    async def put(self, items: Sequence[tuple[ChunkKey, Buffer]]) -> None:
        """Store each ``(key, value)``; atomic per item, overwrite allowed.

        Raises:
            CapacityError: the item does not fit (``max_item_bytes`` or the store is full).
            BackendUnavailableError: the store cannot be reached.
            InvalidArgumentError: a key is not a ChunkKey or a value is not a buffer.
        """
        ...

    async def delete(self, keys: Sequence[ChunkKey]) -> None:
        """Remove each key; absent keys are fine."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and buffers. Idempotent."""
        ...

    async def __aenter__(self) -> StorageBackend: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class SupportsGetInto(Protocol):
    """Optional: zero-copy reads into caller buffers (KV chunks have a known size)."""

    async def get_into(self, keys: Sequence[ChunkKey], outs: Sequence[Buffer]) -> list[bool]:
        """Fill ``outs[i]`` (writable, exactly the stored payload size) with ``keys[i]``'s value.

        Returns ``True`` where filled; ``False`` for a miss, a size mismatch or corrupt data, in
        which case the content of ``outs[i]`` is unspecified. A backend fault raises like ``get``
        (the content of every ``outs[i]`` is then unspecified).

        No write into ``outs`` may happen after the call has ended — returned, raised or been
        cancelled: a backend whose workers may still be writing must wait for them (or stop
        them) before it lets a cancellation through. (The manager does not rely on this alone:
        a call it stops waiting for at a deadline keeps its buffers out of circulation until it
        really ends.)
        """
        ...


@runtime_checkable
class SupportsStats(Protocol):
    """Optional: backend-specific counters (objects, bytes, corrupt, ...) for metrics/doctor."""

    def stats(self) -> dict[str, Any]:
        """Return a flat dict of numbers; ``objects`` and ``bytes`` where known."""
        ...


@runtime_checkable
class SupportsAllocate(Protocol):
    """Optional (in-process hot tiers): host buffers carved from the tier's own memory.

    The engine copies a chunk's pages straight into such a buffer, and ``put`` of it stores it
    without another copy: the tier *adopts* the buffer (takes its own reference); the caller
    still releases its reference. The manager also fetches colder tiers' hits into such buffers
    and promotes them by adoption, so a remote hit is written once on the host.

    Contract:

    * ``allocate(nbytes)`` returns a writable :class:`~lmtier.memory.HostBuffer` of exactly
      ``nbytes`` (refcount 1, owned by the caller), pinned iff the tier's memory is
      (``HostBuffer.pinned``). It is not stored until ``put``; releasing it unstored frees it.
    * It may evict least-recently-used entries to make room (telling eviction listeners), and
      raises :class:`~lmtier.errors.CapacityError` when nothing more can be freed. It never
      waits on I/O. Call it from the event loop the backend's other methods run on.
    * Such a tier lives in this process's memory, and none of its calls waits on I/O: the
      manager calls them inline (no task, no deadline), so a put is visible to the next call.
    * ``get`` of an adopted (or copied-in) value returns read-only lease views of the tier's
      memory (:meth:`~lmtier.memory.HostBuffer.lease_view`), so hits are zero-copy too.
    """

    def allocate(self, nbytes: int) -> HostBuffer:
        """A buffer of ``nbytes`` inside the tier's memory; ``put`` adopts it without copying."""
        ...


@runtime_checkable
class SupportsEvictionListener(Protocol):
    """Optional (tiers that evict by themselves): report each eviction before the memory is reused.

    The manager registers one listener per tier at construction and demotes what it is told
    about into the next tier (if that tier lacks the key). Listeners may be called from any
    thread the backend evicts on; a listener must not raise and must not call back into the
    backend.
    """

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call ``listener(key, value)`` for every entry evicted from now on."""
        ...


@runtime_checkable
class SupportsCodecs(Protocol):
    """Optional (tiers storing lmtier's header): a value keeps its codec id and raw length.

    A tier with a value codec (``codec:`` in YAML) stores what the manager encoded. Its backend
    must (1) write the header of a ``put`` value from the :class:`lmtier.kit.Payload` facts
    (``codec``, ``raw_length``: :meth:`lmtier.kit.StoreItem.header` does), (2) read headers with
    ``codecs=lmtier.framing.READABLE_CODECS`` in ``get`` and ``contains``, and (3) return a value
    whose codec is not 0 as a :class:`lmtier.kit.Payload` carrying them
    (:func:`lmtier.kit.stored_value`), so the manager knows how to decode it. ``get_into`` serves
    codec-0 values only (a coded value is a miss there; the manager asks such a miss again with
    ``get`` and decodes it). ``carries_codecs`` is ``True``.

    The manager refuses a codec on a tier whose backend does not declare this (ConfigError at
    open): a backend that dropped the facts would hand encoded bytes back as the value.
    """

    @property
    def carries_codecs(self) -> bool:
        ...


@runtime_checkable
class SupportsClear(Protocol):
    """Optional: drop everything the tier stores, or every value of some namespaces, at once.

    What ``lmtier serve``'s ``POST /v1/clear`` and an engine's "clear the cache" use. Only
    values the tier itself wrote are removed (its own files or entries, matched exactly: nothing
    else under its root, bucket or database). Values a reader still holds (lease views) stay
    valid until released. Eviction listeners are not told (nothing is demoted). A fault raises
    like ``delete``; what was removed before it stays removed.
    """

    async def clear(self, namespaces: Collection[str] | None = None) -> int:
        """Remove every value (``namespaces`` ``None``), or those whose key's namespace is one of
        ``namespaces``; returns how many values were removed."""
        ...


#: The optional protocols, by the name :func:`optional_capabilities` reports.
_OPTIONAL: tuple[tuple[str, type], ...] = (
    ("get_into", SupportsGetInto),
    ("stats", SupportsStats),
    ("allocate", SupportsAllocate),
    ("eviction_listener", SupportsEvictionListener),
    ("codecs", SupportsCodecs),
    ("clear", SupportsClear),
)


def optional_capabilities(backend: object) -> tuple[str, ...]:
    """Names of the optional ``Supports*`` protocols ``backend`` implements, in a fixed order."""
    return tuple(name for name, proto in _OPTIONAL if isinstance(backend, proto))
