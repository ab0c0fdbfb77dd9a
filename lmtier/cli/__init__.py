"""The ``lmtier`` command line: one module per command, shared helpers in :mod:`lmtier.cli._common`.

::

    lmtier doctor                         what works here: torch/CUDA, transfer path, config, backends
    lmtier doctor --faults FILE           a fault drill against FILE's tiers, in a scratch namespace
    lmtier backends                       every registered backend, installed or not
    lmtier config validate FILE           both validation phases; exit 2 names the bad key
    lmtier check-backend NAME --options F the conformance suite against an installed backend
    lmtier bench [--config F]             per-tier put/get throughput vs memcpy and raw files
    lmtier demo [...]                     lmtier.demo.run_demo if present, else the storage demo
    lmtier serve --config F --socket P    the node's shared cache server (engines: server: unix://P)
    lmtier serve-metrics --port P         Prometheus endpoint on the default registry (loopback)

Exit codes: 0 success; 1 the command ran and found problems (doctor, demo); 2 a user error. Every
:class:`~lmtier.errors.LmtierError` is a user error: one line on stderr, no traceback.

A command module exposes ``add_parser(sub)``, which adds its sub-parser and sets ``run`` (called as
``run(args, extra)``, returning the exit code) and, for a command that parses its own arguments,
``passes_extra=True``. Adding a command is one module and one line in :data:`COMMANDS`. Command
modules import only the standard library at module level: ``lmtier --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lmtier import __version__
from lmtier.cli import backends, bench, check_backend, config, demo, doctor, serve, serve_metrics
from lmtier.cli._common import EXIT_USAGE, QWEN3_8B_CHUNK_BYTES, one_line, parse_size, setup_logging
from lmtier.cli.demo import demo_dir, storage_demo
from lmtier.errors import LmtierError

__all__ = ["COMMANDS", "QWEN3_8B_CHUNK_BYTES", "demo_dir", "main", "parse_size", "storage_demo"]

#: The command modules, in the order ``lmtier --help`` lists them.
COMMANDS = (doctor, backends, config, check_backend, bench, demo, serve, serve_metrics)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = _build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        args, extra = parser.parse_known_args(args_list)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if extra and not getattr(args, "passes_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(args.run(args, extra) or 0)
    except SystemExit as exc:  # argparse (usage errors, --help) and sub-parsers
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except LmtierError as exc:
        print(f"lmtier: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lmtier: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtier", description="lmtier: tiered KV-cache storage for LLM serving")
    p.add_argument("--version", action="version", version=f"lmtier {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p
