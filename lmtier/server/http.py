"""The server's HTTP side (aiohttp): health, Prometheus metrics, status, clear.

* ``GET /healthz`` — 200 ``ok`` while serving, 503 while starting or draining.
* ``GET /metrics`` — Prometheus text: per-tier hits, misses, bytes, objects, evictions, errors
  (the manager's metrics) and the server's own: clients, leases, reservations, slab use,
  requests and refused requests by op / error code.
* ``GET /v1/status`` — JSON: ``clients`` and ``leases`` (integers), ``reservations``, ``slab``,
  ``tiers`` (name, backend, bytes, objects, hits, misses, evictions), ``connections``.
* ``POST /v1/clear`` — drop every chunk of the hot tier; JSON ``{"cleared": N, "kept": [...]}``
  naming the colder tiers, which keep their data.

Bound to 127.0.0.1 by default: status and clear are not authenticated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry

    from lmtier.server.cache import SlabCache

__all__ = ["make_app"]


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

    async def clear(_request: web.Request) -> web.Response:
        cleared = await cache.clear()
        kept: list[dict[str, Any]] = [{"tier": t.name, "backend": t.config.backend}
                                      for t in cache.manager.tiers[1:]]
        return web.json_response({"cleared": cleared, "tier": cache.manager.tiers[0].name, "kept": kept})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics), web.get("/v1/status", status),
                    web.post("/v1/clear", clear)])
    return app
