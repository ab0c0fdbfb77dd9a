"""``lmtier doctor --faults CONFIG``: a short fault drill against the user's own tiers.

Each tier is opened alone under a StorageManager (its configured deadlines and breaker, ``write:
through``) and drilled in a scratch namespace that no engine ever uses, whose keys are deleted at
the end:

* **round trip** — values put, read back byte-exact;
* **corrupted value** — one stored value damaged behind the tier's back (where the tier exposes
  where it stores a key: ``path_of``), which must be a miss while its neighbours are served;
* **killed connection** — this process's TCP connections to the tier's server are shut down under
  the client (``shutdown(2)`` on a duplicate of each socket: the client sees the peer hang up),
  and the next calls must answer (a miss or a hit, never a wrong value or an exception) and then
  serve again;
* **timeout** — the tier is wrapped so that every call stalls for longer than its deadline (a fake
  that only injects the fault), and the caller must get its miss by the deadline, not after the
  stall.

Each check prints one line: ``ok`` or ``PROBLEM``, what the caller saw and how long it waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lmtier.errors import LmtierError

__all__ = ["run_drill"]

VALUES = 4
VALUE_BYTES = 256 << 10
#: How long the timeout check's stalled tier holds each call, beyond its configured deadline.
STALL_EXTRA_S = 3.0


class Check:
    """One drill check's outcome: ``ok``, a line saying what happened, the caller's worst wait."""

    def __init__(self, name: str) -> None:
        self.name, self.ok, self.skipped, self.detail, self.worst_s = name, True, False, "", 0.0

    def problem(self, detail: str) -> None:
        self.ok, self.detail = False, detail

    def skip(self, why: str) -> Check:
        self.skipped, self.detail = True, why
        return self

    async def timed(self, call: Any) -> Any:
        start = time.perf_counter()
        try:
            return await call
        finally:
            self.worst_s = max(self.worst_s, time.perf_counter() - start)


async def run_drill(config_source: str, say: Callable[[str], None]) -> int:
    """Drill every tier of ``config_source``; returns the number of problems found."""
    from lmtier.config import load_config
    from lmtier.registry import BackendRegistry

    cfg = load_config(config_source)
    registry = BackendRegistry.discover()
    options = cfg.validate_backends(registry)
    problems = 0
    for i, (tier, opts) in enumerate(zip(cfg.tiers, options, strict=True)):
        say(f"tier {tier.name} ({tier.backend})")
        try:
            checks = await _drill_tier(registry, tier, opts, i)
        except LmtierError as exc:
            say(f"  {'open':<18} PROBLEM: {' '.join(str(exc).split())}")
            problems += 1
            continue
        for check in checks:
            mark = "PROBLEM" if not check.ok else "skipped" if check.skipped else "ok"
            waited = f" (worst call {check.worst_s * 1e3:.0f} ms)" if check.worst_s else ""
            say(f"  {check.name:<18} {mark}: {check.detail}{waited}")
            problems += not check.ok
    return problems


async def _drill_tier(registry: Any, tier: Any, opts: Any, index: int) -> list[Check]:
    from prometheus_client import CollectorRegistry

    from lmtier.keys import ChunkKey, make_namespace
    from lmtier.manager import StorageManager
    from lmtier.metrics import Metrics

    alone = tier.model_copy(update={"write": "through"})
    backend = await registry.create(tier.backend, opts, path=f"tiers[{index}].options")
    ns = make_namespace(lmtier_doctor_faults=os.urandom(8).hex())  # never an engine's namespace
    items = [(ChunkKey(ns, os.urandom(16)), os.urandom(VALUE_BYTES)) for _ in range(VALUES)]
    keys = [k for k, _ in items]
    checks: list[Check] = []
    mgr = StorageManager([(alone, backend)], metrics=Metrics(CollectorRegistry()))
    try:
        checks.append(await _round_trip(mgr, items))
        checks.append(await _corrupted_value(mgr, backend, items))
        checks.append(await _killed_connection(mgr, opts, items))
        checks.append(await _timeout(alone, backend, keys))
    finally:
        with contextlib.suppress(LmtierError):
            await backend.delete(keys)
        await mgr.aclose()
    return checks


async def _round_trip(mgr: Any, items: Sequence[tuple[Any, bytes]]) -> Check:
    check = Check("round trip")
    await check.timed(mgr.put(list(items)))
    got = await check.timed(mgr.get([k for k, _ in items]))
    good = sum(1 for v, (_, want) in zip(got, items, strict=True) if v is not None and bytes(v) == want)
    if good == len(items):
        check.detail = f"{len(items)} values of {VALUE_BYTES >> 10} KiB stored and read back byte-exact"
    else:
        check.problem(f"{good} of {len(items)} values read back byte-exact right after put")
    return check


async def _corrupted_value(mgr: Any, backend: Any, items: Sequence[tuple[Any, bytes]]) -> Check:
    check = Check("corrupted value")
    path_of = getattr(backend, "path_of", None)
    if not callable(path_of):
        return check.skip("this tier does not say where it stores a key (tests/faults covers redis, s3)")
    victim = Path(path_of(items[0][0]))
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0x01  # one payload bit: bit rot
    victim.write_bytes(bytes(raw))
    got = await check.timed(mgr.get([k for k, _ in items]))
    wrong = sum(1 for v, (_, want) in zip(got, items, strict=True) if v is not None and bytes(v) != want)
    served = sum(1 for v in got[1:] if v is not None)
    if wrong or got[0] is not None:
        check.problem(f"the damaged value was {'returned' if got[0] is not None else 'a miss'}; "
                      f"{wrong} wrong value(s)")
    elif served != len(items) - 1:
        check.problem(f"the damaged value was a miss, but only {served} of {len(items) - 1} intact ones were served")
    else:
        check.detail = "a flipped payload bit was a miss (deleted, counted); the intact values were served"
    await mgr.put([items[0]])  # put it back for the next checks
    return check


async def _killed_connection(mgr: Any, opts: Any, items: Sequence[tuple[Any, bytes]]) -> Check:
    check = Check("killed connection")
    address = _server_address(opts)
    if address is None:
        return check.skip("the tier talks to no TCP server")
    keys = [k for k, _ in items]
    await mgr.get(keys)  # the client's connections are open now
    cut = _shut_down_connections_to(*address)
    if not cut:
        return check.skip(f"no open connection to {address[0]}:{address[1]} found")
    answers = []
    for _ in range(2):
        try:
            got = await check.timed(mgr.get(keys))
        except Exception as exc:
            check.problem(f"a call raised {type(exc).__name__} to the caller after {cut} connection(s) were cut")
            return check
        wrong = sum(1 for v, (_, want) in zip(got, items, strict=True) if v is not None and bytes(v) != want)
        if wrong:
            check.problem(f"{wrong} wrong value(s) after the connections were cut")
            return check
        answers.append(sum(v is not None for v in got))
    check.detail = (f"{cut} connection(s) to {address[0]}:{address[1]} cut: the next calls served "
                    f"{answers[0]} then {answers[1]} of {len(items)} values, no error reached the caller")
    return check


async def _timeout(tier: Any, backend: Any, keys: list[Any]) -> Check:
    from prometheus_client import CollectorRegistry

    from lmtier.manager import StorageManager
    from lmtier.metrics import Metrics

    check = Check("timeout")
    deadline = _get_deadline_s(tier)
    stall = (deadline or 0.0) + STALL_EXTRA_S
    stalled = StorageManager([(tier, _Stalled(backend, stall))], metrics=Metrics(CollectorRegistry()))
    try:
        try:
            got = await check.timed(stalled.get(keys))
        except Exception as exc:
            check.problem(f"a stalled tier raised {type(exc).__name__} to the caller")
            return check
        if check.worst_s >= stall:
            check.problem(f"a tier stalled for {stall:.1f} s held the caller for all of it: set the tier's "
                          "timeout_s (a frozen server must cost a call its deadline, not its socket timeout)")
        elif any(v is not None for v in got):
            check.problem("a stalled tier returned values before its stall ended")
        else:
            check.detail = f"a tier stalled for {stall:.1f} s cost the caller a miss after its deadline"
    finally:
        await stalled.aclose()
    return check


def _get_deadline_s(tier: Any) -> float | None:
    timeout = getattr(tier, "timeout_s", None)
    if timeout is None or isinstance(timeout, (int, float)):
        return timeout
    return getattr(timeout, "get", None)  # per-kind deadlines


class _Stalled:
    """The tier, except that every call first waits ``stall_s``: a frozen server, injected."""

    def __init__(self, backend: Any, stall_s: float) -> None:
        self._backend, self._stall_s = backend, stall_s

    @property
    def capabilities(self) -> Any:
        return self._backend.capabilities

    async def _stall(self) -> None:
        await asyncio.sleep(self._stall_s)

    async def contains(self, keys: Any) -> Any:
        await self._stall()
        return await self._backend.contains(keys)

    async def get(self, keys: Any) -> Any:
        await self._stall()
        return await self._backend.get(keys)

    async def put(self, items: Any) -> None:
        await self._stall()
        await self._backend.put(items)

    async def delete(self, keys: Any) -> None:
        await self._backend.delete(keys)

    async def aclose(self) -> None:
        """The real backend is closed by its own manager."""

    async def __aenter__(self) -> _Stalled:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _server_address(opts: Any) -> tuple[str, int] | None:
    """``(host, port)`` of the first URL option (``url``, ``endpoint_url``) naming a TCP server."""
    for value in opts.model_dump().values():
        if isinstance(value, str) and "://" in value:
            parts = urlsplit(value)
            if parts.hostname and parts.scheme in ("redis", "rediss", "http", "https"):
                default = {"redis": 6379, "rediss": 6379, "http": 80, "https": 443}[parts.scheme]
                return parts.hostname, parts.port or default
    return None


def _shut_down_connections_to(host: str, port: int) -> int:
    """Shut down this process's established TCP connections to ``host:port``; how many.

    The sockets are found through /proc (Linux): each fd whose socket inode appears in
    /proc/net/tcp{,6} with that remote address. ``shutdown`` on a duplicate acts on the connection
    itself, so the client library sees the server hang up, as if it were killed.
    """
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        return 0
    inodes = _remote_inodes(addresses, port)
    cut = 0
    for fd_name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd_name}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            try:
                with socket.socket(fileno=os.dup(int(fd_name))) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
                cut += 1
            except OSError:
                continue
    return cut


def _remote_inodes(addresses: set[str], port: int) -> set[str]:
    wanted = {_proc_hex(a) for a in addresses}
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            addr, _, hexport = cols[2].partition(":")
            if cols[3] == "01" and int(hexport, 16) == port and addr in wanted:  # 01 = ESTABLISHED
                inodes.add(cols[9])
    return inodes


def _proc_hex(address: str) -> str:
    """An IP address as /proc/net/tcp{,6} prints it (host byte order words, upper-case hex)."""
    if ":" not in address:
        return socket.inet_aton(address)[::-1].hex().upper()
    packed = socket.inet_pton(socket.AF_INET6, address)
    return "".join(packed[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4))
