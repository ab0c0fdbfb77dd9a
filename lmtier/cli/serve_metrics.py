"""``lmtier serve-metrics --port P``: a Prometheus endpoint on the default registry (loopback by default)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from lmtier.errors import LmtierError

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve-metrics", help="serve Prometheus metrics over HTTP until interrupted")
    s.add_argument("--port", type=int, required=True, metavar="P", help="TCP port; 0 picks a free one")
    s.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="address to bind (default: loopback only)")
    s.set_defaults(run=_cmd_serve_metrics)


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
