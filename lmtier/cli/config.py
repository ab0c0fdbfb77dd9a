"""``lmtier config validate FILE``: both validation phases (core schema, then each tier's backend options)."""

from __future__ import annotations

import argparse

from lmtier.cli._common import load_both_phases, overrides_in_env

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("config", help="configuration tools")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cv = csub.add_parser("validate", help="validate a YAML config file (core schema, then backend options)")
    cv.add_argument("file", metavar="FILE")
    cv.set_defaults(run=_cmd_config_validate)


def _cmd_config_validate(args: argparse.Namespace, _extra: list[str]) -> int:
    cfg, _, _, where = load_both_phases(args.file)
    chain = " -> ".join(f"{t.name} ({t.backend}, write: {t.write})" for t in cfg.tiers)
    print(f"{where}: OK (core schema and backend options)")
    print(f"  chunk_tokens: {cfg.chunk_tokens}")
    if cfg.server is not None:  # the tiers live in lmtier serve; these deadlines bound each call to it
        deadlines = ", ".join(f"{kind} {seconds:g} s" for kind, seconds in cfg.server_timeout_s.model_dump().items())
        print(f"  server: {cfg.server} (the tiers are the server's)")
        print(f"  server deadlines: {deadlines}")
    else:
        print(f"  tiers: {chain}")
    overrides = overrides_in_env()
    if overrides:
        print(f"  applied environment overrides: {', '.join(overrides)}")
    return 0
