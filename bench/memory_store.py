"""The memory store in process (no network): bytes per key and latency as the key count grows.

    python bench/memory_store.py                       # 1,000 and 1,000,000 keys, both layouts
    python bench/memory_store.py --keys 1000,100000 --baseline none

Issue 18 goal 5: at most 600 bytes per key beyond the stored answer, and the p99 of a new key at
1,000,000 keys at most twice its p99 at 1,000 keys.

For each layout and key count, a fresh child process:

1. fills a ``MemoryStore`` to N keys with acquire + complete (a sha256-hex key with the default
   ``idem:`` prefix, a sha256-hex fingerprint, a ``<16 hex>-<n>`` token, a 200-byte answer with
   three headers: about 300 bytes encoded), under ``tracemalloc``; bytes per key is the traced
   growth over N minus the encoded answer's length (the key strings count: the store keeps them);
2. stops tracemalloc, then runs new keys through the store on an event loop with C concurrent
   tasks (1 and 64): each task builds what a request handler allocates (a header dict, a list of
   header tuples, a parsed-body dict, kept alive for the last thousand requests; a few small
   containers in a reference cycle, garbage at once), yields, acquires, yields, completes. A
   task's latency runs from its start to its completion, so a collector pause delays every task
   in flight, as in the proxy. gen0/gen1/gen2 collections happen by themselves (no gc tuning).
   Each op is also timed in this process's CPU time (``cpu99``), which a busy machine does not
   inflate; the longest gen2 collections are reported in CPU time too.

The baseline layout is the ``MemoryStore`` of ``--baseline`` (a git revision, default the commit
before the packed layout) loaded from ``git show`` into a temporary module. Every loop is
bounded in count and in time (``--fill-seconds``, ``--run-seconds``); a fill stopped by time
reports the count it reached.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from idemproxy.records import StoredResponse, encode_response  # noqa: E402

BASELINE = "5645679"  # main before the packed layout (dataclass entries and a tuple heap)
LOCK_TTL = 30.0
TTL = 24 * 3600.0
ANSWER = StoredResponse(
    201,
    [
        ("Content-Type", "application/json"),
        ("Location", "/orders/12345"),
        ("X-Request-Id", "4f1c0b9e-7a52-4b8e-9d3c-2a6f1e0d5b77"),
    ],
    b'{"id":12345,"status":"created","items":[' + b'{"sku":"A-1","qty":1},' * 6 + b"]}",
)
ANSWER_BYTES = len(encode_response(ANSWER))
TOKEN_PREFIX = os.urandom(8).hex()


def load_store(layout: str) -> Any:
    if layout == "packed":
        from idemproxy.store.memory import MemoryStore

        return MemoryStore
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{layout}:idemproxy/store/memory.py"],
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("baseline_memory_store", file.name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    os.unlink(file.name)
    return module.MemoryStore


def run(coroutine: Any) -> Any:
    """Run a coroutine that never awaits (every store method): no event loop needed."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the store awaited")


def key_of(n: int) -> tuple[str, str, str]:
    digest = hashlib.sha256(n.to_bytes(8, "big")).hexdigest()
    fingerprint = hashlib.sha256(b"fp" + n.to_bytes(8, "big")).hexdigest()
    return "idem:" + digest, fingerprint, f"{TOKEN_PREFIX}-{n}"


def fill(store: Any, keys: int, seconds: float) -> int:
    stop = time.monotonic() + seconds
    n = 0
    while n < keys:
        if n % 4096 == 0 and time.monotonic() > stop:
            break
        key, fingerprint, token = key_of(n)
        assert run(store.acquire(key, fingerprint, token, LOCK_TTL)) is None
        assert run(store.complete(key, token, ANSWER, TTL))
        n += 1
    return n


def handler_garbage(n: int, kept: collections.deque[Any]) -> None:
    """What a request handler allocates: headers and a parsed body, kept alive for the last
    ``kept.maxlen`` requests (connections and logs keep theirs a while: they live long enough
    to reach the oldest generation, then go by reference counting), and a few containers in a
    reference cycle (a task, its future, their callbacks) that only the collector frees. The
    collections, gen2 included, happen by themselves."""
    headers = {f"X-Header-{i}": f"value-{n}-{i}" for i in range(12)}
    body = {"id": n, "items": [{"sku": f"A-{i}", "qty": i} for i in range(4)]}
    kept.append({"headers": headers, "pairs": list(headers.items()), "body": body})
    task: list[Any] = [n]
    future = {"task": task, "callbacks": [task], "state": "done"}
    task.append({"future": future, "context": {}})  # the cycle: garbage once this returns


