"""Single measurements beside the load rows: Redis round trips (PING, and replication through
``WAIT``), Redis bytes per stored record, the memory store (bench/memory_store.py), and py-spy
profiles of idemproxy under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loadgen
import redis.asyncio as aioredis
import uvloop
from contenders import HERE, HOST, KEYED_PATH, REPO, Contender, Lab
from loads import (
    REPLAY,
    WARMUP_SECONDS,
    Load,
    Scenario,
    finish_load,
    run_load,
    seed_replays,
    start_load,
)

MEMORY_STORE_SCRIPT = HERE / "memory_store.py"
MEMORY_STORE_TIMEOUT = 600  # seconds


async def _timed(client: aioredis.Redis, samples: int, write: bool) -> list[float]:
    times: list[float] = []
    for index in range(samples):
        if write:
            await client.set(f"bench-rtt-{index % 100}", b"x")
        started = time.perf_counter()
        if write:
            await client.wait(1, 1000)
        else:
            await client.ping()
        times.append(time.perf_counter() - started)
    return sorted(times)


async def _round_trips(port: int, samples: int, write: bool) -> tuple[float, float]:
    client = aioredis.Redis(host=HOST, port=port)
    try:
        await _timed(client, 200, write)
        times = await _timed(client, samples, write)
    finally:
        await client.aclose()
    return statistics.median(times) * 1e6, loadgen.percentile(times, 0.99) * 1e6


def redis_rtt_us(port: int, samples: int = 2000) -> tuple[float, float]:
    """Median and p99 of a redis-py asyncio PING round trip (hiredis parser), in µs."""
    return uvloop.run(_round_trips(port, samples, write=False))


def replication_rtt_us(port: int, samples: int = 1000) -> tuple[float, float]:
    """Median and p99 of ``WAIT 1`` after a ``SET`` on a master with one replica, in µs: the
    round trip a write pays to be acknowledged by the replica."""
    return uvloop.run(_round_trips(port, samples, write=True))


@dataclass(frozen=True, slots=True)
class RecordFigure:
    target: str
    records: int
    keys: int
    used_before: int
    used_after: int
    sample_usage: int | None  # MEMORY USAGE of one stored key
    sample_type: str

    @property
    def bytes_per_record(self) -> float:
        return (self.used_after - self.used_before) / max(1, self.records)


def record_size(lab: Lab, contender: Contender, records: int) -> RecordFigure:
    """``used_memory`` before and after ``records`` new keys of a 200-byte answer."""
    client = lab.redis_client()
    client.flushall()
    target = lab.start(contender)
    try:
        keys = [f"size-{uuid.uuid4().hex[:8]}-{i}" for i in range(records)]
        time.sleep(0.2)
        before = int(client.info("memory")["used_memory"])
        sent = asyncio.run(loadgen.send_keys(target.url + KEYED_PATH, keys))
        after = int(client.info("memory")["used_memory"])
        stored = int(client.dbsize())
        sample: Any = None  # redis-py types its answers as bytes | str
        for _ in range(10):  # a record's key, not the peer's one set of every key
            sample = client.randomkey()
            if sample is not None and client.type(sample) != b"set":
                break
        usage = client.memory_usage(sample) if sample is not None else None
        kind: Any = client.type(sample) if sample is not None else b"?"
        if sent.statuses.get(200, 0) != records:
            print(f"WARNING: {contender.label}: statuses {sent.statuses}", flush=True)
        return RecordFigure(contender.label, records, stored, before, after, usage, kind.decode())
    finally:
        lab.stop(target)
        client.flushall()


def memory_store(quick: bool) -> str:
    """The output of bench/memory_store.py (written beside this one), or why it did not run."""
    if quick:
        return "not run (--quick)"
    if not MEMORY_STORE_SCRIPT.exists():
        return "not run (bench/memory_store.py is not in this checkout)"
    try:
        done = subprocess.run(
            [sys.executable, str(MEMORY_STORE_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=MEMORY_STORE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"not run to the end: bench/memory_store.py took over {MEMORY_STORE_TIMEOUT} s"
    out = done.stdout.strip()
    if done.returncode != 0:
        out += f"\n(exit status {done.returncode}; stderr: {done.stderr.strip()[-800:]})"
    return out


PROFILE_RATE = 200  # samples per second


def profile(
    lab: Lab,
    contender: Contender,
    scenario: Scenario,
    out: Path,
    seconds: int,
    generator: str,
) -> str:
    """py-spy record of idemproxy (as shipped: access log on stderr, to a file) under load."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return "skipped: py-spy is not installed (the bench extra)"
    lab.redis_client().flushall()
    target = lab.start(contender)
    raw = lab.tmp / "profile.raw"
    try:
        print(f"profile: {scenario.name} · {target.label} · 64 conn · {seconds} s", flush=True)
        prefix = f"replay-{uuid.uuid4().hex[:8]}"
        if scenario is REPLAY:
            seed_replays(target.url, prefix)
        run_load(Load(target.url, scenario, 64, WARMUP_SECONDS, generator, prefix))
        load = Load(target.url, scenario, 64, seconds + 3, generator, prefix)
        background = start_load(load)
        try:
            time.sleep(1.5)
            command = [
                py_spy,
                "record",
                "--pid",
                str(target.procs[0].pid),
                "--duration",
                str(seconds),
                "--rate",
                str(PROFILE_RATE),
                "--format",
                "raw",
                "--nolineno",
                "--output",
                str(raw),
            ]
            spy = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        finally:
            run = finish_load(background, load)
        if spy.returncode != 0 or not raw.exists():
            return f"skipped: py-spy failed ({spy.returncode}): {spy.stderr.strip()[-500:]}"
        samples = raw.read_text()
        busy = sum(int(line.rpartition(" ")[2]) for line in samples.splitlines() if line)
        possible = PROFILE_RATE * seconds
        header = (
            f"py-spy profile of idemproxy, scenario: {scenario.name}, {contender.label}\n"
            f"taken {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python bench/run.py` "
            f"(bench/measures.py, profile()):\n"
            f"  idemproxy run --store {contender.store}://… (as shipped: JSON access log on "
            "stderr, to a file)\n"
            f"  load: {generator}, 64 connections, {scenario.describe}\n"
            f"  profiler: {shlex.join(['py-spy', *command[1:]])}\n"
            "  load during the profile (py-spy costs the target throughput): "
            f"{run.rps:,.0f} req/s, p50 {run.p50_ms:.3f} ms, p99 {run.p99_ms:.3f} ms\n"
            f"  {os.cpu_count()} cores shared by wrk, idemproxy, the upstream, Redis and py-spy.\n"
            f"The main thread was busy in {busy} of {possible} sample slots "
            f"({100 * busy / possible:.0f}%): py-spy leaves out samples where the thread is idle\n"
            "(waiting in epoll), so the percentages below are of busy time, and a figure near\n"
            "100% means the proxy is CPU-bound on one core.\n"
            "'self' counts samples whose innermost frame is the function; 'total' counts samples\n"
            "with the function anywhere on the stack (once per sample). C code called from a\n"
            "Python function (a socket write, hashlib, msgspec) counts as that function's self.\n"
        )
        text = header + "\n" + summarize_profile(samples, run.rps * seconds)
        out.write_text(text)
        print(f"  wrote {out}", flush=True)
        return text
    finally:
        lab.stop(target)
        with contextlib.suppress(FileNotFoundError):
            raw.unlink()


