"""What README promises about processes, checked with real processes (issue 17, item 6).

Every proxy here is ``python -m idemproxy run`` as a child process (``--workers 2`` where the
claim is about workers), every store a real ``redis-server``, every upstream a real HTTP server
on loopback. Nothing is mocked; every wait polls a condition and is bounded (``BOUND``); the
few time bounds asserted are lower bounds (a deadline the proxy must wait for) or safety nets
many times the expected duration.

Which worker served a request: the upstream cannot see a pid, and the access log carries none.
The kernel knows, though. When the upstream receives a call, the proxy's end of that TCP
connection is a socket in one worker process: the upstream looks up the connection's 4-tuple in
``/proc/net/tcp`` (its socket inode) and finds which of the supervisor's children holds that
inode among its file descriptors (``/proc/<pid>/fd``). It does so while the connection is open
(the proxy is waiting for the answer), so the owner is the worker that forwarded this very
call. Worker pids and indexes come from the supervisor's own ``worker started`` log lines. A
call whose sender died between sending it and the lookup has no holder any more: it is marked
``EXITED`` (only the worker a test kills dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HOST, ProxyFactory, RedisProcess, Upstream, free_port, idemproxy_argv

pytestmark = pytest.mark.faults

BOUND = 20.0  # seconds: the upper bound of every wait in this file (never an expectation)
ROUTE = "orders"


# --- which process owns a TCP connection ---------------------------------------------------------


def _proc_address(host: str, port: int) -> str:
    """``host:port`` as /proc/net/tcp writes it: the address as a host-order hex word."""
    word = int.from_bytes(socket.inet_aton(host), sys.byteorder)
    return f"{word:08X}:{port:04X}"


def _socket_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    want = (_proc_address(*local), _proc_address(*remote))
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if (fields[1], fields[2]) == want and fields[9] != "0":
                return int(fields[9])
    return None


def _holder(inode: int, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
    return None


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (its main thread spawns the workers)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listed:
            return [int(child) for child in listed.read().split()]
    except OSError:
        return []


# --- a recording upstream that knows which worker sent each call --------------------------------


EXITED = -1  # the owner of a call whose sending process had exited before it could be looked up


@dataclass
class Execution:
    key: str
    owner: int | None  # pid of the proxy process whose connection carried the call
    serial: int


class RecordingUpstream:
    """A real HTTP server; ``POST /orders`` answers 201 with a per-call serial.

    ``hold`` (an Event) keeps every answer back until it is set; ``delay`` delays each answer.
    With ``supervisor`` set, each call records which of its children forwarded it.
    """

    def __init__(self) -> None:
        self.executions: list[Execution] = []
        self.arrived = asyncio.Event()
        self.hold: asyncio.Event | None = None
        self.delay = 0.0
        self.supervisor: int | None = None
        self.server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.port}"

    def per_key(self) -> Counter[str]:
        return Counter(e.key for e in self.executions)

    def _owner(self, request: web.Request) -> int | None:
        if self.supervisor is None or request.transport is None:
            return None
        peer = request.transport.get_extra_info("peername")[:2]
        here = request.transport.get_extra_info("sockname")[:2]
        inode = _socket_inode(peer, here)  # the proxy's end: local = our peer
        owner = None if inode is None else _holder(inode, children(self.supervisor))
        # A live worker's end of a connection it waits on is always found: no holder means the
        # process that sent this call has died since (in these tests, only a killed worker).
        return EXITED if owner is None else owner

    async def handle(self, request: web.Request) -> web.Response:
        owner = self._owner(request)  # first, while the sender surely still holds its end
        await request.read()
        key = request.headers.get("Idempotency-Key", "")
        serial = len(self.executions) + 1
        self.executions.append(Execution(key, owner, serial))
        self.arrived.set()
        if self.hold is not None:
            await asyncio.wait_for(self.hold.wait(), BOUND)
        elif self.delay:
            await asyncio.sleep(self.delay)
        body = json.dumps({"key": key, "serial": serial}).encode()
        return web.Response(
            status=201,
            body=body,
            content_type="application/json",
            headers={"X-Serial": f"{serial}"},
        )


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    app = web.Application()
    app.router.add_post("/orders", upstream.handle)
    server = TestServer(app, host=HOST, port=free_port())
    await server.start_server()
    upstream.server = server
    try:
        yield upstream
    finally:
        if upstream.hold is not None:
            upstream.hold.set()
        await server.close()


# --- the proxy as a child process -----------------------------------------------------------------


class ProxyProcess:
    """``python -m idemproxy run`` with JSON logs to a file; stopped by PID, whatever happens."""

    def __init__(
        self, policy: Path, store: str, workers: int = 1, upstream: str | None = None
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.admin_url = f"http://{HOST}:{self.admin_port}"
        self.log_path = policy.with_suffix(f".{uuid.uuid4().hex[:6]}.log")
        flags = ["--upstream", upstream] if upstream else []
        env = {k: v for k, v in os.environ.items() if k != "IDEMPROXY_CONFIG"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                idemproxy_argv(
                    "run",
                    "-c",
                    str(policy),
                    *flags,
                    "--store",
                    store,
                    "--listen",
                    f"{HOST}:{self.port}",
                    "--admin",
                    f"{HOST}:{self.admin_port}",
                    "--workers",
                    str(workers),
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        self.workers = workers
        self.seen_workers: set[int] = set()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    def events(self, message: str) -> list[dict[str, Any]]:
        return [line for line in self.log() if line.get("message") == message]

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its newest start, from the supervisor's log."""
        pids = {line["worker"]: line["pid"] for line in self.events("worker started")}
        self.seen_workers.update(pids.values())
        return pids

    async def until(self, condition: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + BOUND
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"idemproxy exited ({self.process.returncode}) waiting for {what}")
            if time.monotonic() > deadline:
                pytest.fail(f"not within {BOUND} s: {what}")
            await asyncio.sleep(0.05)

    async def ready(self, http: aiohttp.ClientSession) -> None:
        """Every process bound the listen port (its ``... started`` line) and admin answers."""
        if self.workers > 1:
            await self.until(
                lambda: len(self.events("idemproxy worker started")) >= self.workers,
                "every worker listening",
            )
        else:
            await self.until(lambda: self.events("idemproxy started"), "the proxy listening")
        # With --workers, /healthz is 200 once every worker told the supervisor it serves.
        healthy = False
        deadline = time.monotonic() + BOUND
        while not healthy and time.monotonic() < deadline:
            async with http.get(self.admin_url + "/healthz") as response:
                healthy = response.status == 200
            if not healthy:
                await asyncio.sleep(0.05)
        assert healthy, "/healthz never answered 200"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=BOUND)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self.worker_pids()
        for pid in self.seen_workers:  # workers a killed supervisor left behind
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if b"multiprocessing" in cmdline.read():
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def proxies() -> AsyncIterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in started))


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    """A Redis of this test's own: the test freezes it (always thawed again)."""
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisProcess(free_port(), workdir)
        server.start()
        try:
            yield server
        finally:
            if server.process is not None:
                server.process.send_signal(signal.SIGCONT)
            server.stop()


