"""Failover chaos: exactly once through a Redis failover that loses un-replicated writes.

Real processes on loopback: a Redis master, two replicas and three sentinels; two ``idemproxy
run`` processes; the test's upstream counts executions per key. Clients send several hundred
keys, each key from two clients at once (one per proxy), retrying 409 and 503 until they get an
answer; some upstream calls are slow, so their leases are held across the faults.

The fault is a partition: both replicas are SIGSTOPped, then the master drops their links
(``CLIENT KILL TYPE replica``) - from then on nothing the master writes reaches a replica. Two
seconds later the master is SIGKILLed and the replicas resumed; the sentinels promote one.
Every write made during the partition is lost. Once every client has its answer, each key is
sent once more (a client whose answer was lost retries late).

``wait_replicas: 1`` must run no key twice and give every client of a key the same answer.
``wait_replicas: 0`` prints how many keys ran twice: that figure is README's.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from idemproxy.config import StoreConfig
from idemproxy.store import NotReplicated
from idemproxy.store.redis import RedisStore
from tests.conftest import HOST, RedisProcess, Upstream, free_port, redis_server_binary
from tests.contract.test_redis_modes import cli, cluster_port
from tests.process.test_faults import ProxyProcess, executions

pytestmark = [
    pytest.mark.chaos,
    # Twelve Redis, Sentinel and idemproxy processes share 2 cores with the storm: a failover
    # starves the test's loop for a second or two on its own (every blocking step of the test
    # runs in asyncio.to_thread).
    pytest.mark.blocks_loop("the loop is starved by the processes of the chaos setup"),
]

KEYS = 300
LAUNCH_SECONDS = 6.0  # keys start evenly over this long
PARTITION_AT = 2.0  # seconds after the storm started
KILL_AT = 4.0
SLOW_EVERY = 7  # every 7th key's upstream call takes SLOW_DELAY: its lease spans the faults
SLOW_DELAY = 2.5
CLIENT_DEADLINE = 45.0  # no client retries past this (seconds after the storm started)
RETRY_DELAY = 0.2


def _poll(condition: object, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if callable(condition) and condition():
                return
        except subprocess.CalledProcessError:
            pass
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


class SentinelGroup:
    """A master, two replicas and three sentinels (quorum 2), each stopped by PID."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        for name in ("master", "replica-1", "replica-2"):
            (Path(workdir) / name).mkdir()
        self.master = RedisProcess(
            free_port(), f"{workdir}/master", extra=["--repl-diskless-sync-delay", "0"]
        )
        self.replicas = [
            RedisProcess(
                free_port(),
                f"{workdir}/replica-{i}",
                extra=["--replicaof", HOST, str(self.master.port)],
            )
            for i in (1, 2)
        ]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.master.start()
        for replica in self.replicas:
            replica.start()
        for i, port in enumerate(self.sentinel_ports):
            conf = Path(self.workdir) / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind {HOST}\ndir {self.workdir}\n"
                f"sentinel monitor mymaster {HOST} {self.master.port} 2\n"
                "sentinel down-after-milliseconds mymaster 1000\n"
                "sentinel failover-timeout mymaster 5000\n"
                "sentinel parallel-syncs mymaster 2\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [redis_server_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

        def formed() -> bool:
            return all(
                "slaves=2,sentinels=3" in cli(port, "info", "sentinel")
                for port in self.sentinel_ports
            ) and all(
                "master_link_status:up" in cli(r.port, "info", "replication") for r in self.replicas
            )

        _poll(formed, "the replicas did not sync or the sentinels did not find each other", 30)

    def master_port(self) -> int:
        answer = cli(self.sentinel_ports[0], "sentinel", "get-master-addr-by-name", "mymaster")
        return int(answer.split()[1])

    def promoted(self) -> bool:
        return self.master_port() != self.master.port

    def recover(self) -> None:
        """Nothing: the new master keeps the other replica."""

    def partition(self) -> None:
        """The replicas stop reading, then the master drops their links: nothing the master
        writes from now on reaches them (a stopped replica cannot reconnect)."""
        for replica in self.replicas:
            assert replica.process is not None
            replica.process.send_signal(signal.SIGSTOP)
        cli(self.master.port, "client", "kill", "type", "replica")

    def kill_master(self) -> None:
        assert self.master.process is not None
        self.master.process.send_signal(signal.SIGKILL)
        self.master.process.wait()
        for replica in self.replicas:
            assert replica.process is not None
            replica.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.terminate()
        for sentinel in self.sentinels:
            try:
                sentinel.wait(10)
            except subprocess.TimeoutExpired:
                sentinel.kill()
                sentinel.wait()
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.process.send_signal(signal.SIGCONT)
            replica.stop()
        self.master.stop()


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    with tempfile.TemporaryDirectory() as workdir:
        group = SentinelGroup(workdir)
        try:
            group.start()
            yield group
        finally:
            group.stop()


