"""Instructions per request, counted by valgrind: an A/B that a busy machine cannot blur.

    python bench/instructions.py                          # every scenario, this checkout
    PYTHONPATH=/path/to/old/checkout python bench/instructions.py --scenarios new,replay
    python bench/instructions.py --store redis --scenarios new,replay   # on a redis-server
    python bench/instructions.py --proxy minimal --scenarios pass-put     # bench/minimal_proxy.py

CPU time per request moved twofold this session on 2 cores shared with other work; callgrind's
instruction count (Ir) is the same twice for the same code and inputs, whatever else runs. Each
scenario runs in one uvloop process under ``valgrind --tool=callgrind`` twice, for ``--small``
and ``--large`` requests: (Ir_large - Ir_small) / (large - small) is the cost of one request with
start-up and imports subtracted. In that process: a client sending one request at a time on one
keep-alive connection, idemproxy on the memory store (``--store redis``: on a redis-server this
script starts on a free port, whose own instructions are not counted) with the access log off,
and an upstream answering 201 at once, all on 127.0.0.1; so compare commits, not absolute
figures. ``--proxy minimal`` puts bench/minimal_proxy.py's pass-through (no store, no policy) in
idemproxy's place, for the pass-* scenarios side by side. ``pass-put`` sends a 1 MiB body
(``pass-put-chunked``: the same in 64 KiB chunks), which the upstream answers once it has all
arrived, as bench/upstream.py does (use smaller counts: ``--small 20 --large 120``). About a
minute per scenario and checkout; every run is bounded by its request count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import cast

from aiohttp import web
from contenders import free_port, redis_binary, wait_port
from minimal_proxy import MinimalProxy
from tracing_overhead import ANSWER, HOST, PASS, Client, CreatedUpstream, post

import idemproxy
from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text

WARM_UP = 200
MIB = 1024 * 1024
PUT_1_MIB = (
    f"PUT /files/1 HTTP/1.1\r\nHost: bench\r\nContent-Length: {MIB}\r\n\r\n".encode() + b"x" * MIB
)

PUT_1_MIB_CHUNKED = (  # the same body in 16 chunks of 64 KiB
    b"PUT /files/1 HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n\r\n"
    + (b"10000\r\n" + b"x" * 0x10000 + b"\r\n") * (MIB // 0x10000)
    + b"0\r\n\r\n"
)

_serial = itertools.count()
SCENARIOS: dict[str, Callable[[], bytes]] = {
    "pass-get": lambda: PASS,
    "pass-post": lambda: post(None, "/upload"),
    "pass-put": lambda: PUT_1_MIB,
    "pass-put-chunked": lambda: PUT_1_MIB_CHUNKED,
    "new": lambda: post(f"new-{next(_serial):08d}"),
    "replay": lambda: post(f"replay-{next(_serial) % 100:06d}"),
}


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_LAST_CHUNK = b"\r\n0\r\n\r\n"


class WholeBodyUpstream(asyncio.Protocol):
    """Answers 201 once a request's whole body has arrived (its Content-Length, or chunked up to
    the last chunk), as most APIs do: answered at its head, an upload is cut short by the proxy
    (it stops sending once the answer came), which would measure less than a whole PUT. One
    request at a time per connection, each head in one segment: what the scenarios send."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.left: int | None = None  # body bytes still to come; None: between requests
        self.tail = b""  # a chunked body's last bytes seen

    def data_received(self, data: bytes) -> None:
        if self.left is None:
            head, _, data = data.partition(b"\r\n\r\n")
            length = _CONTENT_LENGTH.search(head)
            self.left, self.tail = (int(length[1]) if length else -1), b"\r\n"
        if self.left >= 0:
            self.left -= len(data)
            done = self.left <= 0
        else:  # chunked: the body is all "x", so its end is the only match
            self.tail = (self.tail + data)[-len(_LAST_CHUNK) :]
            done = self.tail == _LAST_CHUNK
        if done:
            self.left = None
            self.transport.write(ANSWER)


@contextlib.asynccontextmanager
async def idemproxy_serving(upstream: str, store: str) -> AsyncIterator[int]:
    """idemproxy on a free port, the access log off: its port."""
    logging.getLogger("idemproxy.access").setLevel(logging.WARNING)
    flags = Overrides(listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=upstream, store=store)
    server = ProxyServer(load_text("", flags=flags))
    await server.start()
    try:
        yield server.address[1]
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def minimal_serving(upstream: str, store: str) -> AsyncIterator[int]:
    """bench/minimal_proxy.py's proxy on a free port (``store`` unused): its port."""
    proxy = MinimalProxy(upstream, max_connections=256)
    await proxy.start()
    runner = web.ServerRunner(web.Server(proxy.handle, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
        await proxy.close()


PROXIES = {"idemproxy": idemproxy_serving, "minimal": minimal_serving}


async def serve_requests(proxy: str, scenario: str, count: int, store: str) -> None:
    """The measured process: ``count`` requests (after a warm-up) through a fresh proxy."""
    loop = asyncio.get_running_loop()
    uploads = scenario.startswith("pass-put")
    upstream = await loop.create_server(WholeBodyUpstream if uploads else CreatedUpstream, HOST, 0)
    upstream_url = f"http://{HOST}:{upstream.sockets[0].getsockname()[1]}"
    async with PROXIES[proxy](upstream_url, store) as port:
        client = Client(port)
        await client.open()
        make = SCENARIOS[scenario]
        warm_up = 10 if uploads else WARM_UP
        for _ in range(warm_up + count):
            await client.send(make())
        client.close()
    upstream.close()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, without persistence: its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [redis_binary(), "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(port, [proc])
        yield f"redis://{HOST}:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def instructions(proxy: str, scenario: str, count: int, store: str) -> int:
    """Ir of one whole process serving ``count`` requests of ``scenario`` through ``proxy``."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--serve",
            proxy,
            scenario,
            str(count),
            store,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts run to run
    )
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from valgrind: {result.stderr[-500:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--large", type=int, default=1300)
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument("--proxy", choices=PROXIES, default="idemproxy")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)  # proxy, scenario, count, store
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    if args.serve:
        import uvloop

        proxy, scenario, count, store = args.serve
        uvloop.run(serve_requests(proxy, scenario, int(count), store))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    if args.proxy == "minimal" and not all(name.startswith("pass-") for name in scenarios):
        sys.exit("the minimal proxy has no keys: --scenarios pass-get,pass-post,pass-put")
    print(f"idemproxy from {os.path.dirname(idemproxy.__file__)}", file=sys.stderr)
    print("| scenario | instructions per request |")
    print("|---|---:|")
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(redis_server()) if args.store == "redis" else "memory://"
        for scenario in scenarios:
            small = instructions(args.proxy, scenario, args.small, store)
            large = instructions(args.proxy, scenario, args.large, store)
            per_request = (large - small) // (args.large - args.small)
            print(f"| {scenario} | {per_request:,} |", flush=True)


if __name__ == "__main__":
    main()