def write_policy(path: Path, prefix: str, route: str = "", top: str = "", store: str = "") -> Path:
    path.write_text(
        f"{top}store: {{key_prefix: '{prefix}'{store}}}\n"
        "routes:\n"
        f"  - name: {ROUTE}\n"
        "    match: {methods: [POST], path: /orders}\n"
        "    key: {required: true}\n"
        f"{route}"
    )
    return path


@dataclass
class Answer:
    status: int  # 0: no answer (connection refused, reset or closed)
    body: bytes = b""
    replayed: bool = False


async def post(http: aiohttp.ClientSession, url: str, key: str) -> Answer:
    headers = {"Idempotency-Key": key}
    timeout = aiohttp.ClientTimeout(total=BOUND)
    try:
        async with http.post(url + "/orders", data=key, headers=headers, timeout=timeout) as r:
            body = await r.read()
            return Answer(r.status, body, r.headers.get("Idempotent-Replayed") == "true")
    except (aiohttp.ClientError, TimeoutError):
        return Answer(0)


def counts(text: str, name: str) -> dict[str, float]:
    """Samples of ``name`` on our route, by outcome."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("route") == ROUTE:
                found[sample.labels["outcome"]] = sample.value
    return found


async def requests_total(
    http: aiohttp.ClientSession, proxy: ProxyProcess, at_least: int = 0
) -> dict[str, float]:
    """``idemproxy_requests_total`` by outcome, once it sums to ``at_least`` (workers hand their
    counts to the supervisor every 0.5 s), or as it is after 5 s."""
    deadline = time.monotonic() + 5.0
    while True:
        async with http.get(proxy.admin_url + "/metrics") as response:
            assert response.status == 200
            total = counts(await response.text(), "idemproxy_requests_total")
        if sum(total.values()) >= at_least or time.monotonic() > deadline:
            return total
        await asyncio.sleep(0.1)


def fresh_connections() -> aiohttp.ClientSession:
    """A client that opens a new connection per request: the kernel spreads those over the
    workers' listening sockets (SO_REUSEPORT hashes each connection)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=50))


