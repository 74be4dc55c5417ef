"""``idemproxy run --workers N`` as real processes: restarts with backoff, giving up, health while
workers are missing, workers that outlive their supervisor, and a read-only root filesystem."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from idemproxy.supervisor import (
    GIVE_UP_AFTER,
    HUNG_AFTER,
    KILL_HUNG_AFTER,
    RESTART_DELAY,
    RESTART_DELAY_MAX,
)
from tests.cli_process import STEP, CliProcess, status, wait_status
from tests.conftest import HOST, RedisProcess, Upstream, free_port

SHM = "/dev/shm"  # noqa: S108 - the tmpfs the test keeps writable, as containers do


@pytest.fixture
async def started() -> AsyncIterator[list[CliProcess]]:
    """Processes a test starts; each is stopped by PID at the end if it still runs."""
    processes: list[CliProcess] = []
    yield processes
    for proc in processes:
        await proc.stop()


def run_args(upstream: str, store: str, listen: int, admin: int) -> list[str]:
    return [
        "run",
        "--upstream",
        upstream,
        "--store",
        store,
        "--workers",
        "2",
        "--listen",
        f"{HOST}:{listen}",
        "--admin",
        f"{HOST}:{admin}",
    ]


def worker_pids(proc: CliProcess) -> list[int]:
    return [e["pid"] for e in proc.messages("worker started")]


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its new parent to reap it counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.timeout(120)
async def test_workers_that_cannot_listen_back_off_then_it_gives_up_and_exits_1(
    redis_server: RedisProcess, http: aiohttp.ClientSession, started: list[CliProcess]
) -> None:
    """The listen port is held by another process (no SO_REUSEPORT): every worker dies at start.

    Before, the supervisor restarted them every 0.5 s forever while /healthz and /readyz said 200.
    """
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        admin = free_port()
        args = run_args("http://127.0.0.1:1", redis_server.url, port, admin)
        proc = await CliProcess(*args).start()
        started.append(proc)
        answers: set[int | None] = set()
        for _ in range(int(60 / STEP)):
            if proc.returncode is not None:
                break
            answers.add(await status(http, f"http://{HOST}:{admin}/healthz"))
            answers.add(await status(http, f"http://{HOST}:{admin}/readyz"))
            await asyncio.sleep(STEP)
        assert proc.returncode is not None, f"still restarting after 60 s: {answers}"
        code = await proc.wait_exit()

    assert code == 1, proc.stderr
    assert 503 in answers, answers
    assert 200 not in answers, answers
    for worker in (0, 1):
        deaths = [e for e in proc.messages("worker died; restarting it") if e["worker"] == worker]
        delays = [e["restart_in_seconds"] for e in deaths]
        expected = [min(RESTART_DELAY_MAX, RESTART_DELAY * 2**i) for i in range(len(delays))]
        assert delays == expected, delays
        assert [e["early_deaths_in_a_row"] for e in deaths] == list(range(1, len(deaths) + 1))
    (gave_up,) = [e for e in proc.events() if "giving up" in e["message"]]
    assert gave_up["early_deaths_in_a_row"] == GIVE_UP_AFTER
    assert gave_up["level"] == "error"
    assert all(e["listen"] == f"{HOST}:{port}" for e in proc.messages("idemproxy cannot listen"))
    assert "Traceback" not in proc.stderr


async def test_health_fails_while_a_worker_is_missing_and_recovers_when_it_serves_again(
    redis_server: RedisProcess,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    started: list[CliProcess],
) -> None:
    """A worker killed (as the OOM killer would) turns /healthz and /readyz to 503 until its
    replacement listens; before, both said 200 throughout."""
    listen, admin = free_port(), free_port()
    proc = await CliProcess(*run_args(upstream.url, redis_server.url, listen, admin)).start()
    started.append(proc)
    health, ready = f"http://{HOST}:{admin}/healthz", f"http://{HOST}:{admin}/readyz"
    await wait_status(http, proc, health, 200)
    await wait_status(http, proc, ready, 200)
    victim = worker_pids(proc)[0]

    os.kill(victim, signal.SIGKILL)
    await wait_status(http, proc, health, 503)
    assert await status(http, ready) == 503
    await wait_status(http, proc, health, 200)
    await wait_status(http, proc, ready, 200)

    (died,) = proc.messages("worker died; restarting it")
    assert died["pid"] == victim
    assert died["exitcode"] == -signal.SIGKILL
    assert len(worker_pids(proc)) == 3
    headers = {"Idempotency-Key": "after-restart"}
    for _ in range(2):
        async with http.post(f"http://{HOST}:{listen}/orders", data=b"{}", headers=headers) as r:
            assert r.status == 201
    assert upstream.count("/orders") == 1

    await proc.stop()
    assert proc.returncode == 0, proc.stderr


@pytest.mark.timeout(120)
async def test_a_stuck_worker_stops_counting_as_serving_then_is_killed_and_replaced(
    redis_server: RedisProcess,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    started: list[CliProcess],
) -> None:
    """A worker whose process lives but runs nothing (SIGSTOP here; an endless loop or a
    blocking call alike) kept counting as serving while the kernel handed it connections."""
    listen, admin = free_port(), free_port()
    proc = await CliProcess(*run_args(upstream.url, redis_server.url, listen, admin)).start()
    started.append(proc)
    ready = f"http://{HOST}:{admin}/readyz"
    await wait_status(http, proc, ready, 200)
    victim = worker_pids(proc)[0]

    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    await wait_status(http, proc, ready, 503, seconds=HUNG_AFTER + 10)
    assert time.monotonic() - stopped >= HUNG_AFTER - 1
    async with http.get(ready) as answer:
        assert (await answer.json())["workers_serving"] == 1
    (stuck,) = proc.messages("worker stopped answering; not counted as serving")
    assert stuck["pid"] == victim
    assert stuck["level"] == "warning"

    await wait_status(http, proc, ready, 200, seconds=KILL_HUNG_AFTER + 20)
    (killed,) = proc.messages("worker still stuck; killing it")
    assert killed["pid"] == victim
    assert killed["silent_seconds"] >= KILL_HUNG_AFTER
    (died,) = proc.messages("worker died; restarting it")
    assert died["exitcode"] == -signal.SIGKILL
    assert gone(victim)
    headers = {"Idempotency-Key": "after-the-stuck-one"}
    for _ in range(4):  # both workers answer (the port is shared): one execution
        async with http.post(f"http://{HOST}:{listen}/orders", data=b"{}", headers=headers) as r:
            assert r.status == 201
    assert upstream.count("/orders") == 1

    await proc.stop()
    assert proc.returncode == 0, proc.stderr


async def test_workers_stop_when_their_supervisor_is_killed(
    redis_server: RedisProcess,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    started: list[CliProcess],
) -> None:
    """SIGKILL on the supervisor (no chance to stop anything): its workers notice the end of
    their socket pair and drain; before, they kept the port as orphans."""
    listen, admin = free_port(), free_port()
    proc = await CliProcess(*run_args(upstream.url, redis_server.url, listen, admin)).start()
    started.append(proc)
    await wait_status(http, proc, f"http://{HOST}:{admin}/healthz", 200)
    workers = worker_pids(proc)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait_exit()
        for _ in range(int(30 / STEP)):
            if all(gone(pid) for pid in workers):
                break
            await asyncio.sleep(STEP)
        assert all(gone(pid) for pid in workers), proc.stderr
        assert len(proc.messages("the supervisor is gone; this worker stops")) == 2
        with socket.socket() as probe:  # nobody holds the port any more
            probe.bind((HOST, listen))
    finally:
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


# --- a read-only root filesystem -------------------------------------------------------------

# Run inside a new mount namespace: every mount point there is remounted read-only (a bind
# remount changes only this namespace's view, never the host's), except those in $KEEP_WRITABLE.
# It then checks that every directory tempfile would try ($TMPDIR, /tmp, /var/tmp, /usr/tmp, the
# working directory) really is read-only before it execs the command (exit 97 otherwise).
READ_ONLY_SH = """\
for target in $(awk '{print $2}' /proc/self/mounts | sort -u); do
  case " $KEEP_WRITABLE " in *" $target "*) continue;; esac
  mount -o remount,bind,ro "$target" 2>/dev/null
