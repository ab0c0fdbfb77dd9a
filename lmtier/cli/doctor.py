"""``lmtier doctor``: what works here (torch/CUDA, pinned memory, the transfer path), the config, backends, services."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

from lmtier import __version__
from lmtier.cli._common import (
    EXIT_PROBLEMS,
    backend_status,
    find_binary,
    load_both_phases,
    one_line,
    overrides_in_env,
    plugin_warnings_shown_by_us,
    redact,
)
from lmtier.errors import LmtierError
from lmtier.limits import format_bytes

__all__ = ["add_parser"]


_SERVICES = ("redis-server", "weed")  # binaries the redis / s3 tiers' tests and deployments use


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("doctor", help="check torch/CUDA, the transfer path, the config and the backends")
    d.add_argument("--config", metavar="FILE", help="config to check (default: $LMTIER_CONFIG, else the embedded one)")
    d.add_argument("--faults", metavar="FILE", help="run a short fault drill against the tiers of FILE (a "
                   "killed connection, a corrupted value, a timeout, in a scratch namespace)")
    d.set_defaults(run=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace, _extra: list[str]) -> int:
    with plugin_warnings_shown_by_us():
        if args.faults:
            return _fault_drill(args.faults)
        return _doctor(args)


def _fault_drill(source: str) -> int:
    import asyncio

    from lmtier.cli._fault_drill import run_drill

    print(f"lmtier {__version__} doctor --faults {source}: a fault drill in a scratch namespace")
    problems = asyncio.run(run_drill(source, lambda line: print(line, flush=True)))
    if problems:
        print(f"verdict: NOT OK - {problems} problem(s) above")
        return EXIT_PROBLEMS
    print("verdict: OK - every fault was a miss or a retry, within its deadline, with no wrong value")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    problems: list[str] = []
    notes: list[str] = []

    def row(label: str, value: object) -> None:
        print(f"  {label:<22} {value}")

    print(f"lmtier {__version__} doctor")
    row("python", f"{platform.python_version()} ({sys.executable})")
    row("platform", platform.platform())

    cuda = False
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
        row("torch", torch.__version__)
        if cuda:
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            row("cuda", f"available: {names} (CUDA {torch.version.cuda})")
        else:
            row("cuda", "not available (CPU-only torch or no GPU)")
            notes.append("no CUDA: the cpu tier uses pageable memory and transfers take the torch path")
    except Exception as exc:
        row("torch", f"cannot import: {exc}")
        problems.append(f"torch cannot be imported ({exc}); install lmtier's dependencies")
    row("pinned memory", _pinned_memory_status(cuda))
    row("transfer path", _transfer_status_line())

    print("config")
    cfg = None
    registry = None
    try:
        cfg, options, registry, where = load_both_phases(args.config)
        row("source", where)
        overrides = overrides_in_env()
        if overrides:
            row("env overrides", ", ".join(overrides))
        row("chunk_tokens", cfg.chunk_tokens)
        for tier, opts in zip(cfg.tiers, options, strict=True):
            shown = json.dumps(redact(opts.model_dump(mode="json")), separators=(", ", ": "))
            row(f"tier {tier.name}", f"{tier.backend}, write: {tier.write}, options: {shown}")
            space = _space_note(opts)
            if space:
                row(f"tier {tier.name} disk", space)
                notes.append(f"tier {tier.name}: {space}")
        row("validation", "ok (core schema and every tier's backend options)")
    except LmtierError as exc:
        row("validation", f"FAILED: {one_line(exc)}")
        problems.append(f"config: {one_line(exc)}")

    print("backends")
    if registry is None:
        from lmtier.registry import BackendRegistry

        registry = BackendRegistry.discover()
    configured = {t.backend for t in cfg.tiers} if cfg is not None else set()
    if not registry.autoloaded:
        from lmtier.registry import AUTOLOAD_ENV

        row("discovery", f"off ({AUTOLOAD_ENV} is set): no installed backend is registered")
        notes.append(f"{AUTOLOAD_ENV} is set: only backends registered by hand are available")
    for name in registry.names():
        ok, detail = backend_status(registry, name)
        mark = "installed" if ok else f"NOT importable: {detail}"
        row(name, f"{mark} ({registry.origin(name)})")
        if not ok and name in configured:
            problems.append(f"backend {name!r} is configured but cannot be imported: {detail}")
    for ep, err in sorted(registry.load_errors.items()):
        row(f"plugin {ep}", f"failed to load: {err}")
        notes.append(f"plugin {ep!r} failed to load; its backends are unavailable")

    print("services")
    for binary in _SERVICES:
        row(binary, find_binary(binary) or "not found (only needed by the tier that uses it)")

    if problems:
        print(f"verdict: NOT OK - {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return EXIT_PROBLEMS
    extra = f" ({'; '.join(notes)})" if notes else ""
    print(f"verdict: OK - lmtier can run here with this config{extra}")
    return 0


def _space_note(opts: object) -> str | None:
    """For a tier with a ``root`` directory and ``max_bytes``: a warning when ``max_bytes`` is more
    than its filesystem can give it (free space plus what is already under the root)."""
    root, max_bytes = getattr(opts, "root", None), getattr(opts, "max_bytes", None)
    if not isinstance(root, Path) or not isinstance(max_bytes, int):
        return None
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        st = os.statvfs(existing)
    except OSError:
        return None
    held = _bytes_under(root)
    room = st.f_bavail * st.f_frsize + held
    if max_bytes <= room:
        return None
    return (f"max_bytes {format_bytes(max_bytes)} is more than its filesystem can hold ({format_bytes(room - held)} "
            f"free + {format_bytes(held)} held at {root}): it will evict when the disk fills; lower max_bytes "
            f"to at most {format_bytes(room)}")


def _bytes_under(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _pinned_memory_status(cuda: bool) -> str:
    if not cuda:
        return "no (needs CUDA; the host pool stays pageable)"
    try:
        import torch

        torch.empty(1, dtype=torch.uint8, pin_memory=True)
    except Exception as exc:
        return f"no: {one_line(exc)}"
    return "yes"


def _transfer_status_line() -> str:
    try:
        from lmtier.transfer import transfer_status
    except ImportError as exc:
        return f"unknown (lmtier.transfer not importable: {exc})"
    try:
        st = transfer_status()
    except Exception as exc:
        return f"unknown (transfer_status() failed: {type(exc).__name__}: {exc})"
    if not isinstance(st, Mapping):
        return repr(st)
    line = str(st.get("active", "?"))
    if st.get("reason"):
        line += f" ({st['reason']})"
    if st.get("library"):
        line += f"; library {st['library']}"
        if st.get("library_version"):
            line += f" ({st['library_version']})"
    if st.get("mode"):
        line += (f"; copy mode {st['mode']} (staging {st.get('staging_bytes_d2h', 0) >> 20} MiB device->host, "
                 f"{st.get('staging_bytes_h2d', 0) >> 20} MiB host->device)")
    elif st.get("mode_error"):
        line += f"; {st['mode_error']}"
    flags = [f for f in ("require_native", "disable_native") if st.get(f)]
    if flags:
        line += f"; {', '.join(flags)} set"
    return line