# --- --workers 2: both serve, each key once, /metrics summed ------------------------------------


async def test_two_workers_both_serve_a_storm_each_key_runs_once_and_metrics_sum(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    prefix: str,
) -> None:
    """README: ``--workers N`` runs N processes sharing the port; with one Redis a key runs once
    whichever worker a retry lands on; the supervisor's /metrics sums the workers' requests.

    Both workers served: the upstream saw calls forwarded by each worker pid (module docstring).
    """
    policy = write_policy(tmp_path / "policy.yaml", prefix, "    lock_ttl: 5s\n")
    proxy = ProxyProcess(policy, redis_server.url, workers=2, upstream=recorder.url)
    proxies.append(proxy)
    recorder.supervisor = proxy.pid
    recorder.delay = 0.2  # duplicates arrive while the first is in flight
    async with fresh_connections() as http:
        await proxy.ready(http)
        workers = set(proxy.worker_pids().values())
        assert len(workers) == 2
        keys = [f"storm-{i}" for i in range(30)]
        copies = 6
        answers = await asyncio.gather(
            *(post(http, proxy.url, key) for key in keys for _ in range(copies))
        )
        statuses = Counter(a.status for a in answers)
        assert set(statuses) <= {201, 409}, statuses
        assert recorder.per_key() == dict.fromkeys(keys, 1)
        owners = Counter(e.owner for e in recorder.executions)
        print(f"\n[two-workers] requests={len(answers)} statuses={dict(statuses)} by_pid={owners}")
        assert set(owners) == workers, owners  # each worker forwarded calls; no unknown owner

        metrics = await requests_total(http, proxy, at_least=len(answers))
    assert sum(metrics.values()) == len(answers), metrics
    assert metrics["new"] == len(keys), metrics


# --- a worker SIGKILLed mid-storm ---------------------------------------------------------------


