"""A tiny orders API to try idemproxy against: ``python -m idemproxy.demo [--port 8000]``.

Every POST creates an order with a new number, so a duplicate that got through would show.
"""

from __future__ import annotations

import argparse

from aiohttp import web

_ORDERS = web.AppKey("orders", list[bytes])


async def create(request: web.Request) -> web.Response:
    payload = await request.read()
    orders = request.app[_ORDERS]
    orders.append(payload)
    number = len(orders)
    response = web.json_response(
        {"order": number, "received": payload.decode("utf-8", "replace")}, status=201
    )
    response.headers["Location"] = f"/orders/{number}"
    return response


async def show(request: web.Request) -> web.Response:
    number = int(request.match_info["number"])
    orders = request.app[_ORDERS]
    if not 1 <= number <= len(orders):
        raise web.HTTPNotFound()
    return web.json_response(
        {"order": number, "received": orders[number - 1].decode("utf-8", "replace")}
    )


def create_app() -> web.Application:
    app = web.Application()
    app[_ORDERS] = []
    app.router.add_post("/orders", create)
    app.router.add_get("/orders/{number:\\d+}", show)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="idemproxy demo upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    web.run_app(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
