"""Faults with real processes: several proxies, workers, a killed proxy, a frozen proxy, Redis
crashing and hanging. Run alone with ``pytest -m faults``.

Each test prints one summary line: requests, duplicates sent, upstream executions, errors.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.conftest import HOST, RedisProcess, Upstream, free_port, idemproxy_argv

pytestmark = pytest.mark.faults


class ProxyProcess:
    """``python -m idemproxy run`` as a child process on loopback ports."""

    def __init__(self, policy: Path, upstream: str, store: str, workers: int = 1) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process = subprocess.Popen(
            idemproxy_argv(
                "run",
                "-c",
                str(policy),
                "--upstream",
                upstream,
                "--store",
                store,
                "--listen",
                f"{HOST}:{self.port}",
                "--admin",
                f"{HOST}:{self.admin_port}",
                "--workers",
                str(workers),
                "--log-format",
                "text",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self, http: aiohttp.ClientSession) -> None:
        """Up when the proxy port itself answers (workers bind it after the supervisor)."""
        for _ in range(600):  # 60 s: generous, a loaded 2-core machine starts Python slowly
            try:
                async with http.get(self.url + "/__probe") as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("proxy did not come up")

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def required_key_policy(tmp_path: Path, lock_ttl: float) -> Path:
    """A policy file keying POST /orders with a required key and this ``lock_ttl``."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        "routes:\n"
        "  - match: {methods: [POST], path: /orders}\n"
        "    key: {required: true}\n"
        f"    lock_ttl: {lock_ttl:g}s\n"
    )
    return path


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    return required_key_policy(tmp_path, lock_ttl=1)


@pytest.fixture
def redis_aof() -> Iterator[RedisProcess]:
    """A private Redis with an append-only file fsynced on every write."""
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisProcess(
            free_port(), workdir, extra=["--appendonly", "yes", "--appendfsync", "always"]
        )
        server.start()
        yield server
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        server.stop()


@pytest.fixture
async def proxies() -> AsyncIterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in started))


def executions(upstream: Upstream) -> Counter[str]:
    return Counter(
        c.headers.get("Idempotency-Key", "") for c in upstream.calls if c.path_qs == "/orders"
    )


def summary(name: str, requests: int, duplicates: int, upstream: Upstream, errors: int) -> None:
    ran = sum(executions(upstream).values())
    print(
        f"\n[{name}] requests={requests} duplicates_sent={duplicates} "
        f"upstream_executions={ran} errors={errors}"
    )


async def post(
    http: aiohttp.ClientSession, url: str, key: str, delay: float = 0.0
) -> tuple[int, str]:
    headers = {"Idempotency-Key": key, "X-Test-Delay": str(delay)}
    try:
        async with http.post(url + "/orders", data=key.encode(), headers=headers) as response:
            await response.read()
            return response.status, response.headers.get("X-Serial", "")
    except (aiohttp.ClientError, TimeoutError):
        return 0, ""


