"""Reporting: the tables, the side-by-side ratios of issue 18 (medians of per-repetition
ratios), the goals with ✓/✗, and bench/results.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contenders import (
    IDEM_1,
    IDEM_2,
    IDEM_WAIT_0,
    IDEM_WAIT_1,
    MINIMAL_1,
    MINIMAL_2,
    NAIVE,
    PEER,
    REPO,
    Contender,
    Lab,
)
from loads import (
    GET,
    NEW_KEY,
    POST_SMALL,
    PUT_LARGE,
    REPLAY,
    SCENARIOS,
    WARMUP_SECONDS,
    Row,
    Scenario,
)
from measures import RecordFigure
from packaging.markers import Marker  # installed with the test extra (pytest needs it)


@dataclass(frozen=True, slots=True)
class Context:
    """Everything the report says besides the rows."""

    command: str
    quick: bool
    started_at: dt.datetime
    seconds: int
    repetitions: int
    generator: str
    busy_before: float
    load_before: str
    rtt_us: tuple[float, float]  # PING median, p99 at the start
    rtt_end_us: float
    replication_us: tuple[float, float] | None
    records: list[RecordFigure]
    memory_store: str
    profiles: list[tuple[str, str]]  # (what, file name)
    elapsed_s: float


Rows = dict[tuple[str, str, int], Row]


class Figures:
    """Ratios between rows: medians over repetitions of each repetition's ratio."""

    def __init__(self, rows: Rows) -> None:
        self.rows = rows

    def get(self, scenario: Scenario, contender: Contender, conns: int = 64) -> Row | None:
        return self.rows.get((scenario.name, contender.label, conns))

    def ratio(
        self,
        top: tuple[Scenario, Contender],
        bottom: tuple[Scenario, Contender],
        conns: int = 64,
    ) -> float | None:
        """median_i(req/s of top in repetition i / req/s of bottom in repetition i)."""
        a, b = self.get(*top, conns), self.get(*bottom, conns)
        if a is None or b is None:
            return None
        pairs = [x.rps / y.rps for x, y in zip(a.runs, b.runs, strict=False) if y.rps]
        return statistics.median(pairs) if pairs else None

    def scaling(
        self,
        ours: tuple[Scenario, Contender, Contender],
        base: tuple[Scenario, Contender, Contender],
    ) -> float | None:
        """median_i of (ours 2w/1w) / (base 2w/1w), each from repetition i."""
        rows = [
            self.get(ours[0], ours[1]),
            self.get(ours[0], ours[2]),
            self.get(base[0], base[1]),
            self.get(base[0], base[2]),
        ]
        if any(row is None for row in rows):
            return None
        o1, o2, b1, b2 = (row.runs for row in rows if row is not None)
        values = [
            (x2.rps / x1.rps) / (y2.rps / y1.rps)
            for x1, x2, y1, y2 in zip(o1, o2, b1, b2, strict=False)
            if x1.rps and y1.rps and y2.rps
        ]
        return statistics.median(values) if values else None

    def cpu_ratio(
        self, top: tuple[Scenario, Contender], bottom: tuple[Scenario, Contender]
    ) -> float | None:
        """bottom's CPU µs/req over top's: the req/s ratio if both were CPU-bound."""
        a, b = self.get(*top), self.get(*bottom)
        if a is None or b is None or not a.cpu_us or math.isnan(a.cpu_us):
            return None
        return b.cpu_us / a.cpu_us

    def added_p50_us(
        self, top: tuple[Scenario, Contender], bottom: tuple[Scenario, Contender]
    ) -> float | None:
        """Median over repetitions of top's p50 − bottom's p50 at one connection, in µs."""
        a, b = self.get(*top, 1), self.get(*bottom, 1)
        if a is None or b is None:
            return None
        pairs = [(x.p50_ms - y.p50_ms) * 1000 for x, y in zip(a.runs, b.runs, strict=False)]
        return statistics.median(pairs) if pairs else None

    def added_round_trips(
        self, top: tuple[Scenario, Contender], bottom: tuple[Scenario, Contender]
    ) -> float | None:
        """Median over repetitions of (top's p50 − bottom's p50) at one connection divided by
        the PING round trip measured right after top's run in that repetition."""
        a, b = self.get(*top, 1), self.get(*bottom, 1)
        if a is None or b is None:
            return None
        counts = [
            (x.p50_ms - y.p50_ms) * 1000 / ping
            for x, y, ping in zip(a.runs, b.runs, a.ping_us, strict=False)
            if ping
        ]
        return statistics.median(counts) if counts else None

    def pings_us(self, scenario: Scenario, contender: Contender) -> list[float]:
        """The PING round trips measured right after each of the row's runs at 1 connection."""
        row = self.get(scenario, contender, 1)
        return row.ping_us if row is not None else []


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def met(value: float | None, check: Callable[[float], bool]) -> bool | None:
    return None if value is None else check(value)