async def test_a_worker_killed_mid_storm_is_restarted_and_no_key_runs_more_than_readme_allows(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    prefix: str,
) -> None:
    """README ("Running more than one"): the supervisor restarts a worker that dies; a proxy
    that dies mid-request leaves its lease until ``lock_ttl``, then one retry runs. So a key
    runs once, or twice when its first call was in flight in the killed worker; never more.
    Clients retry (bounded) on 409 and on a lost connection until each has its answer.
    The summed requests counter keeps the dead worker's counts ("restarted ones included").
    """
    policy = write_policy(tmp_path / "policy.yaml", prefix, "    lock_ttl: 1s\n")
    proxy = ProxyProcess(policy, redis_server.url, workers=2, upstream=recorder.url)
    proxies.append(proxy)
    recorder.supervisor = proxy.pid
    received = 0  # answers (of any status) that reached a client
    lost = 0  # requests that got no answer

    async def client(http: aiohttp.ClientSession, key: str) -> Answer:
        nonlocal received, lost
        deadline = time.monotonic() + BOUND
        for _ in range(400):
            answer = await post(http, proxy.url, key)
            received, lost = received + (answer.status != 0), lost + (answer.status == 0)
            if answer.status == 201 or time.monotonic() > deadline:
                return answer
            await asyncio.sleep(0.05)
        return answer

    async with fresh_connections() as http:
        await proxy.ready(http)
        before = proxy.worker_pids()
        victim = before[0]

        # Before the storm: some keys, done, so the victim surely has counted requests.
        warmup = await asyncio.gather(*(client(http, f"warm-{i}") for i in range(20)))
        assert {a.status for a in warmup} == {201}
        assert victim in {e.owner for e in recorder.executions}
        warm_counted = sum((await requests_total(http, proxy, at_least=len(warmup))).values())

        recorder.delay = 0.5
        keys = [f"kill-{i}" for i in range(30)]
        storm = asyncio.gather(*(client(http, key) for key in keys for _ in range(3)))
        try:
            # Kill once the victim surely has a call in flight at the upstream.
            deadline = time.monotonic() + BOUND
            while not any(e.owner == victim and e.key in keys for e in recorder.executions):
                assert time.monotonic() < deadline, "the victim forwarded no storm call"
                await asyncio.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
            answers = await asyncio.wait_for(storm, 2 * BOUND)
        finally:
            if not storm.done():
                storm.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await storm

        await proxy.until(lambda: proxy.worker_pids()[0] != victim, "worker 0 restarted")
        restarted = proxy.worker_pids()[0]
        await proxy.until(
            lambda: len(proxy.events("idemproxy worker started")) >= 3, "the new worker listening"
        )
        assert proxy.process.poll() is None
        os.kill(restarted, 0)  # alive

        # The restarted worker serves: new connections reach it too.
        recorder.delay = 0.0
        after = await asyncio.gather(*(client(http, f"after-{i}") for i in range(40)))
        assert {a.status for a in after} == {201}
        total = await requests_total(http, proxy, at_least=received)

    assert {a.status for a in answers} == {201}, Counter(a.status for a in answers)
    runs = recorder.per_key()
    first_owner: dict[str, int | None] = {}
    for e in recorder.executions:
        first_owner.setdefault(e.key, e.owner)
    twice = sorted(k for k in keys if runs[k] == 2)
    print(
        f"\n[worker-killed] clients={len(answers)} ran_once={sum(runs[k] == 1 for k in keys)} "
        f"ran_twice={len(twice)} answers={received} lost={lost} victim={victim} new={restarted}"
    )
    assert all(1 <= runs[k] <= 2 for k in keys), runs
    for key in twice:  # only a call in flight in the killed worker may run again
        assert first_owner[key] in (victim, EXITED), (key, first_owner[key])
    after_owners = {e.owner for e in recorder.executions if e.key.startswith("after-")}
    assert restarted in after_owners
    assert after_owners <= {restarted, before[1]}, after_owners  # the two live workers
    # The dead worker's counts stay in the sum: what was counted before the storm, the victim's
    # warm-up included, plus the answers after the restart. (A worker hands its counts over
    # every 0.5 s, so the victim's last 0.5 s before SIGKILL may be missing.) At most the
    # requests that got no answer were counted besides those received.
    counted = sum(total.values())
    assert warm_counted + len(after) <= counted <= received + lost, (total, warm_counted, lost)


# --- the store fails after the upstream answered ------------------------------------------------


async def test_store_frozen_after_the_upstream_answered_the_client_gets_it_and_retries_replay(
    tmp_path: Path,
    private_redis: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    prefix: str,
) -> None:
    """README ("Store outages"): if the store fails after the upstream answered, the client
    still gets the answer, and the completion is retried in the background while the lease
    lasts. Deterministic: the upstream holds its answer while Redis is frozen (SIGSTOP)."""
    policy = write_policy(tmp_path / "policy.yaml", prefix, "    lock_ttl: 20s\n")
    proxy = ProxyProcess(policy, private_redis.url, upstream=recorder.url)
    proxies.append(proxy)
    recorder.hold = asyncio.Event()
    assert private_redis.process is not None
    redis_pid = private_redis.process.pid
    async with aiohttp.ClientSession() as http:
        await proxy.ready(http)
        first = asyncio.create_task(post(http, proxy.url, "frozen-store"))
        try:
            await asyncio.wait_for(recorder.arrived.wait(), BOUND)  # the lease is taken
            os.kill(redis_pid, signal.SIGSTOP)
            try:
                recorder.hold.set()  # the upstream answers; completing it needs the store
                answer = await asyncio.wait_for(first, BOUND)
                assert answer.status == 201  # the answer, though the store did not take it
                await proxy.until(
                    lambda: proxy.events(
                        "store unavailable when settling a lease; retrying in the background"
                    ),
                    "the failed completion logged",
                )
            finally:
                os.kill(redis_pid, signal.SIGCONT)  # well within lock_ttl (20 s)
        finally:
            recorder.hold.set()
            if not first.done():
                first.cancel()
        await proxy.until(
            lambda: proxy.events("lease settled after the store came back"),
            "the completion retried once the store was back",
        )
        retry = await post(http, proxy.url, "frozen-store")
    assert retry.status == 201
    assert retry.replayed
    assert retry.body == answer.body
    assert len(recorder.executions) == 1