async def latencies(store: Any, first: int, concurrency: int, ops: int, seconds: float) -> Any:
    stop = time.monotonic() + seconds
    kept: collections.deque[Any] = collections.deque(maxlen=1000)
    took: list[float] = []  # wall time from a task's start to its completion
    cpu_took: list[float] = []  # this process's CPU time over the same span: no other process
    counter = iter(range(first, first + ops))
    pauses: list[list[float]] = [[], [], []]  # per generation, seconds
    started = [0.0]

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()  # CPU time: other processes do not count
        else:
            pauses[info["generation"]].append(time.process_time() - started[0])

    gc.callbacks.append(timer)

    async def client() -> None:
        for n in counter:
            if time.monotonic() > stop:
                return
            start = time.perf_counter()
            cpu = time.process_time()
            handler_garbage(n, kept)
            key, fingerprint, token = key_of(n)
            await asyncio.sleep(0)
            assert await store.acquire(key, fingerprint, token, LOCK_TTL) is None
            await asyncio.sleep(0)
            assert await store.complete(key, token, ANSWER, TTL)
            took.append(time.perf_counter() - start)
            cpu_took.append(time.process_time() - cpu)

    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        gc.callbacks.remove(timer)
    took.sort()
    cpu_took.sort()
    return {
        "cpu_p99_ms": cpu_took[int(len(cpu_took) * 0.99)] * 1000,
        "ops": len(took),
        "p50_ms": statistics.median(took) * 1000,
        "p99_ms": took[int(len(took) * 0.99)] * 1000,
        "max_ms": took[-1] * 1000,
        "gc": [len(p) for p in pauses],
        "gc_max_ms": [max(p, default=0.0) * 1000 for p in pauses],
    }


def child(layout: str, keys: int, args: argparse.Namespace) -> dict[str, Any]:
    store_class = load_store(layout)
    store = store_class(max_keys=keys + args.ops * 2 + 10, max_bytes=1 << 40)
    key_of(0)  # warm up the hashing and formatting
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    filled = fill(store, keys, args.fill_seconds)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    result: dict[str, Any] = {
        "layout": layout,
        "keys": filled,
        "bytes_per_key": grown / filled - ANSWER_BYTES,
        "answer_bytes": ANSWER_BYTES,
        "tracked_objects": len(gc.get_objects()),
    }
    first = filled
    for concurrency in args.concurrency:
        warm_up = max(1000, args.ops // 10)  # the loop, the allocator and the caches warm
        first += asyncio.run(latencies(store, first, concurrency, warm_up, 5.0))["ops"]
        stats = asyncio.run(latencies(store, first, concurrency, args.ops, args.run_seconds))
        first += stats["ops"]
        result[f"c{concurrency}"] = stats
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default="1000,1000000", help="key counts, comma-separated")
    parser.add_argument("--baseline", default=BASELINE, help="a git revision, or 'none'")
    parser.add_argument("--ops", type=int, default=50_000, help="new keys timed per run")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--fill-seconds", type=float, default=300.0)
    parser.add_argument("--run-seconds", type=float, default=20.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.child:
        layout, keys = args.child.split(":")
        print(json.dumps(child(layout, int(keys), args)))
        return
    layouts = ["packed"] + ([] if args.baseline == "none" else [args.baseline])
    counts = [int(k) for k in args.keys.split(",")]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for layout in layouts:
        for keys in counts:
            argv = [sys.executable, __file__, "--child", f"{layout}:{keys}"]
            argv += ["--ops", str(args.ops), "--concurrency", ",".join(map(str, args.concurrency))]
            argv += ["--fill-seconds", str(args.fill_seconds)]
            argv += ["--run-seconds", str(args.run_seconds)]
            timeout = args.fill_seconds * 4 + args.run_seconds * len(args.concurrency) + 120
            out = subprocess.run(argv, check=True, capture_output=True, timeout=timeout, text=True)
            results[layout, keys] = json.loads(out.stdout)
            print(f"# {layout} {keys}: {out.stdout.strip()}", file=sys.stderr)
    print(f"answer: {ANSWER_BYTES} bytes encoded; python {sys.version.split()[0]}")
    header = f"{'layout':<10} {'keys':>9} {'B/key':>7} {'tracked':>9}"
    for c in args.concurrency:
        header += f" | c{c} {'p50':>6} {'p99':>7} {'max':>7} {'cpu99':>6}"
    header += " | gen2 collections: count, longest (CPU ms)"
    print(header + "   (ms)")
    for (layout, _), r in results.items():
        line = f"{layout:<10} {r['keys']:>9} {r['bytes_per_key']:>7.0f} {r['tracked_objects']:>9}"
        for c in args.concurrency:
            s = r[f"c{c}"]
            line += f" | c{c} {s['p50_ms']:>6.3f} {s['p99_ms']:>7.3f} {s['max_ms']:>7.2f}"
            line += f" {s['cpu_p99_ms']:>6.3f}"
        gen2 = [
            f"{r[f'c{c}']['gc'][2]}x {r[f'c{c}']['gc_max_ms'][2]:.1f}" for c in args.concurrency
        ]
        print(line + " | " + ", ".join(gen2))
    if len(counts) > 1:
        low, high = min(counts), max(counts)
        for layout in layouts:
            ratios = []
            for c in args.concurrency:
                for name, field in (("p99", "p99_ms"), ("cpu99", "cpu_p99_ms")):
                    h = results[layout, high][f"c{c}"][field]
                    lo = results[layout, low][f"c{c}"][field]
                    ratios.append(f"c{c} {name} {h / lo:.2f}")
            print(f"{layout}: at {high} keys / at {low} keys: {', '.join(ratios)}")


if __name__ == "__main__":
    main()