MARK = {True: "✓", False: "✗", None: "–"}


def side_by_side(figures: Figures, ctx: Context) -> list[str]:
    """The issue-18 table: each contender against the minimal pass-through, c64 unless noted."""
    f = figures
    lines = [
        "| c64 unless noted | idemproxy | minimal aiohttp pass-through | naive proxy "
        "| peer (in-app) |",
        "|---|---|---|---|---|",
    ]

    def both(scenario: Scenario, base: Scenario) -> str:
        one = f.ratio((scenario, IDEM_1), (base, MINIMAL_1))
        two = f.ratio((scenario, IDEM_2), (base, MINIMAL_2))
        cpu1 = f.cpu_ratio((scenario, IDEM_1), (base, MINIMAL_1))
        cpu2 = f.cpu_ratio((scenario, IDEM_2), (base, MINIMAL_2))
        return f"{times(one)} / {times(two)} (by CPU/req {times(cpu1)} / {times(cpu2)})"

    def single(scenario: Scenario, contender: Contender) -> str:
        return times(f.ratio((scenario, contender), (POST_SMALL, MINIMAL_1)))

    for scenario in (GET, POST_SMALL, PUT_LARGE):
        lines.append(
            f"| {scenario.name}, `idempotency: off`, 1w / 2w | {both(scenario, scenario)} "
            "| 1 | — | — |"
        )
    for scenario in (NEW_KEY, REPLAY):
        lines.append(
            f"| {scenario.name}, 1w / 2w | {both(scenario, POST_SMALL)} | 1 (unkeyed POST 21 B) "
            f"| {single(scenario, NAIVE)} | {single(scenario, PEER)} |"
        )
    ours = f.ratio((NEW_KEY, IDEM_2), (NEW_KEY, IDEM_1))
    minimal = f.ratio((POST_SMALL, MINIMAL_2), (POST_SMALL, MINIMAL_1))
    lines.append(
        f"| 2 workers / 1 worker, new key | {times(ours)} | {times(minimal)} (unkeyed POST 21 B) "
        "| — | — |"
    )
    lines.append(
        f"| new key vs the peer / vs the naive proxy | "
        f"{times(f.ratio((NEW_KEY, IDEM_1), (NEW_KEY, PEER)))} / "
        f"{times(f.ratio((NEW_KEY, IDEM_1), (NEW_KEY, NAIVE)))} | | | |"
    )
    added = f.added_p50_us((NEW_KEY, IDEM_1), (POST_SMALL, IDEM_1))
    round_trips = f.added_round_trips((NEW_KEY, IDEM_1), (POST_SMALL, IDEM_1))
    if added is not None and round_trips is not None:
        lines.append(
            f"| added p50 of a new key over unkeyed POST, 1 connection | {added:.0f} µs = "
            f"{round_trips:.2f} Redis round trips | | | |"
        )
    by_target = {record.target: record for record in ctx.records}
    cells = [
        f"{by_target[c.label].bytes_per_record:,.0f}" if c.label in by_target else "n/a"
        for c in (IDEM_1, NAIVE, PEER)
    ]
    lines.append(
        f"| Redis bytes per record of a 200-byte answer (used_memory Δ) | {cells[0]} | — "
        f"| {cells[1]} | {cells[2]} |"
    )
    return lines