@pytest.fixture
async def proxy_processes() -> AsyncIterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in started))


@dataclass
class Storm:
    """What the clients saw."""

    answers: dict[str, list[str]] = field(default_factory=dict)  # key -> X-Serial of each client
    statuses: Counter[int] = field(default_factory=Counter)  # every status, retries included
    unanswered: list[str] = field(default_factory=list)
    faults: dict[str, float] = field(default_factory=dict)  # what happened when (seconds in)
    duration: float = 0.0


async def client(
    http: aiohttp.ClientSession,
    url: str,
    key: str,
    delay: float,
    storm: Storm,
    deadline: float,
) -> None:
    """Send ``key`` until it gets an answer: 409 and 503 (and a lost connection) are retried."""
    headers = {"Idempotency-Key": key, "X-Test-Delay": str(delay)}
    for _ in range(1000):
        try:
            async with http.post(url + "/orders", data=key.encode(), headers=headers) as response:
                await response.read()
                status, serial = response.status, response.headers.get("X-Serial", "")
        except (aiohttp.ClientError, TimeoutError):
            status, serial = 0, ""
        storm.statuses[status] += 1
        if status == 201:
            storm.answers.setdefault(key, []).append(serial)
            return
        if status not in (0, 409, 503) or time.monotonic() > deadline:
            break
        await asyncio.sleep(RETRY_DELAY)
    storm.unanswered.append(f"{key}: {status}")


class Faulty(Protocol):
    def partition(self) -> None: ...

    def kill_master(self) -> None: ...

    def promoted(self) -> bool: ...

    def recover(self) -> None:
        """After the promotion: what an operator (or Kubernetes) brings back."""


async def run_storm(
    group: Faulty,
    proxies: tuple[ProxyProcess, ProxyProcess],
    http: aiohttp.ClientSession,
    label: str,
) -> Storm:
    storm = Storm()
    rng = random.Random(13)
    started = time.monotonic()
    deadline = started + CLIENT_DEADLINE
    faults = storm.faults

    async def inject() -> None:
        await asyncio.sleep(PARTITION_AT)
        await asyncio.to_thread(group.partition)
        faults["partition"] = time.monotonic() - started
        await asyncio.sleep(KILL_AT - PARTITION_AT)
        await asyncio.to_thread(group.kill_master)
        faults["kill"] = time.monotonic() - started
        for _ in range(300):  # until a replica is the master
            try:
                if await asyncio.to_thread(group.promoted):
                    break
            except subprocess.CalledProcessError:
                pass
            await asyncio.sleep(0.1)
        faults["promoted"] = time.monotonic() - started
        await asyncio.to_thread(group.recover)

    async def key_storm(i: int) -> None:
        await asyncio.sleep(i * LAUNCH_SECONDS / KEYS)
        key = f"{label}-{i}"
        delay = SLOW_DELAY if i % SLOW_EVERY == 0 else rng.uniform(0.02, 0.2)
        await asyncio.gather(
            *(client(http, proxy.url, key, delay, storm, deadline) for proxy in proxies)
        )

    faulting = asyncio.create_task(inject())
    await asyncio.gather(*(key_storm(i) for i in range(KEYS)))
    await faulting
    # A client whose answer was lost retries late: once more per key, after the failover.
    late = [
        client(http, proxies[i % 2].url, f"{label}-{i}", 0.0, storm, time.monotonic() + 20)
        for i in range(KEYS)
    ]
    for start in range(0, KEYS, 50):
        await asyncio.gather(*late[start : start + 50])
    storm.duration = time.monotonic() - started
    return storm


def policy(tmp_path: Path, store: str, wait_replicas: int) -> Path:
    path = tmp_path / f"policy-{wait_replicas}.yaml"
    path.write_text(
        f"store:\n{store}"
        f"  wait_replicas: {wait_replicas}\n"
        "  wait_timeout: 100ms\n"
        "routes:\n"
        "  - match: {methods: [POST], path: /orders}\n"
        "    key: {required: true}\n"
        "    lock_ttl: 15s\n"
    )
    return path


