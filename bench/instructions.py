"""Instructions per request, counted by valgrind: an A/B that a busy machine cannot blur.

    python bench/instructions.py                          # every scenario, this checkout
    PYTHONPATH=/path/to/old/checkout python bench/instructions.py --scenarios new,replay

CPU time per request moved twofold this session on 2 cores shared with other work; callgrind's
instruction count (Ir) is the same twice for the same code and inputs, whatever else runs. Each
scenario runs in one uvloop process under ``valgrind --tool=callgrind`` twice, for ``--small``
and ``--large`` requests: (Ir_large - Ir_small) / (large - small) is the cost of one request with
start-up and imports subtracted. In that process: a client sending one request at a time on one
keep-alive connection, idemproxy on the memory store with the access log off, and an upstream
answering 201 at once, all on 127.0.0.1; so compare commits, not absolute figures. About a
minute per scenario and checkout; every run is bounded by its request count.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

from tracing_overhead import HOST, PASS, Client, CreatedUpstream, post

import idemproxy
from idemproxy.app import ProxyServer
from idemproxy.config import Overrides, load_text

WARM_UP = 200

_serial = itertools.count()
SCENARIOS: dict[str, Callable[[], bytes]] = {
    "pass-get": lambda: PASS,
    "pass-post": lambda: post(None, "/upload"),
    "new": lambda: post(f"new-{next(_serial):08d}"),
    "replay": lambda: post(f"replay-{next(_serial) % 100:06d}"),
}


async def serve_requests(scenario: str, count: int) -> None:
    """The measured process: ``count`` requests (after a warm-up) through a fresh proxy."""
    logging.getLogger("idemproxy.access").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(CreatedUpstream, HOST, 0)
    port = upstream.sockets[0].getsockname()[1]
    flags = Overrides(listen=f"{HOST}:0", admin=f"{HOST}:0", upstream=f"http://{HOST}:{port}")
    server = ProxyServer(load_text("", flags=flags))
    await server.start()
    client = Client(server.address[1])
    await client.open()
    make = SCENARIOS[scenario]
    for _ in range(WARM_UP + count):
        await client.send(make())
    client.close()
    await server.stop()
    upstream.close()


def instructions(scenario: str, count: int) -> int:
    """Ir of one whole process serving ``count`` requests of ``scenario``."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--serve",
            scenario,
            str(count),
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
    parser.add_argument("--serve", nargs=2, metavar=("SCENARIO", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve_requests(args.serve[0], int(args.serve[1])))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    print(f"idemproxy from {os.path.dirname(idemproxy.__file__)}", file=sys.stderr)
    print("| scenario | instructions per request |")
    print("|---|---:|")
    for scenario in args.scenarios.split(","):
        small, large = instructions(scenario, args.small), instructions(scenario, args.large)
        per_request = (large - small) // (args.large - args.small)
        print(f"| {scenario} | {per_request:,} |", flush=True)


if __name__ == "__main__":
    main()
