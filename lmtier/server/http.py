"""The server's HTTP side (aiohttp): health, Prometheus metrics, status, clear.

* ``GET /healthz`` — 200 ``ok`` while serving, 503 while starting or draining.
* ``GET /metrics`` — Prometheus text: per-tier hits, misses, bytes, objects, evictions, errors
  (the manager's metrics) and the server's own: clients, leases, reservations, slab use,
  requests and refused requests by op / error code.
* ``GET /v1/status`` — JSON: ``clients`` and ``leases`` (integers), ``reservations``, ``slab``,
  ``tiers`` (name, backend, bytes, objects, hits, misses, evictions), ``connections``.
* ``POST /v1/clear`` — drop every chunk of every tier that can be cleared (the cpu and disk
  tiers; remote stores others share are kept and named); ``?tier=NAME`` (repeatable) clears only
  those tiers, ``?namespace=NS`` (repeatable) only those namespaces' chunks. JSON
  ``{"cleared": {tier: N}, "total": N, "kept": [{"tier", "backend", "reason"}]}``; 400 naming
  the problem (a tier that does not exist or cannot be cleared, a bad namespace), nothing cleared.

Bound to 127.0.0.1 by default: status and clear are not authenticated.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from lmtier.errors import LmtierError
from lmtier.server.protocol import ServerError

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry

    from lmtier.server.cache import SlabCache

__all__ = ["make_app"]

log = logging.getLogger("lmtier.server")


def make_app(cache: SlabCache, registry: CollectorRegistry, serving: Callable[[], bool]) -> web.Application:
    """The HTTP application over ``cache``; ``serving()`` says whether /healthz answers 200."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def healthz(_request: web.Request) -> web.Response:
        if serving():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="not serving (starting or draining)\n")

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(cache.status())

    async def clear(request: web.Request) -> web.Response:
        unknown = sorted(set(request.query) - {"tier", "namespace"})
        if unknown:
            return web.json_response({"error": f"unknown parameter(s) {unknown}; allowed: tier, namespace"},
                                     status=400)
        tiers = request.query.getall("tier", []) or None
        namespaces = request.query.getall("namespace", []) or None
        try:
            per_tier = await cache.clear(tiers, namespaces)
        except ServerError as exc:
            return web.json_response({"error": exc.message}, status=400)
        except LmtierError as exc:  # a tier's fault midway: the tiers before it stay cleared
            log.warning("lmtier serve: POST /v1/clear failed: %s", exc)
            return web.json_response({"error": f"{type(exc).__name__}: {exc}"}, status=503)
        backends = {t.name: t.config.backend for t in cache.manager.tiers}
        kept: list[dict[str, Any]] = [
            {"tier": name, "backend": backends[name], "reason": "cannot be cleared by lmtier (shared with other "
             "processes or hosts): delete its data with the store's own tools"}
            for name, n in per_tier.items() if n is None]
        cleared = {name: n for name, n in per_tier.items() if n is not None}
        return web.json_response({"cleared": cleared, "total": sum(cleared.values()), "kept": kept})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics), web.get("/v1/status", status),
                    web.post("/v1/clear", clear)])
    return app
