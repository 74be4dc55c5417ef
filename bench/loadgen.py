"""Fallback load generator, used by bench/run.py when ``wrk`` is not installed (or with
``--loadgen python``); also sends the keys that a replay run needs stored beforehand.

N concurrent tasks share one aiohttp ClientSession with N pooled connections; each task sends
its next request as soon as the previous answer is read (closed loop, like wrk). A run ends at
``--duration`` seconds or after ``--max-requests`` requests, whichever comes first. Latency is
measured per request with ``time.perf_counter`` around send-and-read-body. It runs on uvloop in
one process, so it saturates one core at a few thousand requests per second: figures taken with
it are lower than with wrk, and say so in the table's header.

Modes mirror the wrk scripts: ``get`` (pass-through), ``post`` and ``put-large`` (an unkeyed
POST of the small JSON body, a PUT of 1 MiB, as bench/body.lua), ``new`` (unique Idempotency-Key per
request, as bench/new_keys.lua), ``replay`` (keys cycled from a fixed set, as
bench/replay_keys.lua).

    python bench/loadgen.py --url http://127.0.0.1:8080/orders --mode new -c 64 -d 10 --json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
import uuid
from dataclasses import asdict, dataclass

import aiohttp
import uvloop

BODY = b'{"sku":"tea","qty":1}'
JSON_HEADERS = {"Content-Type": "application/json"}
LARGE_BODY = b"x" * 1024 * 1024
OCTET_HEADERS = {"Content-Type": "application/octet-stream"}


@dataclass(frozen=True, slots=True)
class LoadResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


async def drive(
    url: str,
    mode: str,
    connections: int,
    duration: float,
    max_requests: int | None = None,
    run_id: str | None = None,
    replay_prefix: str = "replay",
    replay_keys: int = 1000,
) -> LoadResult:
    prefix = run_id or uuid.uuid4().hex[:12]
    counter = itertools.count(1)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + duration

        async def worker(task_id: int) -> None:
            nonlocal errors
            replay_index = (task_id * 7919) % replay_keys
            while time.perf_counter() < deadline:
                number = next(counter)
                if max_requests is not None and number > max_requests:
                    return
                if mode == "get":
                    method, headers, data = "GET", None, None
                elif mode == "post":
                    method, headers, data = "POST", JSON_HEADERS, BODY
                elif mode == "put-large":
                    method, headers, data = "PUT", OCTET_HEADERS, LARGE_BODY
                elif mode == "new":
                    headers = {**JSON_HEADERS, "Idempotency-Key": f"{prefix}-{number}"}
                    method, data = "POST", BODY
                else:
                    replay_index = (replay_index + 1) % replay_keys
                    key = f"{replay_prefix}-{replay_index}"
                    method, headers, data = "POST", {**JSON_HEADERS, "Idempotency-Key": key}, BODY
                sent = time.perf_counter()
                try:
                    async with session.request(method, url, headers=headers, data=data) as resp:
                        await resp.read()
                        if resp.status >= 400:
                            errors += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.wait_for(
            asyncio.gather(*(worker(i) for i in range(connections))), timeout=duration + 30
        )
        elapsed = time.perf_counter() - started
    latencies.sort()
    return LoadResult(
        requests=len(latencies),
        seconds=elapsed,
        rps=len(latencies) / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=errors,
    )


@dataclass(frozen=True, slots=True)
class SeedResult:
    statuses: dict[int, int]
    replayed: int


async def send_keys(url: str, keys: list[str], concurrency: int = 32) -> SeedResult:
    """POST the benchmark body once per key; count statuses and ``Idempotent-Replayed``."""
    statuses: dict[int, int] = {}
    replayed = 0
    queue = iter(keys)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:

        async def worker() -> None:
            nonlocal replayed
            for key in queue:
                headers = {**JSON_HEADERS, "Idempotency-Key": key}
                async with session.post(url, data=BODY, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.headers.get("Idempotent-Replayed") == "true":
                        replayed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return SeedResult(statuses, replayed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument(
        "--mode", choices=("get", "post", "put-large", "new", "replay"), default="get"
    )
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--max-requests", type=int)
    parser.add_argument("--run-id", help="prefix of new keys (default: random)")
    parser.add_argument("--replay-prefix", default="replay")
    parser.add_argument("--replay-keys", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = uvloop.run(
        drive(
            args.url,
            args.mode,
            args.connections,
            args.duration,
            args.max_requests,
            args.run_id,
            args.replay_prefix,
            args.replay_keys,
        )
    )
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(
            f"{result.requests} requests in {result.seconds:.2f}s: {result.rps:.0f} req/s, "
            f"p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms, {result.errors} errors"
        )


if __name__ == "__main__":
    main()