def goals(figures: Figures, ctx: Context) -> list[str]:
    """Issue 18's goals 1–7, each with its measured figure and ✓/✗ (– where not measured)."""
    f = figures
    out: list[tuple[str, str, str, bool | None]] = []

    passes = {
        f"{s.name} {w}": f.ratio((s, idem), (s, minimal))
        for s in (GET, POST_SMALL, PUT_LARGE)
        for w, idem, minimal in (("1w", IDEM_1, MINIMAL_1), ("2w", IDEM_2, MINIMAL_2))
    }
    known = [v for v in passes.values() if v is not None]
    out.append(
        (
            "1",
            "unkeyed pass-through (GET, POST/PUT with small and 1 MiB bodies) ≥ 1.0× the "
            "minimal pass-through at 1 and 2 workers, access log on",
            "; ".join(f"{k} {times(v)}" for k, v in passes.items()),
            met(min(known), lambda v: v >= 1.0) if len(known) == len(passes) else None,
        )
    )
    keyed = {
        f"{s.name} {w}": f.ratio((s, idem), (POST_SMALL, minimal))
        for s in (NEW_KEY, REPLAY)
        for w, idem, minimal in (("1w", IDEM_1, MINIMAL_1), ("2w", IDEM_2, MINIMAL_2))
    }
    checks = [
        met(v, (lambda x: x >= 1.0) if k.startswith(NEW_KEY.name) else (lambda x: x >= 1.8))
        for k, v in keyed.items()
    ]
    out.append(
        (
            "2",
            "new key ≥ 1.0× the minimal pass-through at 1 and 2 workers; replay ≥ 1.8×",
            "; ".join(f"{k} {times(v)}" for k, v in keyed.items()),
            None if None in checks else all(checks),
        )
    )
    scaling = f.scaling((NEW_KEY, IDEM_1, IDEM_2), (POST_SMALL, MINIMAL_1, MINIMAL_2))
    out.append(
        (
            "3",
            "2w/1w on new keys ≥ 0.9 × the minimal pass-through's own 2w/1w",
            f"{times(scaling)} (idemproxy 2w/1w "
            f"{times(f.ratio((NEW_KEY, IDEM_2), (NEW_KEY, IDEM_1)))}, minimal "
            f"{times(f.ratio((POST_SMALL, MINIMAL_2), (POST_SMALL, MINIMAL_1)))})",
            met(scaling, lambda v: v >= 0.9),
        )
    )
    ours = next((r for r in ctx.records if r.target == IDEM_1.label), None)
    out.append(
        (
            "4",
            "≤ 400 Redis bytes per stored 200-byte answer",
            "n/a"
            if ours is None
            else f"{ours.bytes_per_record:,.0f} B (used_memory Δ over {ours.records:,}); "
            f"MEMORY USAGE of one key: {ours.sample_usage} B ({ours.sample_type}), "
            f"{ours.keys / max(1, ours.records):.2f} keys per record",
            None if ours is None else ours.bytes_per_record <= 400,
        )
    )
    out.append(
        (
            "5",
            "memory store: ≤ 600 B per key beyond the answer; p99 at 1,000,000 keys ≤ 2× at 1,000",
            "see Memory store below (bench/memory_store.py)",
            None,
        )
    )
    added = f.added_p50_us((NEW_KEY, IDEM_WAIT_1), (NEW_KEY, IDEM_WAIT_0))
    rate = f.ratio((NEW_KEY, IDEM_WAIT_1), (NEW_KEY, IDEM_WAIT_0))
    repl = ctx.replication_us[0] if ctx.replication_us else None
    six: bool | None = None
    if added is not None and rate is not None and repl:
        six = added <= repl and rate >= 0.85
    out.append(
        (
            "6",
            "`wait_replicas: 1`: ≤ 1 replication round trip of added p50 at 1 connection, "
            "≤ 15 % of req/s at 64",
            "n/a"
            if added is None or rate is None or not repl
            else f"+{added:.0f} µs p50 = {added / repl:.2f} replication round trips "
            f"({repl:.0f} µs); req/s {times(rate)} of `wait_replicas: 0`",
            six,
        )
    )
    latency = f.added_p50_us((NEW_KEY, IDEM_1), (POST_SMALL, IDEM_1))
    peer = f.ratio((NEW_KEY, IDEM_1), (NEW_KEY, PEER))
    rtts = f.added_round_trips((NEW_KEY, IDEM_1), (POST_SMALL, IDEM_1))
    seven: bool | None = None
    if rtts is not None and peer is not None:
        seven = rtts <= 2 and peer >= 4
    out.append(
        (
            "7",
            "added p50 of a new key ≤ 2 Redis round trips; new key ≥ 4× the peer",
            ("n/a" if rtts is None else f"{rtts:.2f} round trips ({latency:.0f} µs)")
            + f"; new key vs peer {times(peer)}",
            seven,
        )
    )
    lines = [
        "| # | goal | measured (medians of per-repetition ratios) | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {goal} | {value} | {MARK[ok]} |" for n, goal, value, ok in out]
    return lines