async def two_proxies(
    policy: Path,
    upstream: Upstream,
    redis: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> tuple[ProxyProcess, ProxyProcess]:
    """Two proxy processes sharing one Redis, both ready."""
    pair = (
        ProxyProcess(policy, upstream.url, redis.url),
        ProxyProcess(policy, upstream.url, redis.url),
    )
    proxies.extend(pair)
    await asyncio.gather(*(proxy.ready(http) for proxy in pair))
    return pair


async def started_upstream_call(
    http: aiohttp.ClientSession, proxy: ProxyProcess, upstream: Upstream, key: str, delay: float
) -> asyncio.Task[tuple[int, str]]:
    """Send a slow keyed request through ``proxy``; return once the upstream is running it."""
    task = asyncio.create_task(post(http, proxy.url, key, delay=delay))
    for _ in range(100):
        if executions(upstream)[key]:
            break
        await asyncio.sleep(0.02)
    return task


@pytest.mark.parametrize("topology", ["two-proxies", "two-workers"])
async def test_duplicate_storm_across_processes_runs_each_key_once(
    topology: str,
    policy: Path,
    upstream: Upstream,
    redis_server: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    if topology == "two-proxies":
        proxies += [ProxyProcess(policy, upstream.url, redis_server.url) for _ in range(2)]
    else:
        proxies.append(ProxyProcess(policy, upstream.url, redis_server.url, workers=2))
    for proxy in proxies:
        await proxy.ready(http)
    keys = [f"{topology}-{i}" for i in range(20)]
    copies = 10
    answers = await asyncio.gather(
        *(
            post(http, proxies[n % len(proxies)].url, key, delay=0.2)
            for key in keys
            for n in range(copies)
        )
    )
    statuses = Counter(status for status, _ in answers)
    errors = sum(n for status, n in statuses.items() if status not in (201, 409))
    summary(topology, len(answers), len(answers) - len(keys), upstream, errors)
    assert errors == 0, statuses
    assert executions(upstream) == dict.fromkeys(keys, 1)


async def test_killed_proxy_lease_expires_then_a_retry_runs_once(
    policy: Path,
    upstream: Upstream,
    redis_server: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    first, second = await two_proxies(policy, upstream, redis_server, proxies, http)
    key = "killed-mid-request"
    doomed = await started_upstream_call(http, first, upstream, key, delay=3.0)
    first.signal(signal.SIGKILL)
    assert (await doomed)[0] == 0  # the client lost its connection with the proxy

    seen = []
    for _ in range(100):  # the lease (lock_ttl 1s, no longer renewed) must expire by itself
        status, _ = await post(http, second.url, key)
        seen.append(status)
        if status != 409:
            break
        await asyncio.sleep(0.1)
    replay_status, _ = await post(http, second.url, key)
    summary("killed-proxy", len(seen) + 2, len(seen) + 1, upstream, seen.count(0))
    assert seen[0] == 409  # while the dead proxy's lease lasts, retries are refused
    assert seen[-1] == 201  # then exactly one retry runs
    assert replay_status == 201
    assert executions(upstream)[key] == 2  # the dead proxy's call, and the one retry


async def test_a_frozen_holder_whose_lease_was_taken_cannot_overwrite_the_new_record(
    policy: Path,
    upstream: Upstream,
    redis_server: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    frozen, other = await two_proxies(policy, upstream, redis_server, proxies, http)
    key = "fenced"
    stale = await started_upstream_call(http, frozen, upstream, key, delay=1.0)
    frozen.signal(signal.SIGSTOP)  # cannot renew: its lease runs out (lock_ttl 1s)
    await asyncio.sleep(2.0)
    new_status, new_serial = await post(http, other.url, key)
    frozen.signal(signal.SIGCONT)
    stale_status, stale_serial = await stale
    replay_status, replay_serial = await post(http, other.url, key)
    summary("fencing", 3, 2, upstream, 0)
    assert new_status == 201
    assert stale_status == 201  # the stale holder's client still gets its own answer
    assert stale_serial != new_serial
    assert replay_status == 201
    assert replay_serial == new_serial  # the newer holder's record was not overwritten


async def test_a_slow_call_keeps_its_lease_through_a_store_outage_shorter_than_lock_ttl(
    tmp_path: Path,
    upstream: Upstream,
    redis_aof: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    """README: the lease is renewed while the upstream call runs, so a slow call never loses it
    to a retry. Redis is down (SIGKILL, restarted from its append-only file) across the two
    renewals due in the first ``lock_ttl`` and back with under a third of the lease left: the
    live holder must renew it then, not a whole ``lock_ttl / 3`` after its last failed try."""
    lock_ttl = 9.0
    policy = required_key_policy(tmp_path, lock_ttl=lock_ttl)
    holder, other = await two_proxies(policy, upstream, redis_aof, proxies, http)
    key = "renewed-across-an-outage"
    slow = await started_upstream_call(http, holder, upstream, key, delay=lock_ttl + 3)
    assert redis_aof.process is not None
    redis_aof.process.kill()  # the lease is on disk; every renewal fails until the restart
    redis_aof.process.wait()
    await asyncio.sleep(2 * lock_ttl / 3 + 0.4)  # lower bound: both renewals due have failed
    await asyncio.to_thread(redis_aof.start)
    await asyncio.sleep(lock_ttl / 3)  # lower bound: past the lease's end, had it not been renewed
    retry_status, _ = await post(http, other.url, key)
    first_status, first_serial = await slow
    replay_status, replay_serial = await post(http, other.url, key)
    summary("outage-during-renewals", 3, 2, upstream, 0)
    assert retry_status == 409  # the live holder still holds the lease
    assert executions(upstream)[key] == 1
    assert (first_status, replay_status) == (201, 201)
    assert replay_serial == first_serial


async def test_a_completion_retried_in_the_background_lands_in_the_last_second_of_its_lease(
    tmp_path: Path,
    upstream: Upstream,
    redis_aof: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    """README: a completion the store refused is retried in the background while the lease
    lasts, so the record is not lost when the store comes back in time. The store refuses
    scripts (an ACL takes EVAL and EVALSHA away: every try fails at once, and Redis counts it
    in its NOPERM error count) from before the upstream answers until a failed try sees under
    a second of the lease left; then it takes them again. Retries a second apart came next
    only once the lease had expired: the record was lost and a retry ran the request again."""
    policy = required_key_policy(tmp_path, lock_ttl=6)
    proxy = ProxyProcess(policy, upstream.url, redis_aof.url)
    proxies.append(proxy)
    await proxy.ready(http)
    key = "completed-late"
    store = aioredis.Redis(host=HOST, port=redis_aof.port)
    try:
        # The upstream answers 1 s in, before the first renewal (2 s): only completions fail.
        first = await started_upstream_call(http, proxy, upstream, key, delay=1.0)
        await store.acl_setuser("default", enabled=True, commands=["-eval", "-evalsha"])
        (lease_key,) = [k async for k in store.scan_iter(match="idem:*")]
        first_status, first_serial = await first  # answered, though not recorded yet
        failed_tries = 0
        for _ in range(1000):  # 10 s at most; the lease lasts 6 s
            errors = await store.info("errorstats")
            tries = int(errors.get("errorstat_NOPERM", {}).get("count", 0))
            if tries > failed_tries:  # a try has just failed
                failed_tries = tries
                if await store.pttl(lease_key) < 1000:
                    break
            await asyncio.sleep(0.01)
        await store.acl_setuser("default", enabled=True, commands=["+@all"])
    finally:
        await store.aclose()
    answers = []
    for _ in range(100):  # 409 while the completion has not landed yet
        status, serial = await post(http, proxy.url, key)
        answers.append((status, serial))
        if status != 409:
            break
        await asyncio.sleep(0.1)
    summary("late-completion", 1 + len(answers), len(answers), upstream, 0)
    assert failed_tries > 0
    assert (first_status, answers[-1]) == (201, (201, first_serial))  # its replay
    assert executions(upstream)[key] == 1


async def test_redis_crash_and_restart_mid_traffic_loses_no_record(
    tmp_path: Path,
    upstream: Upstream,
    redis_aof: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    policy = required_key_policy(tmp_path, lock_ttl=10)
    proxy = ProxyProcess(policy, upstream.url, redis_aof.url)
    proxies.append(proxy)
    await proxy.ready(http)
    keys = [f"crash-{i}" for i in range(120)]
    first: dict[str, tuple[int, str]] = {}

    async def traffic() -> None:
        for key in keys:
            first[key] = await post(http, proxy.url, key)
            await asyncio.sleep(0.01)

    async def crash() -> None:
        await asyncio.sleep(0.4)
        assert redis_aof.process is not None
        redis_aof.process.kill()  # no clean shutdown: only the append-only file survives
        redis_aof.process.wait()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(redis_aof.start)

    await asyncio.gather(traffic(), crash())
    statuses = Counter(status for status, _ in first.values())
    assert statuses[503] > 0, statuses  # the outage was really hit
    assert set(statuses) <= {201, 503}, statuses  # fail_closed; never a 500 from the proxy

    second: dict[str, tuple[int, str]] = {}
    for key in keys:
        for _ in range(50):  # back within seconds, without a restart of the proxy
            second[key] = await post(http, proxy.url, key)
            # 409: a completion from the outage is still being retried in the background
            if second[key][0] not in (409, 503):
                break
            await asyncio.sleep(0.1)
    summary("redis-crash", 2 * len(keys), len(keys), upstream, statuses[503])
    assert {status for status, _ in second.values()} == {201}
    for key, (status, serial) in first.items():
        if status == 201:
            assert second[key][1] == serial, key  # its record survived: a replay
    assert max(executions(upstream).values()) == 1


async def test_hung_redis_gets_answers_not_hangs_and_recovers(
    policy: Path,
    upstream: Upstream,
    redis_aof: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    proxy = ProxyProcess(policy, upstream.url, redis_aof.url)
    proxies.append(proxy)
    await proxy.ready(http)
    assert redis_aof.process is not None
    redis_aof.process.send_signal(signal.SIGSTOP)
    try:
        timeout = aiohttp.ClientTimeout(total=20)
        async with http.post(
            proxy.url + "/orders", data=b"x", headers={"Idempotency-Key": "hung"}, timeout=timeout
        ) as response:
            assert response.status == 503
            assert response.headers["Retry-After"]
            assert (await response.json())["code"] == "store_unavailable"
        async with http.get(proxy.url + "/plain", timeout=timeout) as response:
            assert response.status == 201  # pass-through does not need the store
    finally:
        redis_aof.process.send_signal(signal.SIGCONT)
    for _ in range(50):
        status, _ = await post(http, proxy.url, "hung")
        if status == 201:
            break
        await asyncio.sleep(0.2)
    summary("hung-redis", 3, 1, upstream, 1)
    assert status == 201
    assert executions(upstream)["hung"] == 1


async def test_workers_answer_a_stalled_request_head_with_408(
    tmp_path: Path,
    upstream: Upstream,
    redis_server: RedisProcess,
    proxies: list[ProxyProcess],
    http: aiohttp.ClientSession,
) -> None:
    """limits.header_timeout holds in every worker (they build the same server)."""
    policy = tmp_path / "slow-heads.yaml"
    policy.write_text("limits: {header_timeout: 500ms}\n")
    proxy = ProxyProcess(policy, upstream.url, redis_server.url, workers=2)
    proxies.append(proxy)
    await proxy.ready(http)

    def stall() -> bytes:
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /orders HT")
            received = b""
            while chunk := sock.recv(65536):  # until the proxy closes (or 10 s: TimeoutError)
                received += chunk
            return received

    # Several connections, so that the kernel hands some to each worker.
    answers = await asyncio.gather(*(asyncio.to_thread(stall) for _ in range(6)))
    stalled = [a for a in answers if not a.startswith(b"HTTP/1.1 408 ")]
    summary("slow-heads-workers", len(answers), 0, upstream, len(stalled))
    assert stalled == []
    assert executions(upstream) == {}
