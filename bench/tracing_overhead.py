"""What tracing costs per request: off (the shipped default) and on, in one process.

    python bench/tracing_overhead.py                  # off, on, unsampled: about 45 s
    python bench/tracing_overhead.py --modes off      # e.g. against an older checkout:
    PYTHONPATH=/path/to/old/checkout python bench/tracing_overhead.py --modes off

Everything runs in this process on one event loop, on 127.0.0.1: a minimal upstream (a fixed
201 answer), a ``ProxyServer`` on the memory store with the access log off, and a client that
sends one request at a time on a keep-alive connection. With ``on``, spans go to a local sink
that answers 200 to every export; ``unsampled`` is tracing on with ``sample_ratio: 0`` (spans
made and propagated, none exported). Per scenario (pass-through GET, new keys, replays) it prints
the CPU time per request (all threads of the process: client and upstream included, so compare
rows, not absolute figures; median and best of the rounds) and the Python function calls per
request (cProfile, deterministic: the clearest sign of work added to the request path).
Every run is bounded by its request count.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import logging
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import cast

import idemproxy
from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text

HOST = "127.0.0.1"
ANSWER = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class CreatedUpstream(asyncio.Protocol):
    """Answers 201 to every request head it receives (requests here have tiny bodies in one
    read). bench/instructions.py uses it too."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(ANSWER * data.count(b"HTTP/1.1\r\n"))


class _Sink(asyncio.Protocol):
    """An OTLP/HTTP endpoint that takes every export (one per connection read) and answers 200."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        while b"\r\n\r\n" in self.pending:
            head, _, rest = self.pending.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.pending = rest[length:]
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    async def send(self, request: bytes) -> None:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        assert head.startswith(b"HTTP/1.1 201"), head[:40]

    def close(self) -> None:
        self.writer.close()


def post(key: str | None, path: str = "/orders") -> bytes:
    """A 13-byte JSON POST, with ``key`` as its Idempotency-Key (None: without one)."""
    key_line = f"Idempotency-Key: {key}\r\n" if key else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: bench\r\n{key_line}"
        'Content-Type: application/json\r\nContent-Length: 13\r\n\r\n{"sku":"tea"}'
    ).encode()


PASS = b"GET /items/1 HTTP/1.1\r\nHost: bench\r\n\r\n"
_serial = itertools.count()


def scenarios() -> dict[str, Callable[[], bytes]]:
    return {
        "pass-through": lambda: PASS,
        "new keys": lambda: post(f"new-{next(_serial)}"),
        "replays": lambda: post(f"replay-{next(_serial) % 100}"),
    }


async def measure(mode: str, requests: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(CreatedUpstream, HOST, 0)
    sink = await loop.create_server(_Sink, HOST, 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    sink_port = sink.sockets[0].getsockname()[1]
    policy = ""
    if mode != "off":
        ratio = ", sample_ratio: 0" if mode == "unsampled" else ""
        policy = f"tracing: {{endpoint: 'http://{HOST}:{sink_port}'{ratio}}}\n"
    config = load_text(
        policy,
        flags=Overrides(
            listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=f"http://{HOST}:{upstream_port}"
        ),
    )
    server = ProxyServer(config)
    await server.start()
    client = Client(server.address[1])
    await client.open()
    results = {}
    try:
        for name, make in scenarios().items():
            for _ in range(500):  # warm-up; replays: every key stored
                await client.send(make())
            cpu = []
            for _ in range(rounds):
                started = time.process_time()
                for _ in range(requests):
                    await client.send(make())
                cpu.append((time.process_time() - started) / requests * 1e6)
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(1000):
                await client.send(make())
            profile.disable()
            calls = pstats.Stats(profile).total_calls / 1000  # type: ignore[attr-defined]
            results[name] = (statistics.median(cpu), min(cpu), calls)
    finally:
        client.close()
        await server.stop()
        upstream.close()
        sink.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="off,on,unsampled")
    parser.add_argument("--requests", type=int, default=3000, help="per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    logging.getLogger("idemproxy.access").setLevel(logging.WARNING)  # the access log off
    print(f"idemproxy from {os.path.dirname(idemproxy.__file__)}", file=sys.stderr)
    print("| tracing | scenario | CPU µs/req (median) | CPU µs/req (best) | calls/req |")
    print("|---|---|---:|---:|---:|")
    for mode in args.modes.split(","):
        try:
            import uvloop
        except ImportError:
            results = asyncio.run(measure(mode, args.requests, args.rounds))
        else:
            results = uvloop.run(measure(mode, args.requests, args.rounds))
        for name, (median, best, calls) in results.items():
            print(f"| {mode} | {name} | {median:.1f} | {best:.1f} | {calls:.0f} |")


if __name__ == "__main__":
    main()
