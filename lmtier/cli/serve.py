"""``lmtier serve --config F --socket PATH [--http HOST:PORT] [--socket-mode MODE]``: the node's shared cache.

Runs :func:`lmtier.server.daemon.serve` until SIGTERM or SIGINT, then drains and exits 0. The
first tier of the config must be a cpu tier (its ``max_bytes`` sizes the shared slab). A live
socket path (another server) or a bad config is a user error: one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging

__all__ = ["add_parser"]

DEFAULT_HTTP = "127.0.0.1:9477"  # lmtier.server.daemon.DEFAULT_HTTP (not imported: --help stays fast)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="run the node's shared KV cache server (one per node; engines connect to it)")
    s.add_argument("--config", required=True, metavar="F",
                   help="tiers YAML; the first tier must be a cpu tier: its max_bytes sizes the shared slab")
    s.add_argument("--socket", required=True, metavar="PATH",
                   help="Unix socket engines connect to (their config: server: unix://PATH)")
    s.add_argument("--http", default=DEFAULT_HTTP, metavar="HOST:PORT",
                   help=f"health, metrics, status and clear over HTTP (default {DEFAULT_HTTP}; port 0 picks one)")
    s.add_argument("--socket-mode", default=0o600, type=_octal, metavar="MODE",
                   help="permissions of the socket file (default 0600: only this user's processes connect)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="level of the server's log lines (default info)")
    s.set_defaults(run=_cmd_serve)


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600 or 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode (0000-0777)")
    return mode


def _cmd_serve(args: argparse.Namespace, _extra: list[str]) -> int:
    import asyncio

    from lmtier.server.daemon import serve

    logging.getLogger("lmtier").setLevel(args.log_level.upper())
    return asyncio.run(serve(args.config, args.socket, args.http, socket_mode=args.socket_mode))
