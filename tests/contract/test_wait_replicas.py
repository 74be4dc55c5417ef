"""``store.wait_replicas``: leases and completions acknowledged by replicas (Redis ``WAIT``).

A real master and a real replica on loopback. "Partitioned" is the replica SIGSTOPped (it reads
nothing, so it acknowledges nothing); both store clients are checked: the pipelined one (a
plain ``redis://`` URL) and redis-py (a URL with an option).
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest

from idemproxy.config import ConfigError, StoreConfig, load_text
from idemproxy.records import COMPLETED, StoredResponse
from idemproxy.store import NotReplicated
from idemproxy.store.redis import RedisStore
from tests.conftest import HOST, ProxyFactory, RedisProcess, Upstream, free_port, run_cli
from tests.contract.test_redis_modes import cli

RESPONSE = StoredResponse(201, [("Location", "/orders/1")], b"ok")


@dataclass
class Replicated:
    master: RedisProcess
    replica: RedisProcess

    def freeze(self) -> None:
        assert self.replica.process is not None
        self.replica.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.replica.process is not None
        self.replica.process.send_signal(signal.SIGCONT)

    def on_replica(self, key: str) -> str:
        return cli(self.replica.port, "getrange", key, "0", "0").strip()

    def on_master(self, key: str) -> str:
        return cli(self.master.port, "getrange", key, "0", "0").strip()


def wait_for_link(replica: RedisProcess) -> None:
    for _ in range(200):
        if "master_link_status:up" in cli(replica.port, "info", "replication"):
            return
        time.sleep(0.05)
    raise AssertionError("the replica did not sync")


@pytest.fixture
def replicated() -> Iterator[Replicated]:
    with tempfile.TemporaryDirectory() as workdir:
        for name in ("master", "replica"):
            (Path(workdir) / name).mkdir()
        master = RedisProcess(
            free_port(), f"{workdir}/master", extra=["--repl-diskless-sync-delay", "0"]
        )
        replica = RedisProcess(
            free_port(), f"{workdir}/replica", extra=["--replicaof", HOST, str(master.port)]
        )
        try:
            master.start()
            replica.start()
            wait_for_link(replica)
            yield Replicated(master, replica)
        finally:
            if replica.process is not None:
                replica.process.send_signal(signal.SIGCONT)
            replica.stop()
            master.stop()


# The pipelined client takes plain URLs; any other URL option goes through redis-py.
CLIENTS = {"pipelined": "", "redis-py": "?health_check_interval=0"}


@pytest.fixture(params=sorted(CLIENTS))
async def store(
    request: pytest.FixtureRequest, replicated: Replicated
) -> AsyncIterator[RedisStore]:
    url = f"redis://{HOST}:{replicated.master.port}/0{CLIENTS[request.param]}"
    opened = RedisStore(StoreConfig(url, "", "fail_closed", wait_replicas=1, wait_timeout=0.1))
    yield opened
    await opened.close()


async def test_an_acknowledged_lease_and_record_are_on_the_replica_when_the_call_returns(
    store: RedisStore, replicated: Replicated
) -> None:
    assert await store.acquire("k", "fp", "t", 30.0) is None
    assert replicated.on_replica("k") == "i"  # read at once: no polling, WAIT already saw it
    assert await store.complete("k", "t", RESPONSE, 60.0)
    assert replicated.on_replica("k") == "c"


async def test_concurrent_leases_share_a_write_and_each_is_acknowledged(
    store: RedisStore, replicated: Replicated
) -> None:
    keys = [f"many-{i}" for i in range(50)]
    results = await asyncio.gather(*(store.acquire(k, "fp", "t", 30.0) for k in keys))
    assert results == [None] * len(keys)
    assert int(cli(replicated.replica.port, "dbsize").strip()) == len(keys)


async def test_an_unacknowledged_lease_is_a_store_failure_and_is_released(
    store: RedisStore, replicated: Replicated
) -> None:
    replicated.freeze()
    try:
        keys = [f"cut-{i}" for i in range(20)]
        results = await asyncio.gather(
            *(store.acquire(k, "fp", "t", 30.0) for k in keys), return_exceptions=True
        )
        assert all(isinstance(r, NotReplicated) for r in results), results
        assert not any(r.maybe_applied for r in results if isinstance(r, NotReplicated))
        assert all(replicated.on_master(k) == "" for k in keys)  # nothing left locked
    finally:
        replicated.thaw()
    assert await store.acquire("cut-0", "fp", "t2", 30.0) is None  # runs once the replica is back


async def test_an_unacknowledged_completion_is_recorded_and_a_retry_acknowledges_it(
    store: RedisStore, replicated: Replicated
) -> None:
    assert await store.acquire("late", "fp", "t", 30.0) is None
    replicated.freeze()
    try:
        with pytest.raises(NotReplicated):
            await store.complete("late", "t", RESPONSE, 60.0)
        assert replicated.on_master("late") == "c"  # on the master all the same
        # Reading an existing record writes nothing, so needs no acknowledgement.
        record = await store.acquire("late", "fp", "t2", 30.0)
        assert record is not None
        assert record.state == COMPLETED
        assert record.response == RESPONSE
    finally:
        replicated.thaw()
    assert await store.complete("late", "t", RESPONSE, 60.0)  # the retry, acknowledged
    assert replicated.on_replica("late") == "c"


async def test_more_replicas_than_connected_fail_every_lease_and_readiness(
    replicated: Replicated,
) -> None:
    config = StoreConfig(replicated.master.url, "", "fail_closed", wait_replicas=2)
    store = RedisStore(config)
    try:
        with pytest.raises(NotReplicated):
            await store.acquire("two", "fp", "t", 30.0)
        with pytest.raises(NotReplicated, match="1 replica"):
            await store.ready()
        assert replicated.on_master("two") == ""
    finally:
        await store.close()
    one = RedisStore(replace(config, wait_replicas=1))
    try:
        await one.ready()
    finally:
        await one.close()


async def test_a_frozen_replica_stops_counting_for_readiness_and_counts_again_once_thawed(
    store: RedisStore, replicated: Replicated
) -> None:
    """A replica that is linked but acknowledges nothing (SIGSTOP: a hung process, a partition
    the master has not noticed) fails every lease with wait_replicas, yet /readyz said 200 as
    long as INFO listed it (found by the section 7 audit). Its lag counts now."""
    await store.ready()
    replicated.freeze()
    try:
        await _until_ready_is(store, False)
    finally:
        replicated.thaw()
    await _until_ready_is(store, True)


async def _until_ready_is(store: RedisStore, ready: bool) -> None:
    """Poll ``store.ready()`` until it passes (``ready``) or raises NotReplicated; bounded."""
    for _ in range(200):  # 10 s: the lag limit (2 s) and the replicas cache (1 s) with margin
        try:
            await store.ready()
            if ready:
                return
        except NotReplicated:
            if not ready:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"store.ready() did not become {'ready' if ready else 'NotReplicated'}")


# --- through the proxy -----------------------------------------------------------------------

POLICY = "store:\n  wait_replicas: 1\n  wait_timeout: 100ms\n"


async def post(http: aiohttp.ClientSession, url: str, key: str, delay: float = 0.0) -> int:
    headers = {"Idempotency-Key": key, "X-Test-Delay": str(delay)}
    async with http.post(url + "/orders", data=b"x", headers=headers) as response:
        await response.read()
        return response.status


async def test_proxy_answers_503_to_an_unacknowledged_lease_and_leaves_no_lock(
    replicated: Replicated,
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await make_proxy(POLICY, store=replicated.master.url)
    replicated.freeze()
    try:
        async with http.post(
            proxy.url + "/orders", data=b"x", headers={"Idempotency-Key": "p1"}
        ) as response:
            assert response.status == 503
            assert (await response.json())["code"] == "store_unavailable"
        assert upstream.count() == 0
    finally:
        replicated.thaw()
    assert await post(http, proxy.url, "p1") == 201  # not locked: runs now, once
    assert upstream.count() == 1


async def test_fail_open_forwards_an_unacknowledged_lease_unprotected(
    replicated: Replicated,
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await make_proxy(POLICY + "  on_error: fail_open\n", store=replicated.master.url)
    replicated.freeze()
    try:
        assert await post(http, proxy.url, "open") == 201  # on_error decides: forwarded
        assert upstream.count() == 1
        async with http.get(proxy.admin_url + "/metrics") as response:
            assert 'outcome="store_error"' in await response.text()
        prefix = proxy.server.config.store.key_prefix
        assert cli(replicated.master.port, "--scan", "--pattern", prefix + "*").split() == []
    finally:
        replicated.thaw()


async def test_proxy_answers_an_unacknowledged_completion_counts_it_and_replicates_it_later(
    replicated: Replicated,
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    proxy = await make_proxy(POLICY, store=replicated.master.url)
    task = asyncio.create_task(post(http, proxy.url, "slow", delay=0.5))
    for _ in range(200):  # the lease is taken (and acknowledged) once the upstream runs it
        if upstream.count():
            break
        await asyncio.sleep(0.01)
    replicated.freeze()
    try:
        assert await task == 201  # answered although no replica acknowledged the record
        async with http.get(proxy.admin_url + "/metrics") as response:
            assert "idemproxy_store_unreplicated_total 1.0" in await response.text()
    finally:
        replicated.thaw()
    prefix = proxy.server.config.store.key_prefix
    keys = cli(replicated.master.port, "--scan", "--pattern", prefix + "*").split()
    assert len(keys) == 1
    for _ in range(100):  # the background retry reaches the replica
        if replicated.on_replica(keys[0]) == "c":
            break
        await asyncio.sleep(0.1)
    assert replicated.on_replica(keys[0]) == "c"
    assert await post(http, proxy.url, "slow") == 201  # a replay
    assert upstream.count() == 1


async def test_readyz_is_503_while_fewer_replicas_than_wait_replicas_are_connected(
    replicated: Replicated, make_proxy: ProxyFactory, http: aiohttp.ClientSession
) -> None:
    two = await make_proxy("store: {wait_replicas: 2}\n", store=replicated.master.url)
    async with http.get(two.admin_url + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["store"] == "replicas"
    one = await make_proxy(POLICY, store=replicated.master.url)
    async with http.get(one.admin_url + "/readyz") as response:
        assert response.status == 200


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [
        ("store:\n  wait_replicas: 1\n", "store.wait_replicas", 2),  # memory://
        ("store:\n  url: redis://h:1/0\n  wait_replicas: -1\n", "store.wait_replicas", 3),
        ("store:\n  url: redis://h:1/0\n  wait_replicas: 1.5\n", "store.wait_replicas", 3),
        ("store:\n  url: redis://h:1/0\n  wait_replicas: two\n", "store.wait_replicas", 3),
        ("store:\n  url: redis://h:1/0\n  wait_replicas: true\n", "store.wait_replicas", 3),
        ("store:\n  url: redis://h:1/0\n  wait_timeout: 5s\n", "store.wait_timeout", 3),
        ("store:\n  url: redis://h:1/0\n  wait_timeout: 100\n", "store.wait_timeout", 3),
    ],
)
def test_check_rejects_bad_wait_replicas(text: str, path: str, line: int) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(text)
    assert [(p.path, p.line) for p in caught.value.problems] == [(path, line)]


def test_wait_replicas_defaults_and_check_names_the_field(tmp_path: Path) -> None:
    store = load_text("store: {url: 'redis://h:1/0'}\n").store
    assert (store.wait_replicas, store.wait_timeout) == (0, 0.1)
    config = load_text("store: {url: 'redis://h:1/0', wait_replicas: 2, wait_timeout: 250ms}\n")
    assert (config.store.wait_replicas, config.store.wait_timeout) == (2, 0.25)
    policy = tmp_path / "policy.yaml"
    policy.write_text("store:\n  url: memory://\n  wait_replicas: 1\n")
    result = run_cli("check", "-c", str(policy))
    assert result.returncode == 1
    assert f"{policy}:3: store.wait_replicas:" in result.stderr + result.stdout