# --- SIGTERM with requests still waiting at the shutdown_timeout deadline -----------------------

DRAIN = 1.0  # shutdown_timeout of these tests, seconds


@dataclass
class CutOff:
    """What SIGTERM did to keyed requests whose upstream never answered."""

    exit_code: int
    took: float  # from the signal to the exit, as the test saw it
    settled_after: list[float]  # per request: its "upstream failure" line after "shutting down"
    log: list[dict[str, Any]]
    retries: list[Answer]  # a retry of each key through another proxy on the same store


def _log_time(line: dict[str, Any]) -> float:
    stamp = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return stamp.timestamp()


async def cut_off_at_shutdown(
    tmp_path: Path,
    redis: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    make_proxy: ProxyFactory,
    prefix: str,
    requests: int,
) -> CutOff:
    """``requests`` keyed requests held by the upstream, then SIGTERM (``shutdown_timeout``
    DRAIN, ``lock_ttl`` 60 s); once the proxy exited, a retry of each through an in-process
    proxy on the same Redis and prefix (its upstream is the ``upstream`` fixture)."""
    policy = write_policy(
        tmp_path / "policy.yaml", prefix, "    lock_ttl: 60s\n", top=f"shutdown_timeout: {DRAIN}s\n"
    )
    proxy = ProxyProcess(policy, redis.url, upstream=recorder.url)
    proxies.append(proxy)
    recorder.hold = asyncio.Event()  # never set while the proxy runs
    keys = [f"cut-off-{i}" for i in range(requests)]
    async with aiohttp.ClientSession() as http:
        await proxy.ready(http)
        in_flight = asyncio.gather(*(post(http, proxy.url, key) for key in keys))
        await proxy.until(lambda: len(recorder.executions) == requests, "all at the upstream")
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proxy.process.wait, 2 * DRAIN + BOUND)
        took = time.monotonic() - signalled
        await asyncio.wait_for(in_flight, BOUND)  # cut off: no answer (README promises none)
    log = proxy.log()
    (stopping,) = [_log_time(line) for line in log if line["message"] == "idemproxy shutting down"]
    failures = [line for line in log if line["message"] == "upstream failure"]
    assert [line.get("settled") for line in failures] == ["stored"] * requests
    other = await make_proxy(policy.read_text(), store=redis.url)
    async with aiohttp.ClientSession() as http:
        retries = [await post(http, other.url, key) for key in keys]
    print(
        f"\n[shutdown] requests={requests} exit={code} took={took:.2f}s "
        f"retries={Counter(r.status for r in retries)}"
    )
    return CutOff(code, took, [_log_time(f) - stopping for f in failures], log, retries)


def assert_settled_as_ambiguous(answer: Answer) -> None:
    """``ambiguous: store``: the 502 was stored; a retry is its replay, not a 409."""
    assert answer.status == 502, answer
    assert answer.replayed
    assert json.loads(answer.body)["code"] == "upstream_unavailable"


async def test_sigterm_waits_the_drain_time_then_exits_0(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    make_proxy: ProxyFactory,
    upstream: Upstream,
    prefix: str,
) -> None:
    """README: SIGTERM lets in-flight requests finish within ``shutdown_timeout``, then exits 0;
    a request still waiting for the upstream when the drain time runs out is settled like any
    ambiguous failure. What holds: the request gets the whole drain time, the exit is 0, the
    settlement is stored as ``ambiguous: store`` says before the store closes, so the retry is
    its replay, and nothing runs twice."""
    cut = await cut_off_at_shutdown(
        tmp_path, redis_server, recorder, proxies, make_proxy, prefix, requests=1
    )
    assert cut.exit_code == 0
    assert cut.took >= DRAIN  # the request was given the whole drain time
    assert "idemproxy stopped" in [line["message"] for line in cut.log]
    assert cut.retries[0].status == 502  # the replay of the stored 502, not a lease left (409)
    assert len(recorder.executions) == 1
    assert upstream.count() == 0  # the retry ran nothing


async def test_sigterm_cuts_off_at_shutdown_timeout(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    make_proxy: ProxyFactory,
    prefix: str,
) -> None:
    """README: ``shutdown_timeout`` is how long in-flight requests may take to finish on
    SIGTERM. The settlement's log line must come within it (half of it again as margin)."""
    cut = await cut_off_at_shutdown(
        tmp_path, redis_server, recorder, proxies, make_proxy, prefix, requests=1
    )
    assert cut.settled_after[0] < 1.5 * DRAIN, cut.settled_after