def _short(frame: str) -> str:
    """``f (/venv/…/site-packages/aiohttp/web_protocol.py)`` → ``f (aiohttp/web_protocol.py)``."""
    match = re.match(r"^(.*) \((.*)\)$", frame)
    if not match:
        return frame
    name, path = match[1], match[2]
    for marker in ("site-packages/", "lib/python3.11/", f"{REPO}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def _package(frame: str) -> str:
    """The package (or stdlib module) a frame's code lives in: ``aiohttp``, ``logging``, …"""
    match = re.search(r"\(([^)]*)\)$", frame)
    path = match[1] if match else ""
    if path.startswith("<frozen"):
        return "python (frozen)"
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") or "?"


def summarize_profile(raw: str, requests: float | None = None, top: int = 30) -> str:
    """Top functions by self and total time; ``requests``: requests served while sampling."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = tuple(_short(f) for f in stack.split(";") if f)
        stacks[frames] += int(number)
    total = sum(stacks.values()) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks.items():
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def fmt(frame: str, n: int) -> str:
        per_request = ""
        if requests:
            per_request = f"{n / PROFILE_RATE / requests * 1e6:7.1f} µs/req  "
        return f"{100 * n / total:6.2f}%  {n:6d}  {per_request}{frame}"

    packages: Counter[str] = Counter()
    for frame, n in own.items():
        packages[_package(frame)] += n
    lines = [f"samples: {total}"]
    if requests:
        lines.append(
            f"requests served while sampling: ≈ {requests:,.0f}; µs/req = samples / rate / "
            "requests, the CPU time a function costs per request"
        )
    lines += ["", "== self time by package (innermost frame's code) =="]
    lines += [fmt(name, n) for name, n in packages.most_common(15)]
    lines += ["", f"== top {top} by self time =="]
    lines += [fmt(frame, n) for frame, n in own.most_common(top)]
    lines += ["", f"== top {top} by total time (function on the stack) =="]
    lines += [fmt(frame, n) for frame, n in inclusive.most_common(top)]
    ours = [(f, n) for f, n in inclusive.most_common() if "idemproxy/" in f]
    lines += ["", "== idemproxy's own functions by total time =="]
    lines += [fmt(frame, n) for frame, n in ours[:top]]
    lines += ["", "== top 12 stacks (innermost 8 frames, outermost first) =="]
    for frames, n in stacks.most_common(12):
        lines.append(f"{100 * n / total:6.2f}%  " + " ; ".join(frames[-8:]))
    return "\n".join(lines) + "\n"
