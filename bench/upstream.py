"""The benchmark's upstream: every request gets the same 200-byte JSON answer, as fast as
aiohttp + uvloop can give it (low-level server, no access log, request bodies read and dropped).

    python bench/upstream.py --port 9000 [--host 127.0.0.1] [--reuse-port]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import uvloop
from aiohttp import web

RESPONSE_SIZE = 200


def payload(size: int = RESPONSE_SIZE) -> bytes:
    """A JSON object of exactly ``size`` bytes (padded in its ``note`` field)."""
    document = {
        "id": "ord_0000000001",
        "status": "created",
        "amount": 1250,
        "currency": "EUR",
        "customer": "cus_42",
        "note": "",
    }
    raw = json.dumps(document, separators=(",", ":"))
    document["note"] = "x" * max(0, size - len(raw))
    return json.dumps(document, separators=(",", ":")).encode()


PAYLOAD = payload()


async def handle(request: web.BaseRequest) -> web.Response:
    if request.body_exists:
        await request.read()
    return web.Response(body=PAYLOAD, content_type="application/json")


async def serve(host: str, port: int, reuse_port: bool) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse-port", action="store_true")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.reuse_port))


if __name__ == "__main__":
    main()