async def test_sigterm_settles_every_request_cut_off_at_the_deadline(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    make_proxy: ProxyFactory,
    prefix: str,
) -> None:
    """README's promise, with eight requests cut off at once: every key is settled, so a retry
    is the stored 502's replay, not a 409 for lock_ttl. The log shows the race when it is
    lost: "store unavailable when settling a lease; retrying in the background" after
    "idemproxy stopped", and no retry follows (the process is gone)."""
    cut = await cut_off_at_shutdown(
        tmp_path, redis_server, recorder, proxies, make_proxy, prefix, requests=8
    )
    assert cut.exit_code == 0
    for retry in cut.retries:
        assert_settled_as_ambiguous(retry)


def draining_proxy(
    tmp_path: Path,
    prefix: str,
    redis: RedisProcess,
    proxies: list[ProxyProcess],
    workers: int,
    upstream: str,
) -> ProxyProcess:
    """A proxy process (``workers`` of them) whose drain outlasts every test step
    (``shutdown_timeout: 30s``)."""
    policy = write_policy(tmp_path / "policy.yaml", prefix, "", top="shutdown_timeout: 30s\n")
    proxy = ProxyProcess(policy, redis.url, workers=workers, upstream=upstream)
    proxies.append(proxy)
    return proxy


async def sigterm_with_one_held(
    http: aiohttp.ClientSession, proxy: ProxyProcess, recorder: RecordingUpstream, key: str
) -> tuple[asyncio.Task[Answer], asyncio.Event]:
    """Once the proxy is ready, a keyed request that the upstream holds, then SIGTERM: the
    request's task, still in flight, and the event that lets the upstream answer it."""
    hold = recorder.hold = asyncio.Event()
    await proxy.ready(http)
    in_flight = asyncio.create_task(post(http, proxy.url, key))
    await asyncio.wait_for(recorder.arrived.wait(), BOUND)
    proxy.process.send_signal(signal.SIGTERM)
    return in_flight, hold


