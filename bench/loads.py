"""Load runs: the scenarios (what each request is), wrk or bench/loadgen.py driving one
scenario against one contender, the parsing of their output, and the rows the runs add up to.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import loadgen
from contenders import HERE, KEYED_PATH, UNKEYED_PATH, Contender, Lab, Target

WARMUP_SECONDS = 1
REPLAY_KEYS = 1000
LARGE_BODY = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Scenario:
    """One kind of request: its wrk script (with its environment) and loadgen.py mode."""

    name: str
    path: str
    script: Path | None
    env: tuple[tuple[str, str], ...]
    loadgen_mode: str
    describe: str


GET = Scenario(
    "unkeyed GET", UNKEYED_PATH, None, (), "get", f"`GET {UNKEYED_PATH}`, no body, no key"
)
POST_SMALL = Scenario(
    "unkeyed POST 21 B",
    UNKEYED_PATH,
    HERE / "body.lua",
    (("BODY_METHOD", "POST"), ("BODY_BYTES", "21")),
    "post",
    f"`POST {UNKEYED_PATH}` with the 21-byte JSON body, no key (bench/body.lua)",
)
PUT_LARGE = Scenario(
    "unkeyed PUT 1 MiB",
    UNKEYED_PATH,
    HERE / "body.lua",
    (("BODY_METHOD", "PUT"), ("BODY_BYTES", str(LARGE_BODY))),
    "put-large",
    f"`PUT {UNKEYED_PATH}` with a 1 MiB body, streamed by the proxies (bench/body.lua)",
)
NEW_KEY = Scenario(
    "new key",
    KEYED_PATH,
    HERE / "new_keys.lua",
    (),
    "new",
    f"`POST {KEYED_PATH}`, the 21-byte body, a unique Idempotency-Key (bench/new_keys.lua)",
)
REPLAY = Scenario(
    "replay",
    KEYED_PATH,
    HERE / "replay_keys.lua",
    (),
    "replay",
    f"`POST {KEYED_PATH}` cycling over {REPLAY_KEYS:,} keys stored beforehand "
    "(bench/replay_keys.lua)",
)
SCENARIOS = (GET, POST_SMALL, PUT_LARGE, NEW_KEY, REPLAY)


@dataclass(frozen=True, slots=True)
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(output: str) -> Run:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    percentiles: dict[str, float] = {}
    for match in re.finditer(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M):
        percentiles[match[1]] = float(match[2]) * _UNITS_MS[match[3]]
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx[1])
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    return Run(
        rps=float(rps[1]),
        p50_ms=percentiles.get("50", float("nan")),
        p99_ms=percentiles.get("99", float("nan")),
        requests=int(total[1]),
        errors=errors,
    )


def parse_loadgen(output: str) -> Run:
    data = json.loads(output)
    return Run(data["rps"], data["p50_ms"], data["p99_ms"], data["requests"], data["errors"])


@dataclass(frozen=True, slots=True)
class Load:
    """One load: a scenario against a base URL for a duration, from wrk or bench/loadgen.py."""

    url: str
    scenario: Scenario
    connections: int
    seconds: int
    generator: str  # wrk | python
    replay_prefix: str = "replay"

    def command(self) -> tuple[list[str], dict[str, str]]:
        run_id = uuid.uuid4().hex[:12]
        target = self.url + self.scenario.path
        if self.generator == "python":
            command = [
                sys.executable,
                str(HERE / "loadgen.py"),
                "--url",
                target,
                "--mode",
                self.scenario.loadgen_mode,
                "-c",
                str(self.connections),
                "-d",
                str(self.seconds),
                "--run-id",
                run_id,
                "--replay-prefix",
                self.replay_prefix,
                "--replay-keys",
                str(REPLAY_KEYS),
                "--json",
            ]
            return command, {}
        threads = max(1, min(self.connections, os.cpu_count() or 1))
        command = [
            "wrk",
            f"-t{threads}",
            f"-c{self.connections}",
            f"-d{self.seconds}s",
            "--timeout",
            "5s",
            "--latency",
        ]
        if self.scenario.script is not None:
            command += ["-s", str(self.scenario.script)]
        env = {
            "BENCH_RUN_ID": run_id,
            "REPLAY_PREFIX": self.replay_prefix,
            "REPLAY_KEYS": str(REPLAY_KEYS),
            **dict(self.scenario.env),
        }
        return [*command, target], env

    def parse(self, output: str) -> Run:
        return parse_wrk(output) if self.generator == "wrk" else parse_loadgen(output)


def run_load(load: Load) -> Run:
    """Run one load to completion (killed at its duration + 60 s at the latest)."""
    command, env = load.command()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=load.seconds + 60,
        env={**os.environ, **env},
        check=True,
    )
    return load.parse(done.stdout)


def start_load(load: Load) -> subprocess.Popen[str]:
    """The same load in the background (for profiling); finish it with ``finish_load``."""
    command, env = load.command()
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def finish_load(proc: subprocess.Popen[str], load: Load) -> Run:
    try:
        out, _ = proc.communicate(timeout=load.seconds + 60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return load.parse(out)


def seed_replays(url: str, prefix: str) -> str:
    """Store the replay scenario's keys (and check that sending some again replays them)."""
    keys = [f"{prefix}-{i}" for i in range(REPLAY_KEYS)]
    first = asyncio.run(loadgen.send_keys(url + KEYED_PATH, keys))
    again = asyncio.run(loadgen.send_keys(url + KEYED_PATH, keys[:50]))
    return f"seeded {first.statuses}, re-sent 50: {again.replayed} replayed"