def table(rows: Rows) -> list[str]:
    lines = [
        "| scenario | contender | conns | req/s | p50 ms | p99 ms | errors | peak RSS MiB "
        "| CPU µs/req | Redis CPU µs/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        rss = f"{row.peak_rss_kib / 1024:.1f}" if row.peak_rss_kib else "—"
        lines.append(
            f"| {row.scenario} | {row.target} | {row.connections} | {row.rps:,.0f} | "
            f"{row.p50_ms:.3f} | {row.p99_ms:.3f} | {row.errors} | {rss} | {row.cpu_us:.0f} "
            f"| {row.store_cpu_us:.0f} |"
        )
    return lines


def rows_detail(rows: Rows) -> list[str]:
    lines = [
        "| scenario | contender | conns | runs (req/s · p50 ms · p99 ms) | idemproxy outcomes "
        "| note |",
        "|---|---|---:|---|---|---|",
    ]
    for row in rows.values():
        runs = "; ".join(f"{r.rps:,.0f} · {r.p50_ms:.3f} · {r.p99_ms:.3f}" for r in row.runs)
        outcomes = ", ".join(f"{k}={v:,}" for k, v in sorted(row.outcomes.items()))
        lines.append(
            f"| {row.scenario} | {row.target} | {row.connections} | {runs} | {outcomes} "
            f"| {'; '.join(row.notes)} |"
        )
    return lines


def records(ctx: Context) -> list[str]:
    lines = [
        "| contender | records | keys in Redis | used_memory Δ | bytes per record "
        "| MEMORY USAGE of one key |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in ctx.records:
        lines.append(
            f"| {r.target} | {r.records:,} | {r.keys:,} | {r.used_after - r.used_before:,} "
            f"| {r.bytes_per_record:,.0f} | {r.sample_usage} B ({r.sample_type}) |"
        )
    return lines


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
    }


def _version_of(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def _first(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    return match[1] if match else text


def versions(lab: Lab) -> dict[str, str]:
    found = {"python": platform.python_version()}
    packages = ("idemproxy", "aiohttp", "uvloop", "redis", "hiredis", "msgspec")
    peer = ("asgi-idempotency-header", "starlette", "uvicorn", "httptools")
    for package in (*packages, *peer):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    commit = _version_of(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    # This run's own output (profiles are written before the results) is not a code change.
    not_ours = ["--", ".", ":!bench/results.md", ":!bench/profile-*.txt"]
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", *not_ours],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if dirty:
        diff = subprocess.run(
            ["git", "-C", str(REPO), "diff", "HEAD", *not_ours], capture_output=True, check=False
        ).stdout
        commit += f" + uncommitted changes (diff sha256 {hashlib.sha256(diff).hexdigest()[:12]})"
    found["idemproxy commit"] = commit
    found["constraints.txt"] = constraints_drift()
    redis_version = _version_of([lab.redis_bin, "--version"])
    redis_number = _first(r"v=(\S+)", redis_version)
    found["redis-server"] = f"{redis_number} ({lab.redis_bin})"
    wrk = _version_of(["wrk", "-v"]) if shutil.which("wrk") else "not installed"
    found["wrk"] = _first(r"^wrk (\S+)", wrk)
    nginx = _version_of(["nginx", "-v"]) if shutil.which("nginx") else "not installed"
    found["nginx"] = _first(r"nginx/(\S+)", nginx)
    return found


def constraints_drift() -> str:
    """Whether the installed packages are the ones constraints.txt pins (figures are comparable
    across runs only when they are)."""
    drift = []
    for line in (REPO / "constraints.txt").read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)\s*(?:;\s*(.+))?$", line)
        if not match:
            continue
        name, pinned, marker = match[1], match[2], match[3]
        if marker and not Marker(marker).evaluate():
            continue  # pinned for another Python or platform (the lock is universal)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != pinned:
            drift.append(f"{name} {installed} (pinned {pinned})")
    return "installed as pinned" if not drift else "differs: " + ", ".join(drift)


def busy_fraction(seconds: float = 1.0) -> float:
    """How busy the CPUs are (0..1) before the benchmark starts: other work skews the figures."""

    def snapshot() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values), idle

    total_a, idle_a = snapshot()
    time.sleep(seconds)
    total_b, idle_b = snapshot()
    return 1 - (idle_b - idle_a) / max(1, total_b - total_a)


def render(rows: Rows, ctx: Context, lab: Lab, note: str = "") -> str:
    figures = Figures(rows)
    generator = (
        f"wrk (`--latency`; 1 thread at 1 connection, {min(64, os.cpu_count() or 1)} threads at 64)"
        if ctx.generator == "wrk"
        else "bench/loadgen.py (fallback: aiohttp, one process; lower ceiling than wrk)"
    )
    replication = (
        f"median {ctx.replication_us[0]:.0f} µs, p99 {ctx.replication_us[1]:.0f} µs"
        if ctx.replication_us
        else "not measured"
    )
    pings = ", ".join(f"{ping:.0f} µs" for ping in figures.pings_us(NEW_KEY, IDEM_1)) or "none"
    report = [
        "# idemproxy benchmark results",
        "",
    ]
    if ctx.quick:
        report += ["**Quick run (`--quick`): a smoke check, not the reference figures.**", ""]
    if note:
        report += [f"**{note}**", ""]
    report += [
        f"- date: {ctx.started_at:%Y-%m-%d %H:%M} UTC; the whole run took "
        f"{ctx.elapsed_s / 60:.1f} min",
        f"- command: `{ctx.command}`",
        "- machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()),
        f"- CPU busy before the start: {ctx.busy_before:.0%} (load average {ctx.load_before}); "
        f"at the end: load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions(lab).items()),
        f"- load: {generator}; {ctx.repetitions} repetition(s) of {ctx.seconds} s per row, each "
        f"after a {WARMUP_SECONDS} s warm-up; every process on 127.0.0.1, sharing "
        f"{os.cpu_count()} cores with the load generator, the upstream and Redis",
        f"- redis-py asyncio PING round trip (hiredis): median {ctx.rtt_us[0]:.0f} µs, p99 "
        f"{ctx.rtt_us[1]:.0f} µs at the start; median {ctx.rtt_end_us:.0f} µs after the rows; "
        f"right after each 1-connection new-key run of idemproxy (the round trip goal 7 counts "
        f"in): {pings}",
        f"- replication round trip (`WAIT 1` after a `SET`, master + 1 replica): {replication}",
        "",
        "## Goals (issue 18)",
        "",
        *goals(figures, ctx),
        "",
        "## Side by side",
        "",
        "Each cell is the median over the repetitions of that repetition's ratio to the minimal "
        "aiohttp pass-through (1 process for 1w, 2 processes on one port for 2w). 'By CPU/req' "
        "divides the minimal proxy's CPU µs per request by idemproxy's: what the req/s ratio "
        "would be if both were CPU-bound, and much steadier on shared cores.",
        "",
        *side_by_side(figures, ctx),
        "",
        "## Every row",
        "",
        *table(rows),
        "",
        "## Redis bytes per record",
        "",
        *records(ctx),
        "",
        "## Memory store",
        "",
        "`python bench/memory_store.py`, output verbatim:",
        "",
        "```text",
        ctx.memory_store,
        "```",
        "",
        "## Per-run figures",
        "",
        *rows_detail(rows),
        "",
        "## How it is measured",
        "",
        "- Scenarios: "
        + "; ".join(f"{s.name}: {s.describe}" for s in SCENARIOS)
        + ". idemproxy's policy keys `POST /orders` (key required) and sets "
        "`idempotency: off` on `/items/**`; the upstream (bench/upstream.py) answers every "
        "request with the same 200-byte JSON document.",
        "- Repetitions: each repetition starts every contender fresh (Redis flushed), runs its "
        "scenarios one after the other (1 s warm-up each), and stops it; the next contender "
        "follows, so drift hits all of them in the same repetition. Ratios are per repetition, "
        "then the median is taken.",
        "- idemproxy runs as shipped: its JSON access log on stderr, to a file. The minimal "
        "pass-through (bench/minimal_proxy.py) and the naive proxy (bench/naive_proxy.py) log "
        "nothing; the peer (bench/peer_app.py: asgi-idempotency-header's middleware and Redis "
        "backend in a plain ASGI app under uvicorn, httptools, uvloop) has uvicorn's access log "
        "off; so each ratio is conservative for idemproxy.",
        "- CPU µs/req: user + system CPU time of the contender's processes (nginx master + "
        "workers, both minimal-proxy processes, idemproxy's supervisor + workers) during the "
        "timed runs, divided by the requests the load generator counted; Redis CPU µs/req the "
        "same for the redis-server it uses. Peak RSS: VmHWM of "
        "those processes, summed, the highest over the repetitions.",
        "- `wait_replicas`: idemproxy on its own Redis master with one replica (both on "
        "loopback), `wait_replicas` 0 and 1; the replication round trip above is the time of "
        "`WAIT 1 1000` right after a `SET` on that master.",
        "- Redis bytes per record: `used_memory` before and after that many new keys of the "
        "200-byte answer through each contender (Redis flushed first), divided by the records; "
        "`MEMORY USAGE` of one stored key beside it.",
        "- On 2 cores the 2-worker rows cannot show what a second worker buys: wrk, the "
        "upstream and Redis already take about one core; goal 3 compares scaling with the "
        "minimal proxy's in the same repetition, not with the cores.",
        "",
    ]
    if ctx.profiles:
        report += ["## Profiles", ""]
        report += [f"- {what}: bench/{name}" for what, name in ctx.profiles]
        report.append("")
    return "\n".join(report)
