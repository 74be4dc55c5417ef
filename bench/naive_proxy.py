"""The naive idempotency proxy: what a first attempt looks like, as a yardstick for idemproxy.

An aiohttp + uvloop reverse proxy (one shared ClientSession, no access log) that, for a request
with an ``Idempotency-Key`` header, does ``SET key "" NX EX ttl`` in Redis: if the key is new it
forwards the request, reads the answer and stores it as one JSON string (status, content type,
body) under the key; if the key exists it ``GET``s the stored answer and replays it (409 while
the first request is still in flight). No leases, no fencing, no fingerprint, no scope: two
round trips for a new key, two for a replay. Requests without a key are forwarded as they are.

    python bench/naive_proxy.py --port 8082 --upstream http://127.0.0.1:9000 \\
        --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import json

import aiohttp
import redis.asyncio as aioredis
import uvloop
from aiohttp import web
from minimal_proxy import serve_until_signalled

TTL_SECONDS = 24 * 3600
FORWARDED = ("Content-Type", "Content-Length")


class NaiveProxy:
    def __init__(self, upstream: str, redis_url: str) -> None:
        self.base = upstream.rstrip("/")
        self.redis = aioredis.Redis.from_url(redis_url)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.redis.aclose()

    async def forward(self, request: web.BaseRequest) -> tuple[int, str, bytes]:
        assert self._session is not None
        headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
        async with self._session.request(
            request.method,
            self.base + request.raw_path,
            headers=headers,
            data=await request.read() if request.body_exists else None,
        ) as upstream:
            body = await upstream.read()
            return upstream.status, upstream.content_type, body

    async def handle(self, request: web.BaseRequest) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if key is None:
            status, content_type, body = await self.forward(request)
            return web.Response(status=status, body=body, content_type=content_type)
        redis_key = "naive:" + key
        if not await self.redis.set(redis_key, b"", nx=True, ex=TTL_SECONDS):
            stored = await self.redis.get(redis_key)
            if not stored:
                return web.json_response({"error": "in flight"}, status=409)
            answer = json.loads(stored)
            return web.Response(
                status=answer["status"],
                text=answer["body"],
                content_type=answer["content_type"],
                headers={"Idempotent-Replayed": "true"},
            )
        status, content_type, body = await self.forward(request)
        text = body.decode()
        record = {"status": status, "content_type": content_type, "body": text}
        await self.redis.set(redis_key, json.dumps(record, separators=(",", ":")), ex=TTL_SECONDS)
        return web.Response(status=status, text=text, content_type=content_type)


async def serve(host: str, port: int, upstream: str, redis_url: str) -> None:
    await serve_until_signalled(NaiveProxy(upstream, redis_url), host, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="upstream base URL")
    parser.add_argument("--redis", required=True, help="redis:// URL")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.upstream, args.redis))


if __name__ == "__main__":
    main()