done
for dir in "$TMPDIR" /tmp /var/tmp /usr/tmp "$PWD"; do
  if [ -d "$dir" ] && touch "$dir/.idemproxy-write-test" 2>/dev/null; then
    echo "$dir is still writable" >&2
    exit 97
  fi
done
exec "$@"
"""


@pytest.fixture(scope="module")
def unshare() -> list[str]:
    """The command that opens a private mount namespace: as root ``unshare --mount``, else a
    user namespace too (``--map-root-user``). Skips when neither works here."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): cannot make the filesystem read-only for one process")
    tries = [["unshare", "--mount", "--propagation", "private"]]
    tries.append(["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"])
    for command in tries if os.geteuid() == 0 else tries[1:]:
        probe = subprocess.run([*command, "true"], capture_output=True, check=False, timeout=10)
        if probe.returncode == 0:
            return command
    pytest.skip("mount namespaces are not available here")


def read_only(unshare: list[str], tmp_path: Path) -> list[str]:
    script = tmp_path / "read-only.sh"
    script.write_text(READ_ONLY_SH)
    return [*unshare, "sh", str(script)]


async def test_workers_run_on_a_read_only_root_filesystem_with_dev_shm(
    unshare: list[str],
    tmp_path: Path,
    redis_server: RedisProcess,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    started: list[CliProcess],
) -> None:
    """What Docker ``read_only: true`` and Kubernetes ``readOnlyRootFilesystem`` give: every
    mount read-only but /dev/shm, a tmpfs. Before, the supervisor died at start with "No usable
    temporary directory" (prometheus-client's multiprocess files). TMPDIR names a read-only
    directory too. Redis and the upstream run outside the namespace (same network)."""
    listen, admin = free_port(), free_port()
    proc = CliProcess(
        *run_args(upstream.url, redis_server.url, listen, admin),
        prefix=read_only(unshare, tmp_path),
        env={"KEEP_WRITABLE": SHM, "TMPDIR": str(tmp_path)},
    )
    started.append(await proc.start())
    await wait_status(http, proc, f"http://{HOST}:{admin}/healthz", 200)
    await wait_status(http, proc, f"http://{HOST}:{admin}/readyz", 200)

    headers = {"Idempotency-Key": "read-only-1"}
    for _ in range(2):
        async with http.post(f"http://{HOST}:{listen}/orders", data=b"{}", headers=headers) as r:
            assert r.status == 201
    assert upstream.count("/orders") == 1
    expected = [
        'idemproxy_requests_total{outcome="new",route="default"} 1.0',
        'idemproxy_requests_total{outcome="replayed",route="default"} 1.0',
    ]
    deadline = time.monotonic() + 5.0  # a worker hands its counts over every 0.5 s
    while True:
        async with http.get(f"http://{HOST}:{admin}/metrics") as response:
            text = await response.text()
        if all(line in text for line in expected) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    for line in expected:
        assert line in text

    await proc.stop()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