@dataclass
class Row:
    """One scenario against one contender at one connection count: a run per repetition."""

    scenario: str
    target: str
    connections: int
    runs: list[Run] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the contender's CPU time over the timed runs
    store_cpu_seconds: float = 0.0  # its redis-server's
    peak_rss_kib: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    # At 1 connection: Redis' PING round trip (µs) measured right after each timed run, so that
    # a latency can be counted in round trips of the same moment
    ping_us: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(r.rps for r in self.runs)

    @property
    def p50_ms(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs)

    @property
    def p99_ms(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def cpu_us(self) -> float:
        """CPU µs per request served: steady where req/s is not (the cores are shared)."""
        return self._per_request(self.cpu_seconds)

    @property
    def store_cpu_us(self) -> float:
        """Redis' CPU µs per request served (0 without Redis)."""
        return self._per_request(self.store_cpu_seconds)

    def _per_request(self, seconds: float) -> float:
        served = sum(r.requests for r in self.runs)
        return seconds * 1e6 / served if served else float("nan")


Case = tuple[Scenario, int]  # a scenario at a connection count


class Bench:
    """Runs the plan, one repetition at a time, and keeps the rows."""

    def __init__(
        self, lab: Lab, generator: str, seconds: int, ping_us: Callable[[], float]
    ) -> None:
        self.lab = lab
        self.generator = generator
        self.seconds = seconds
        self.ping_us = ping_us  # Redis' PING round trip now, in µs
        self.rows: dict[tuple[str, str, int], Row] = {}

    @staticmethod
    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def row(self, scenario: Scenario, contender: Contender, connections: int) -> Row | None:
        return self.rows.get((scenario.name, contender.label, connections))

    def flush_redis(self) -> None:
        self.lab.redis_client().flushall()
        if self.lab.replicated_port is not None:
            self.lab.redis_client(self.lab.replicated_port).flushall()

    def repetition(self, contender: Contender, cases: list[Case]) -> None:
        """Start the contender fresh, run each case once (after a warm-up), stop it."""
        self.flush_redis()
        target = self.lab.start(contender)
        try:
            for scenario, connections in cases:
                self._case(target, scenario, connections)
            rss = target.peak_rss_kib() if target.procs else 0
        finally:
            self.lab.stop(target)
        for scenario, connections in cases:
            row = self.rows[(scenario.name, target.label, connections)]
            row.peak_rss_kib = max(row.peak_rss_kib, rss)

    def _case(self, target: Target, scenario: Scenario, connections: int) -> None:
        key = (scenario.name, target.label, connections)
        row = self.rows.setdefault(key, Row(*key))
        prefix = f"replay-{uuid.uuid4().hex[:8]}"
        if scenario is REPLAY:
            note = seed_replays(target.url, prefix)
            if note not in row.notes:
                row.notes.append(note)
        warm = Load(target.url, scenario, connections, WARMUP_SECONDS, self.generator, prefix)
        run_load(warm)
        timed = Load(target.url, scenario, connections, self.seconds, self.generator, prefix)
        before_cpu, before = target.cpu_seconds(), Counter(target.outcomes())
        before_store = target.store_cpu_seconds()
        run = run_load(timed)
        row.cpu_seconds += target.cpu_seconds() - before_cpu
        row.store_cpu_seconds += target.store_cpu_seconds() - before_store
        row.outcomes.update(Counter(target.outcomes()) - before)
        row.runs.append(run)
        if connections == 1:
            row.ping_us.append(self.ping_us())
        self.say(
            f"{scenario.name} · {target.label} · {connections} conn: {run.rps:,.0f} req/s, "
            f"p50 {run.p50_ms:.3f} ms, p99 {run.p99_ms:.3f} ms, {run.errors} errors"
        )