async def test_workers_sigterm_with_a_request_held_past_the_deadline_exits_0(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    prefix: str,
) -> None:
    """README: SIGTERM (forwarded to every worker by the supervisor) lets in-flight requests
    finish within ``shutdown_timeout``, then exits 0. With a request the upstream never
    answers and ``shutdown_timeout: 6s``, the workers must be the ones that stop it."""
    policy = write_policy(
        tmp_path / "policy.yaml", prefix, "    lock_ttl: 60s\n", top="shutdown_timeout: 6s\n"
    )
    proxy = ProxyProcess(policy, redis_server.url, workers=2, upstream=recorder.url)
    proxies.append(proxy)
    async with aiohttp.ClientSession() as http:
        in_flight, _ = await sigterm_with_one_held(http, proxy, recorder, "held-in-a-worker")
        code = await asyncio.to_thread(proxy.process.wait, 2 * 6 + BOUND)
        await asyncio.wait_for(in_flight, BOUND)
    (stopped,) = [e for e in proxy.events("idemproxy stopped") if "worker_exit_codes" in e]
    assert stopped["worker_exit_codes"] == [0, 0]  # today: [-9, -9], killed while draining
    assert code == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_readyz_says_stopping_while_sigterm_drains(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    prefix: str,
    workers: int,
) -> None:
    """From SIGTERM on the listener takes no new connections while in-flight requests drain;
    /readyz said 200 all that time (found by the section 6 audit), so a load balancer kept
    sending to a proxy that refused. Now 503 "stopping", and the held request still ends."""
    proxy = draining_proxy(tmp_path, prefix, redis_server, proxies, workers, recorder.url)
    async with aiohttp.ClientSession() as http:
        in_flight, hold = await sigterm_with_one_held(http, proxy, recorder, "held-while-stopping")
        readiness: tuple[int, Any] = (0, None)
        for _ in range(int(BOUND / 0.05)):
            async with http.get(proxy.admin_url + "/readyz") as response:
                readiness = (response.status, await response.json())
            if readiness[0] == 503:
                break
            await asyncio.sleep(0.05)
        assert readiness == (503, {"status": "stopping"})
        hold.set()
        answer = await asyncio.wait_for(in_flight, BOUND)
        code = await asyncio.to_thread(proxy.process.wait, BOUND)
    assert answer.status == 201
    assert code == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_an_upload_under_way_finish(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    prefix: str,
    workers: int,
) -> None:
    """SPEC 2: SIGTERM lets in-flight requests finish. A keyed request whose body was still
    arriving never did: aiohttp sets every connection to close before it drains and then drops
    the bytes that arrive, so its handler waited for the rest of the body until
    shutdown_timeout, and the client got a closed connection (access line 499). Found by the
    workers audit (raw sockets, half a body sent before SIGTERM, the rest after)."""
    proxy = draining_proxy(tmp_path, prefix, redis_server, proxies, workers, recorder.url)
    uploads = 4  # connections: the kernel spreads them over the workers
    async with aiohttp.ClientSession() as http:
        await proxy.ready(http)
        streams = []
        for n in range(uploads):
            reader, writer = await asyncio.open_connection(HOST, proxy.port)
            writer.write(
                f"POST /orders HTTP/1.1\r\nHost: {HOST}\r\nIdempotency-Key: upload-{n}\r\n"
                "Content-Length: 10\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            # "100 Continue": the request is in flight and its handler reads the body now.
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
            assert head.startswith(b"HTTP/1.1 100 "), head
            writer.write(b"01234")
            streams.append((reader, writer))
        proxy.process.send_signal(signal.SIGTERM)
        await proxy.until(
            lambda: len(proxy.events("idemproxy shutting down")) >= (workers + (workers > 1)),
            "every process stopping",
        )
        await asyncio.sleep(0.5)  # let the drain begin (sooner would only make this pass)
        answers = []
        for reader, writer in streams:
            writer.write(b"56789")
            answers.append(await asyncio.wait_for(reader.read(), BOUND))
            writer.close()
        code = await asyncio.to_thread(proxy.process.wait, BOUND)
    assert [answer.split(b"\r\n", 1)[0] for answer in answers] == [b"HTTP/1.1 201 Created"] * 4
    assert sorted(e.key for e in recorder.executions) == [f"upload-{n}" for n in range(uploads)]
    assert sorted(line["status"] for line in proxy.log() if "status" in line) == [201] * 4
    assert code == 0


async def test_sigterm_keeps_relaying_what_a_websocket_client_sends_while_it_drains(
    tmp_path: Path, redis_server: RedisProcess, proxies: list[ProxyProcess], prefix: str
) -> None:
    """The same drop as above, for a WebSocket open at SIGTERM: it stayed open for the drain,
    but the messages its client sent meanwhile were dropped without a word, and the deadline
    then closed it with 1000 (normal closure). Found by the workers audit (an echo upstream:
    no echo came for a message sent after SIGTERM)."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            await socket.send_str(f"echo:{message.data}")
        return socket

    app = web.Application()
    app.router.add_get("/ws", echo)
    upstream = TestServer(app, host=HOST, port=free_port())
    await upstream.start_server()
    try:
        upstream_url = f"http://{HOST}:{upstream.port}"
        proxy = draining_proxy(tmp_path, prefix, redis_server, proxies, 2, upstream_url)
        async with aiohttp.ClientSession() as http:
            await proxy.ready(http)
            async with http.ws_connect(proxy.url + "/ws") as socket:
                await socket.send_str("before")
                assert (await socket.receive(timeout=BOUND)).data == "echo:before"
                proxy.process.send_signal(signal.SIGTERM)
                await proxy.until(
                    lambda: len(proxy.events("idemproxy shutting down")) >= 3,
                    "every process stopping",
                )
                await asyncio.sleep(0.5)  # let the drain begin (sooner would only make this pass)
                await socket.send_str("during")
                assert (await socket.receive(timeout=BOUND)).data == "echo:during"
            code = await asyncio.to_thread(proxy.process.wait, BOUND)
    finally:
        await upstream.close()
    assert code == 0


# --- fail_open counts as store_error ------------------------------------------------------------


async def test_fail_open_forwards_and_counts_the_request_as_store_error(
    tmp_path: Path, recorder: RecordingUpstream, proxies: list[ProxyProcess], prefix: str
) -> None:
    """README (metrics, dashboard): a keyed request forwarded unprotected under ``fail_open``
    counts as outcome ``store_error``. The store: a port where no Redis listens."""
    policy = write_policy(tmp_path / "policy.yaml", prefix, store=", on_error: fail_open")
    dead = f"redis://{HOST}:{free_port()}/0"
    proxy = ProxyProcess(policy, dead, upstream=recorder.url)
    proxies.append(proxy)
    async with aiohttp.ClientSession() as http:
        await proxy.ready(http)
        answers = [await post(http, proxy.url, "open") for _ in range(2)]
        metrics = await requests_total(http, proxy)
        async with http.get(proxy.admin_url + "/metrics") as response:
            exposition = (await response.text()).splitlines()
    assert [a.status for a in answers] == [201, 201]
    assert not any(a.replayed for a in answers)
    assert recorder.per_key() == {"open": 2}  # forwarded, unprotected: it ran twice
    assert metrics == {"store_error": 2}
    assert "idemproxy_fail_open_total 2.0" in exposition  # the dashboard and alert read it
    assert len(proxy.events("store unavailable, forwarding unprotected")) == 2


# --- reload: what needs a restart is said and not applied ---------------------------------------


async def test_reload_names_settings_that_need_a_restart_and_keeps_their_old_values(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    prefix: str,
) -> None:
    """README: changes to ``upstream`` and ``shutdown_timeout`` need a restart; a reload says
    which it did not apply (``needs_restart`` in its log line) and applies the rest."""
    policy = tmp_path / "policy.yaml"
    write_policy(policy, prefix, top=f"shutdown_timeout: 5s\nupstream: {{url: '{recorder.url}'}}\n")
    proxy = ProxyProcess(policy, redis_server.url)  # upstream from the file, not a flag
    proxies.append(proxy)
    nowhere = f"http://{HOST}:{free_port()}"
    async with aiohttp.ClientSession() as http:
        await proxy.ready(http)
        assert (await post(http, proxy.url, "before")).status == 201
        text = policy.read_text()
        policy.write_text(
            text.replace(recorder.url, nowhere)
            .replace("shutdown_timeout: 5s", "shutdown_timeout: 7s")
            .replace("required: true", "required: true, header: X-Request-Key")
        )
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.until(lambda: proxy.events("policy reloaded"), "the reload logged")
        (reloaded,) = proxy.events("policy reloaded")
        # The route change applied: the key is read from the new header now.
        async with http.post(proxy.url + "/orders", headers={"X-Request-Key": "after"}) as r:
            assert r.status == 201
        # The upstream change did not: calls still reach the old upstream.
        assert [e.key for e in recorder.executions] == ["before", ""]
    assert reloaded["needs_restart"] == ["upstream", "shutdown_timeout"]


async def test_reload_applies_limits_or_says_they_need_a_restart(
    tmp_path: Path,
    redis_server: RedisProcess,
    recorder: RecordingUpstream,
    proxies: list[ProxyProcess],
    prefix: str,
) -> None:
    """README lists what a reload does not apply (listen, admin, upstream, store,
    shutdown_timeout) and says the reload names them; so a changed ``limits.max_in_flight`` is
    either applied or named in ``needs_restart``."""
    policy = write_policy(tmp_path / "policy.yaml", prefix, top="limits: {max_in_flight: 1}\n")
    proxy = ProxyProcess(policy, redis_server.url, upstream=recorder.url)
    proxies.append(proxy)
    recorder.hold = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        await proxy.ready(http)
        held = asyncio.create_task(post(http, proxy.url, "holds-the-only-slot"))
        try:
            await asyncio.wait_for(recorder.arrived.wait(), BOUND)
            assert (await post(http, proxy.url, "second")).status == 503  # max_in_flight: 1
            policy.write_text(policy.read_text().replace("max_in_flight: 1", "max_in_flight: 4"))
            proxy.process.send_signal(signal.SIGHUP)
            await proxy.until(lambda: proxy.events("policy reloaded"), "the reload logged")
            (reloaded,) = proxy.events("policy reloaded")
            third = asyncio.create_task(post(http, proxy.url, "third"))
            # Refused at once (503), or admitted: then the upstream holds it too.
            await proxy.until(
                lambda: third.done() or "third" in recorder.per_key(), "third refused or admitted"
            )
            admitted = "third" in recorder.per_key()
        finally:
            recorder.hold.set()
            await asyncio.wait_for(held, BOUND)
        await asyncio.wait_for(third, BOUND)
    assert admitted or "limits" in reloaded["needs_restart"], reloaded
