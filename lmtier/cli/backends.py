"""``lmtier backends``: every registered backend, installed or not, with its install hint."""

from __future__ import annotations

import argparse

from lmtier.cli._common import backend_status, format_table, plugin_warnings_shown_by_us

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("backends", help="list every registered backend and whether it is installed")
    b.set_defaults(run=_cmd_backends)


def _cmd_backends(_args: argparse.Namespace, _extra: list[str]) -> int:
    from lmtier.registry import BackendRegistry

    with plugin_warnings_shown_by_us():
        registry = BackendRegistry.discover()
    rows = []
    problems = []
    for name in registry.names():
        spec = registry.spec(name)
        ok, detail = backend_status(registry, name)
        rows.append([name, registry.origin(name), "yes" if ok else "no", spec.install_hint or "-",
                     spec.description or ""])
        if not ok:
            problems.append(f"  {name}: {detail}")
    print(format_table(["NAME", "ORIGIN", "INSTALLED", "INSTALL HINT", "DESCRIPTION"], rows))
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
