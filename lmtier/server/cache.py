"""The server's cache: one StorageManager whose hot tier lives in the shared slab, and its operations.

:class:`SlabCache` is what every connection's requests act on (on the server's event loop):
lookups and presence checks go to the manager; reservations and leases are ranges of the slab
held by the requesting connection's :class:`~lmtier.server.holdings.Holdings`; commits hand
reserved ranges to the hot tier without a copy (the cpu tier adopts buffers of its own pool).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lmtier.config import LmtierConfig, load_config
from lmtier.errors import ConfigError, InvalidArgumentError, LmtierError
from lmtier.keys import ChunkKey
from lmtier.limits import check_available_now
from lmtier.memory import HostBuffer, HostMemoryPool
from lmtier.server.holdings import Holdings
from lmtier.server.protocol import E_BAD_ARGUMENT, PROTOCOL_VERSION, ServerError, Slot, decode_key
from lmtier.server.slab import Slab
from lmtier.store import Residency, ResidencyLog

if TYPE_CHECKING:
    import os as _os

    from lmtier.manager import StorageManager
    from lmtier.metrics import Metrics
    from lmtier_backends.cpu.backend import CpuBackend

__all__ = ["SlabCache"]

log = logging.getLogger("lmtier.server")


class SlabCache:
    """The manager, its slab-backed hot tier, and the connections' holdings. Build with :meth:`open`."""

    def __init__(self, manager: StorageManager, hot: CpuBackend, slab: Slab) -> None:
        self.manager = manager
        self.hot = hot
        self.slab = slab
        self.started = time.time()
        self.holdings: dict[int, tuple[Holdings, dict[str, Any]]] = {}  # connection id -> (held, who)
        self._residency: dict[int, ResidencyLog] = {}  # connection id -> its changes since its last take
        self._hearing = False

    @classmethod
    async def open(cls, config: str | _os.PathLike[str] | LmtierConfig, *, metrics: Metrics) -> SlabCache:
        """Validate ``config``, create the slab (the cpu tier's ``max_bytes``), open every tier."""
        from lmtier.manager import StorageManager
        from lmtier.registry import BackendRegistry
        from lmtier_backends.cpu.backend import CpuBackend
        from lmtier_backends.cpu.config import CpuConfig

        cfg = load_config(config)
        registry = BackendRegistry.discover()
        options = cfg.validate_backends(registry)
        first = cfg.tiers[0]
        if first.backend != "cpu" or not isinstance(options[0], CpuConfig):
            raise ConfigError(
                f"tiers[0].backend: lmtier serve keeps its hottest tier in the shared slab clients map, so "
                f"the first tier must be a cpu tier (got {first.backend!r}); add one, e.g. "
                "{name: hot, backend: cpu, options: {max_bytes: 8GiB}}")
        check_available_now(int(options[0].max_bytes), f"tier {first.name!r} (tiers[0], the server's shared slab)")
        slab = Slab.create(int(options[0].max_bytes))
        pool = HostMemoryPool(slab.size, memory=slab.tensor, name="server-slab")
        opened: list[tuple[Any, Any]] = [(first, CpuBackend(options[0], pool=pool))]
        try:
            for i, (tcfg, opts) in enumerate(zip(cfg.tiers[1:], options[1:], strict=True), start=1):
                opened.append((tcfg, await registry.create(tcfg.backend, opts, path=f"tiers[{i}].options")))
        except BaseException:
            for _, backend in opened:
                await backend.aclose()
            raise
        try:
            # Buffers the server hands out are slab ranges, never pinned here: clients pin their
            # own mapping. Left to its default the manager would pin its host pool on a CUDA
            # machine, starting a CUDA context in a process that must never touch the GPU.
            manager = StorageManager(opened, config=cfg, metrics=metrics, pin_host_memory=False,
                                     registry=registry)
        except BaseException:
            for _, backend in opened:
                await backend.aclose()
            raise
        return cls(manager, opened[0][1], slab)

    # -- connections ---------------------------------------------------------------------------
    def connect(self, conn_id: int, who: dict[str, Any]) -> Holdings:
        held = Holdings()
        self.holdings[conn_id] = (held, who)
        return held

    def disconnect(self, conn_id: int) -> int:
        """Release everything the connection held; returns how many slots that was."""
        self._residency.pop(conn_id, None)
        entry = self.holdings.pop(conn_id, None)
        return entry[0].close() if entry is not None else 0

    # -- operations ----------------------------------------------------------------------------
    async def lookup(self, raw_keys: Sequence[bytes], raw_tails: Sequence[bytes] = ()
                     ) -> tuple[list[str], list[str | None]]:
        """For each leading key present, the hottest tier holding it (prefix semantics); and where
        each tail is when every key is present (:meth:`StorageManager.locate_tails`)."""
        return await self.manager.locate_tails(_keys(raw_keys), _keys(raw_tails))

    def read_costs(self) -> dict[str, list[float]]:
        """Each learned tier's read cost, as :class:`~lmtier.server.protocol.LookupReply` carries it."""
        return {name: [c.latency_s, c.seconds_per_byte, float(c.samples)]
                for name, c in self.manager.read_costs().items() if c is not None}

    async def contains(self, raw_keys: Sequence[bytes]) -> list[bool]:
        return await self.manager.contains(_keys(raw_keys))

    async def reserve(self, sizes: Sequence[int], held: Holdings, raw_keys: Sequence[bytes] | None = None
                      ) -> list[Slot | None]:
        self._check_sizes(sizes)
        todo = list(range(len(sizes)))
        if raw_keys is not None:
            if len(raw_keys) != len(sizes):
                raise ServerError(E_BAD_ARGUMENT, f"reserve of {len(sizes)} sizes with {len(raw_keys)} keys")
            present = await self.hot.contains(_keys(raw_keys))  # in memory: answered inline
            todo = [i for i in todo if not present[i]]
        out: list[Slot | None] = [None] * len(sizes)
        for i, buf in zip(todo, self.manager.reserve([sizes[i] for i in todo]), strict=True):
            out[i] = self._hold(buf, held.add_reservation)
        return out

    def take_commit(self, items: Sequence[tuple[bytes, int]], held: Holdings) -> list[tuple[ChunkKey, HostBuffer]]:
        """Check a commit whole and take its reservations from the connection (all or nothing).

        Synchronous on purpose: called as the frame is read, so a commit that arrived before the
        connection closed is honoured even though the close releases everything else at once.
        """
        keys = _keys([k for k, _ in items])
        return list(zip(keys, held.take_reservations([s for _, s in items]), strict=True))

    async def commit(self, taken: list[tuple[ChunkKey, HostBuffer]]) -> int:
        """Store what :meth:`take_commit` took; returns how many chunks the hot tier newly holds."""
        bufs = [b for _, b in taken]
        keys = [k for k, _ in taken]
        try:
            # the hot tier adopts our slab ranges (no copy); keys a tier holds already are skipped
            return await self.manager.put(list(zip(keys, bufs, strict=True)), skip_present=True)
        finally:
            for b in bufs:
                b.release()

    async def fetch(self, raw_keys: Sequence[bytes], sizes: Sequence[int], held: Holdings) -> list[Slot | None]:
        keys = _keys(raw_keys)
        if len(sizes) != len(keys):
            raise ServerError(E_BAD_ARGUMENT, f"fetch of {len(keys)} keys with {len(sizes)} sizes")
        self._check_sizes(sizes)
        # hot hits are the slab's own ranges (no copy); colder hits are read once into slab ranges,
        # which the hot tier adopts as their promotion; a value of another size is a miss (deleted)
        return [self._hold(buf, held.add_lease) for buf in await self.manager.fetch(keys, sizes)]

    async def delete(self, raw_keys: Sequence[bytes]) -> None:
        await self.manager.delete(_keys(raw_keys))

    def take_residency(self, conn_id: int) -> tuple[list[Residency], int]:
        """The ``residency`` op: the connection's changes since its last call (the first call starts them)."""
        log_ = self._residency.get(conn_id)
        if log_ is None:
            if not self._hearing:
                self.manager.add_residency_listener(self._fan_out)
                self._hearing = True
            log_ = self._residency[conn_id] = ResidencyLog()
        return log_.take()

    def _fan_out(self, tier: str, keys: Sequence[ChunkKey], held: bool) -> None:
        for log_ in list(self._residency.values()):  # tiers evict from their own threads too
            log_.note(tier, keys, held)

    async def clear(self, tiers: Sequence[str] | None = None, namespaces: Sequence[str] | None = None
                    ) -> dict[str, int | None]:
        """Drop what ``tiers`` hold (``None``: every tier), all of it or ``namespaces``' chunks.

        Per tier asked: chunks dropped, or ``None`` for one that cannot be cleared (kept).
        Leased slab ranges are freed when their leases are released. Bad names are
        :data:`~lmtier.server.protocol.E_BAD_ARGUMENT`.
        """
        try:
            return await self.manager.clear(tiers, namespaces=namespaces)
        except InvalidArgumentError as exc:
            raise ServerError(E_BAD_ARGUMENT, str(exc)) from None

    def status(self) -> dict[str, Any]:
        """The ``/v1/status`` document."""
        from lmtier import __version__

        metrics = self.manager.metrics
        tiers = []
        all_stats = self.manager.stats()
        for t in self.manager.tiers:
            stats = all_stats.get(t.name, {})
            tiers.append({
                "name": t.name,
                "backend": t.config.backend,
                "bytes": int(stats.get("bytes", 0)),
                "objects": int(stats.get("objects", 0)),
                "hits": int(metrics.hits.labels(t.name)._value.get()),
                "misses": int(metrics.misses.labels(t.name)._value.get()),
                "evictions": int(metrics.evictions.labels(t.name)._value.get()),
                "circuit": t.breaker.state,
            })
        conns = [{**who, "leases": h.leases, "reservations": h.reservations} for h, who in self.holdings.values()]
        pool = self.hot.pool
        return {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "uptime_s": round(time.time() - self.started, 3),
            "clients": len(self.holdings),
            "leases": sum(c["leases"] for c in conns),
            "reservations": sum(c["reservations"] for c in conns),
            "slab": {"id": self.slab.slab_id, "bytes": self.slab.size, "used_bytes": pool.used_bytes,
                     "buffers": pool.outstanding()},
            "tiers": tiers,
            "connections": conns,
        }

    async def aclose(self) -> None:
        """Release every connection's holdings, drain background writes, close the tiers."""
        for conn_id in list(self.holdings):
            self.disconnect(conn_id)
        await self.manager.aclose()

    # -- machinery -----------------------------------------------------------------------------
    def _check_sizes(self, sizes: Sequence[int]) -> None:
        for s in sizes:
            if not 0 < s <= self.hot.pool.capacity:
                raise ServerError(E_BAD_ARGUMENT, f"size {s} is outside [1, {self.hot.pool.capacity}] (the slab)")

    def _hold(self, buf: HostBuffer | None, add: Callable[[HostBuffer], int | None]) -> Slot | None:
        """``buf`` as a slot of the connection, if it lies in the slab (else released: a miss)."""
        if buf is None:
            return None
        if buf.pool is not self.hot.pool:  # the manager's host pool: the clients cannot see it
            buf.release()
            return None
        slot = add(buf)
        return Slot(slot, buf.offset) if slot is not None else None


def _keys(raw_keys: Sequence[bytes]) -> list[ChunkKey]:
    try:
        return [ChunkKey(*decode_key(raw)) for raw in raw_keys]
    except (ValueError, LmtierError) as exc:
        raise ServerError(E_BAD_ARGUMENT, f"bad key: {exc}") from None
