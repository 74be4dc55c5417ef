"""The admin listener: liveness and readiness, on its own port."""

from __future__ import annotations

import asyncio

from aiohttp import web

from idemproxy.errors import StoreUnavailable
from idemproxy.store import Store

STORE_KEY = web.AppKey("store", Store)
READY_TIMEOUT = 2.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready only while the store answers, so traffic follows the store both ways."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[STORE_KEY].ping()
    except (StoreUnavailable, TimeoutError):
        return web.json_response({"status": "unavailable", "store": "down"}, status=503)
    return web.json_response({"status": "ready"})


def create_admin_app(store: Store) -> web.Application:
    app = web.Application()
    app[STORE_KEY] = store
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
