"""The peer: an application that makes itself idempotent in-app with the
asgi-idempotency-header middleware (its Redis backend), under uvicorn.

``POST /orders`` (and every other path) answers the benchmark's 200-byte JSON document
(bench/upstream.py's), so a replay returns the same bytes as idemproxy's. The middleware keys
the response on the ``Idempotency-Key`` header: a set member for the key plus two strings (the
JSON answer and its status code) with a 24 h expiry.

    python bench/peer_app.py --port 8083 --redis redis://127.0.0.1:6379/0

uvicorn runs one process on uvloop and httptools, with its access log off (a cost idemproxy's
rows do pay: they log to a file).
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from idempotency_header_middleware import IdempotencyHeaderMiddleware
from idempotency_header_middleware.backends import RedisBackend
from upstream import PAYLOAD

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def orders(scope: Scope, receive: Receive, send: Send) -> None:
    """A plain ASGI endpoint: drain the body, answer the 200-byte JSON."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = bool(message.get("more_body"))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(PAYLOAD)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": PAYLOAD})


def app(redis_url: str) -> IdempotencyHeaderMiddleware:
    backend = RedisBackend(aioredis.Redis.from_url(redis_url))
    return IdempotencyHeaderMiddleware(orders, backend=backend)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True, help="redis:// URL")
    args = parser.parse_args()
    uvicorn.run(
        app(args.redis),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=1024,
    )


if __name__ == "__main__":
    main()