async def storm_and_check(
    name: str,
    group: Faulty,
    path: Path,
    store_url: str,
    wait_replicas: int,
    proxy_processes: list[ProxyProcess],
    upstream: Upstream,
    http: aiohttp.ClientSession,
    outage: bool = True,
) -> None:
    """Two proxies, the storm with its faults, one summary line, and the assertions."""
    pair = (
        ProxyProcess(path, upstream.url, store_url),
        ProxyProcess(path, upstream.url, store_url),
    )
    proxy_processes.extend(pair)
    await asyncio.gather(*(proxy.ready(http) for proxy in pair))

    storm = await run_storm(group, pair, http, f"{name}-w{wait_replicas}")

    unreplicated = 0.0
    for proxy in pair:  # completions answered before a replica had them
        async with http.get(f"http://{HOST}:{proxy.admin_port}/metrics") as response:
            for line in (await response.text()).splitlines():
                if line.startswith("idemproxy_store_unreplicated_total "):
                    unreplicated += float(line.split()[1])
    ran = executions(upstream)
    twice = sorted(key for key, count in ran.items() if count > 1)
    differing = sorted(key for key, seen in storm.answers.items() if len(set(seen)) > 1)
    faults = storm.faults
    print(
        f"\n[chaos {name} wait_replicas={wait_replicas}] keys={KEYS} clients_per_key=2+1 late "
        f"slow_keys={len(range(0, KEYS, SLOW_EVERY))} "
        f"partition_at={faults['partition']:.1f}s failover_started_at={faults['kill']:.1f}s "
        f"new_master_at={faults['promoted']:.1f}s keys_run_twice={len(twice)} "
        f"keys_with_differing_answers={len(differing)} "
        f"upstream_executions={sum(ran.values())} statuses={dict(sorted(storm.statuses.items()))} "
        f"unreplicated_completions={unreplicated:.0f} unanswered={len(storm.unanswered)} "
        f"storm_seconds={storm.duration:.1f}"
    )
    assert not storm.unanswered, storm.unanswered[:10]
    if outage:
        assert storm.statuses[503]  # the faults did hit the clients
    assert len(ran) == KEYS  # every key ran at least once
    if wait_replicas:
        assert twice == [], f"{len(twice)} keys ran twice: {twice[:10]}"
        assert differing == [], f"{len(differing)} keys answered differently: {differing[:10]}"
        assert all(len(seen) == 3 for seen in storm.answers.values())