async def test_workers_with_nothing_writable_exit_1_saying_what_to_mount(
    unshare: list[str], tmp_path: Path, started: list[CliProcess]
) -> None:
    """Every mount read-only, /dev/shm too: one clear JSON error line and exit 1."""
    store = f"redis://{HOST}:{free_port()}/0"  # never reached: it stops before
    proc = CliProcess(
        *run_args("http://127.0.0.1:1", store, free_port(), free_port()),
        prefix=read_only(unshare, tmp_path),
        env={"KEEP_WRITABLE": "", "TMPDIR": str(tmp_path)},
    )
    started.append(await proc.start())
    assert await proc.wait_exit() == 1, proc.stderr
    assert len(proc.events()) == len(proc.lines), proc.stderr  # every line is JSON
    (error,) = [e for e in proc.events() if e["level"] == "error"]
    assert "writable directory" in error["message"]
    assert "TMPDIR" in error["message"]
    assert SHM in error["message"]


async def test_sighup_is_forwarded_to_every_worker(
    redis_server: RedisProcess,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    started: list[CliProcess],
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("routes:\n  - match: {path: /orders}\n")
    listen, admin = free_port(), free_port()
    args = run_args(upstream.url, redis_server.url, listen, admin)
    proc = await CliProcess(*args, "-c", str(policy)).start()
    started.append(proc)
    await wait_status(http, proc, f"http://{HOST}:{admin}/healthz", 200)

    policy.write_text("routes:\n  - match: {path: /orders}\n  - match: {path: /payments}\n")
    os.kill(proc.pid, signal.SIGHUP)
    await proc.wait_for(lambda: len(proc.messages("policy reloaded")) == 2, "two reloads")
    assert all(e["routes"] == 2 for e in proc.messages("policy reloaded"))
    assert await status(http, f"http://{HOST}:{admin}/healthz") == 200


REQUIRED_KEY = "routes:\n  - match: {methods: [POST], path: /orders}\n    key: {required: %s}\n"


async def start_two_workers(
    policy: Path, upstream: Upstream, redis: RedisProcess, started: list[CliProcess]
) -> tuple[CliProcess, int, int]:
    """``run --workers 2 -c policy``: the process, its listen port and its admin port."""
    listen, admin = free_port(), free_port()
    args = run_args(upstream.url, redis.url, listen, admin)
    proc = await CliProcess(*args, "-c", str(policy)).start()
    started.append(proc)
    return proc, listen, admin


async def test_a_sighup_while_workers_start_reaches_them_once_they_serve(
    redis_server: RedisProcess,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    started: list[CliProcess],
    tmp_path: Path,
) -> None:
    """A spawned worker has no SIGHUP handler until it runs its loop, and the default action
    ends it. Before, a reload sent while the workers started killed them (exit -1, counted
    towards giving up); now the supervisor holds the SIGHUP until each worker says it serves."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(REQUIRED_KEY % "true")
    proc, listen, admin = await start_two_workers(policy, upstream, redis_server, started)
    await proc.wait_for(lambda: len(worker_pids(proc)) == 2, "both workers spawned")
    # Spawned, not yet serving (a worker takes a good part of a second to import and listen):
    # the case under test. Checked, so that the test cannot pass without reaching it.
    assert not proc.messages("idemproxy worker started")
    policy.write_text(REQUIRED_KEY % "false")
    os.kill(proc.pid, signal.SIGHUP)

    await proc.wait_for(lambda: len(proc.messages("policy reloaded")) == 2, "both reloads")
    await wait_status(http, proc, f"http://{HOST}:{admin}/healthz", 200)
    assert not proc.messages("worker died; restarting it")
    assert len(worker_pids(proc)) == 2
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for _ in range(8):  # new connections: SO_REUSEPORT spreads them over both workers
            async with fresh.post(f"http://{HOST}:{listen}/orders", data=b"{}") as response:
                assert response.status == 201


async def test_a_worker_restarted_after_a_reload_serves_the_reloaded_policy(
    redis_server: RedisProcess,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    started: list[CliProcess],
    tmp_path: Path,
) -> None:
    """SPEC 7: after a SIGHUP reload the new policy stays. Before, the supervisor restarted a
    dead worker with the policy of its own start, so about half of the connections got the old
    one again (here: 400 idempotency_key_missing for a key that is no longer required)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(REQUIRED_KEY % "true")
    proc, listen, admin = await start_two_workers(policy, upstream, redis_server, started)
    health = f"http://{HOST}:{admin}/healthz"
    await wait_status(http, proc, health, 200)

    policy.write_text(REQUIRED_KEY % "false")
    os.kill(proc.pid, signal.SIGHUP)
    await proc.wait_for(lambda: len(proc.messages("policy reloaded")) == 2, "two reloads")
    os.kill(worker_pids(proc)[0], signal.SIGKILL)
    await proc.wait_for(lambda: len(worker_pids(proc)) == 3, "the worker restarted")
    await proc.wait_for(
        lambda: len(proc.messages("idemproxy worker started")) == 3, "the new worker listening"
    )
    await wait_status(http, proc, health, 200)

    statuses = []
    # A new connection each time: SO_REUSEPORT spreads connections over both workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        for _ in range(16):
            async with fresh.post(f"http://{HOST}:{listen}/orders", data=b"{}") as response:
                statuses.append(response.status)
    assert statuses == [201] * 16
