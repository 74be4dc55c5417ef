"""The Python ceiling: a minimal aiohttp + uvloop reverse proxy and nothing else.

One shared ClientSession (pooled keep-alive connections), request and response bodies streamed,
hop-by-hop headers dropped, no logging, no metrics. With ``--reuse-port`` several processes can
share one port through SO_REUSEPORT (the kernel spreads connections over them).

    python bench/minimal_proxy.py --port 8081 --upstream http://127.0.0.1:9000 [--reuse-port]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Protocol

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class MinimalProxy:
    def __init__(self, upstream: str, max_connections: int) -> None:
        self.base = upstream.rstrip("/")
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._session is not None
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in HOP_BY_HOP
        )
        async with self._session.request(
            request.method,
            URL(self.base + request.raw_path, encoded=True),
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


class BenchProxy(Protocol):
    """What ``serve_until_signalled`` runs: this proxy, or bench/naive_proxy.py's."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse: ...


async def serve(host: str, port: int, upstream: str, reuse_port: bool, pool: int) -> None:
    await serve_until_signalled(MinimalProxy(upstream, pool), host, port, reuse_port)


async def serve_until_signalled(
    proxy: BenchProxy, host: str, port: int, reuse_port: bool = False
) -> None:
    """Start ``proxy`` on host:port and serve until SIGTERM or SIGINT."""
    await proxy.start()
    runner = web.ServerRunner(web.Server(proxy.handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="upstream base URL")
    parser.add_argument("--reuse-port", action="store_true")
    parser.add_argument("--max-connections", type=int, default=256, help="upstream pool size")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.upstream, args.reuse_port, args.max_connections))


if __name__ == "__main__":
    main()