@pytest.mark.timeout(150)
@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_sentinel_partition_then_master_killed_mid_storm(
    wait_replicas: int,
    sentinel_group: SentinelGroup,
    proxy_processes: list[ProxyProcess],
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    sentinels = ", ".join(f"'{HOST}:{p}'" for p in sentinel_group.sentinel_ports)
    store = f"  mode: sentinel\n  service_name: mymaster\n  sentinels: [{sentinels}]\n"
    path = policy(tmp_path, store, wait_replicas)
    store_url = f"redis://{HOST}:{sentinel_group.master.port}/0"  # mode sentinel: the db only
    await storm_and_check(
        "sentinel", sentinel_group, path, store_url, wait_replicas, proxy_processes, upstream, http
    )


# --- Cluster -----------------------------------------------------------------------------------


def _replication(port: int) -> dict[str, str]:
    fields = {}
    for line in cli(port, "info", "replication").splitlines():
        name, _, value = line.strip().partition(":")
        fields[name] = value
    return fields


class ClusterGroup:
    """Redis Cluster: three masters with a replica each. The victim is a master other than
    the one the proxies are pointed at; its replica takes over when it dies."""

    def __init__(self, workdir: str) -> None:
        self.nodes = []
        for i in range(6):
            (Path(workdir) / f"node-{i}").mkdir()
            self.nodes.append(
                RedisProcess(
                    cluster_port(),
                    f"{workdir}/node-{i}",
                    extra=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-node-timeout",
                        "2000",
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
            )
        self.entry = self.victim = self.victim_replica = self.nodes[0]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cli(
            self.nodes[0].port,
            "--cluster",
            "create",
            *(f"{HOST}:{node.port}" for node in self.nodes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        )

        def formed() -> bool:
            if not all(
                "cluster_state:ok" in cli(node.port, "cluster", "info") for node in self.nodes
            ):
                return False
            roles = [_replication(node.port) for node in self.nodes]
            replicas = [r for r in roles if r.get("role") == "slave"]
            return len(replicas) == 3 and all(r.get("master_link_status") == "up" for r in replicas)

        _poll(formed, "the cluster did not form with a synced replica per master", 40)
        masters = [n for n in self.nodes if _replication(n.port)["role"] == "master"]
        self.entry, self.victim = masters[0], masters[1]
        self.victim_replica = next(
            n
            for n in self.nodes
            if _replication(n.port).get("master_port") == str(self.victim.port)
        )

    def partition(self) -> None:
        assert self.victim_replica.process is not None
        self.victim_replica.process.send_signal(signal.SIGSTOP)
        cli(self.victim.port, "client", "kill", "type", "replica")

    def kill_master(self) -> None:
        assert self.victim.process is not None
        assert self.victim_replica.process is not None
        self.victim.process.send_signal(signal.SIGKILL)
        self.victim.process.wait()
        self.victim_replica.process.send_signal(signal.SIGCONT)

    def promoted(self) -> bool:
        return _replication(self.victim_replica.port).get("role") == "master" and (
            "cluster_state:ok" in cli(self.entry.port, "cluster", "info")
        )

    def recover(self) -> None:
        """The dead master restarts (empty: no persistence) and rejoins as the new master's
        replica. Until it has synced, that shard has no replica and refuses new keys (503)."""
        self.victim.start()

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGCONT)
            node.stop()


class ManualFailover(ClusterGroup):
    """``CLUSTER FAILOVER`` on the victim's replica: the two swap roles without losing a write;
    the proxies must follow the MOVED answers of the old master without a restart."""

    def partition(self) -> None:
        """No partition: a manual failover waits for the replica to catch up."""

    def kill_master(self) -> None:
        cli(self.victim_replica.port, "cluster", "failover")

    def promoted(self) -> bool:
        return _replication(self.victim_replica.port).get("role") == "master" and (
            _replication(self.victim.port).get("master_link_status") == "up"
        )

    def recover(self) -> None:
        """Nothing: the old master is the new master's replica."""


@pytest.fixture
def cluster_group() -> Iterator[ClusterGroup]:
    with tempfile.TemporaryDirectory() as workdir:
        group = ClusterGroup(workdir)
        try:
            group.start()
            yield group
        finally:
            group.stop()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_cluster_master_partitioned_then_killed_mid_storm(
    wait_replicas: int,
    cluster_group: ClusterGroup,
    proxy_processes: list[ProxyProcess],
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    path = policy(tmp_path, "  mode: cluster\n", wait_replicas)
    await storm_and_check(
        "cluster",
        cluster_group,
        path,
        cluster_group.entry.url,
        wait_replicas,
        proxy_processes,
        upstream,
        http,
    )


@pytest.mark.timeout(150)
async def test_cluster_manual_failover_mid_storm_is_followed_without_a_restart(
    proxy_processes: list[ProxyProcess],
    upstream: Upstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        group = ManualFailover(workdir)
        try:
            group.start()
            path = policy(tmp_path, "  mode: cluster\n", 1)
            await storm_and_check(
                "cluster-manual-failover",
                group,
                path,
                group.entry.url,
                1,
                proxy_processes,
                upstream,
                http,
                outage=False,
            )
        finally:
            await asyncio.gather(*(asyncio.to_thread(p.stop) for p in proxy_processes))
            group.stop()


async def test_cluster_wait_counts_only_the_replicas_of_the_key_owner(
    cluster_group: ClusterGroup,
) -> None:
    """Each master has one replica. WAIT 1 after each lease: every lease is on a replica when
    the call returns. WAIT 2 must fail: only a WAIT sent to every master and added up (what a
    cluster pipeline does with a keyless command) would count 3."""
    config = StoreConfig(cluster_group.entry.url, "", "fail_closed", mode="cluster")
    one = RedisStore(replace(config, wait_replicas=1))
    two = RedisStore(replace(config, wait_replicas=2))
    try:
        keys = [f"owner-{i}" for i in range(30)]
        for key in keys:
            assert await one.acquire(key, "fp", "t", 30.0) is None
        replicas = [n for n in cluster_group.nodes if _replication(n.port)["role"] == "slave"]
        assert sum(int(cli(n.port, "dbsize").strip()) for n in replicas) == len(keys)
        await one.ready()
        for i in range(6):
            with pytest.raises(NotReplicated):
                await two.acquire(f"two-{i}", "fp", "t", 30.0)
        with pytest.raises(NotReplicated):
            await two.ready()
        masters = [n for n in cluster_group.nodes if _replication(n.port)["role"] == "master"]
        assert sum(int(cli(n.port, "dbsize").strip()) for n in masters) == len(keys)  # released
        # One shard's replica stops: only the keys of that shard are refused. (A WAIT sent to
        # any other master would answer 1 at once: its replica has all that connection wrote.)
        router = RedisCluster.from_url(cluster_group.entry.url)
        try:
            await router.initialize()
            owners = {f"cut-{i}": router.get_node_from_key(f"cut-{i}") for i in range(30)}
        finally:
            await router.aclose()
        cluster_group.partition()
        try:
            for key, owner in owners.items():
                assert owner is not None
                if owner.port == cluster_group.victim.port:
                    with pytest.raises(NotReplicated):
                        await one.acquire(key, "fp", "t", 30.0)
                else:
                    assert await one.acquire(key, "fp", "t", 30.0) is None
        finally:
            assert cluster_group.victim_replica.process is not None
            cluster_group.victim_replica.process.send_signal(signal.SIGCONT)
        assert {o.port for o in owners.values() if o is not None} >= {cluster_group.victim.port}
    finally:
        await one.close()
        await two.close()
