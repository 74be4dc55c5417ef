"""The pipelined Redis client (``idemproxy.store.resp``) against real redis-server processes.

Every server here is a ``redis-server`` child of this test on a loopback port (or a unix socket in
a short temporary directory), stopped by PID in teardown; nothing is mocked. Most scenarios run
twice: on the default asyncio loop (as async tests) and on uvloop, which is what ``idemproxy run``
uses, through an ``asyncio.Runner`` with uvloop's loop factory.

Timing assertions are only generous bounds: a store call fails within a few store timeouts, a
refused connection fails well within one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, cast
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis
import uvloop

from idemproxy.config import StoreConfig
from idemproxy.errors import StoreUnavailable
from idemproxy.records import COMPLETED, IN_FLIGHT, StoredResponse
from idemproxy.store.redis import (
    ACQUIRE,
    COMPLETE,
    GET,
    STORE_TIMEOUT,
    RedisStore,
    _RedisPy,
    decode_record,
)
from idemproxy.store.resp import (
    NotSent,
    PipelinedRedis,
    ReplyError,
    Script,
    fast_path_supports,
)
from tests.conftest import HOST, RedisProcess, free_port

FP = "fingerprint-a"
LONG = 60.0  # a lease or TTL that never runs out during a test
# A store call that Redis does not answer fails after the store timeout, noticed by a watchdog
# that looks twice a second: about 2.5 s. Bounds here are generous multiples of that.
ANSWER_BOUND = 10.0
PASSWORD = "default-pw-7f3a"
ACL_USER = "alice"
ACL_PASSWORD = "p@ss:w/rd%?#&="  # needs URL-encoding: checks that the client unquotes it

RESPONSE = StoredResponse(
    201, [("Content-Type", "application/json"), ("Set-Cookie", "a=1")], b'{"ok": true}'
)

Scenario = Callable[["Servers"], Coroutine[Any, Any, None]]


# --- fixtures ------------------------------------------------------------------------------


class Servers:
    """Starts redis-servers on free loopback ports in one short temporary directory."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.started: list[RedisProcess] = []

    def start(self, *extra: str) -> RedisProcess:
        server = RedisProcess(free_port(), self.workdir, extra=list(extra))
        self.started.append(server)
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.started:
            if server.process is not None and server.process.poll() is None:
                server.process.send_signal(signal.SIGCONT)  # a test may have left it frozen
            server.stop()


@pytest.fixture
def servers() -> Iterator[Servers]:
    # /tmp/rsXXXXXXXX: short enough for a unix socket path (about 100 characters at most)
    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as workdir:
        started = Servers(workdir)
        try:
            yield started
        finally:
            started.stop_all()


def store_at(url: str) -> RedisStore:
    return RedisStore(StoreConfig(url, "", "fail_closed"))


def raw_client(server: RedisProcess, db: int = 0, password: str | None = None) -> aioredis.Redis:
    """A redis-py client of its own, to look at what the store left in Redis."""
    return aioredis.Redis(host=HOST, port=server.port, db=db, password=password)


async def stats(raw: aioredis.Redis) -> tuple[int, int]:
    """(clients connected now, connections ever accepted) as the server counts them."""
    clients = await raw.info("clients")
    totals = await raw.info("stats")
    return int(clients["connected_clients"]), int(totals["total_connections_received"])


class Frozen:
    """SIGSTOP the server for the block, SIGCONT after it whatever happens."""

    def __init__(self, server: RedisProcess) -> None:
        assert server.process is not None
        self.pid = server.process.pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


async def outcome(call: Awaitable[object]) -> tuple[BaseException | None, float]:
    """What a call raised (None when it succeeded) and how long it took."""
    started = time.monotonic()
    try:
        await call
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


# --- 1. pipelining: many concurrent calls, one connection ------------------------------------


async def scenario_pipelining(servers: Servers) -> None:
    server = servers.start()
    raw = raw_client(server)
    store = store_at(server.url)
    try:
        clients_before, accepted_before = await stats(raw)
        count = 500
        keys = [f"pipe:{i}" for i in range(count)]
        taken = await asyncio.gather(
            *(store.acquire(key, f"fp-{i}", f"tok-{i}", LONG) for i, key in enumerate(keys))
        )
        assert taken == [None] * count
        clients_after, accepted_after = await stats(raw)
        assert clients_after == clients_before + 1  # the store holds exactly one connection
        assert accepted_after == accepted_before + 1  # and never opened another
        assert await raw.exists(*keys) == count

        # Each caller got its own reply: the records (and a second round of acquires by other
        # tokens, answered with the holder's record) match their keys one for one.
        records = await asyncio.gather(*(store.get(key) for key in keys))
        for i, record in enumerate(records):
            assert record is not None
            assert (record.state, record.fingerprint, record.token) == (
                IN_FLIGHT,
                f"fp-{i}",
                f"tok-{i}",
            )
        again = await asyncio.gather(
            *(store.acquire(key, f"fp-{i}", "other", LONG) for i, key in enumerate(keys))
        )
        assert [r.token if r is not None else None for r in again] == [
            f"tok-{i}" for i in range(count)
        ]
        assert (await stats(raw))[1] == accepted_before + 1
    finally:
        await store.close()
        await raw.aclose()


async def test_concurrent_acquires_share_one_pipelined_connection(servers: Servers) -> None:
    await scenario_pipelining(servers)


# --- 2. a cancelled caller does not shift the replies of the others --------------------------


async def scenario_cancelled_caller(servers: Servers) -> None:
    server = servers.start()
    raw = raw_client(server)
    client = PipelinedRedis(server.url, STORE_TIMEOUT)
    try:
        values = {f"c:{i}": f"value-{i}".encode() for i in range(8)}
        await raw.mset(values)
        await raw.set("c:text", "not-a-number")
        assert await client.execute("PING") == b"PONG"

        async def round_(cancel_blocker: bool, cancelled: set[str]) -> None:
            # BLPOP holds back every later command on the connection until the gate opens: all
            # of them are written and none is answered while callers are cancelled.
            gate = "c:gate"
            blocker = asyncio.ensure_future(client.execute("BLPOP", gate, 10))
            getters = {k: asyncio.ensure_future(client.execute("GET", k)) for k in values}
            failing = asyncio.ensure_future(client.execute("INCR", "c:text"))
            tail = asyncio.ensure_future(client.execute("ECHO", "tail"))
            await asyncio.sleep(0.2)
            everything = [blocker, *getters.values(), failing, tail]
            assert not any(task.done() for task in everything)
            if cancel_blocker:
                blocker.cancel()
            for key in cancelled:
                getters[key].cancel()
            await raw.lpush(gate, "open")
            await asyncio.wait(everything, timeout=ANSWER_BOUND)
            if cancel_blocker:
                assert blocker.cancelled()
            else:
                assert blocker.result() == [gate.encode(), b"open"]
            for key, task in getters.items():
                if key in cancelled:
                    assert task.cancelled(), key
                else:
                    assert task.result() == values[key], key
            with pytest.raises(ReplyError, match="not an integer"):
                failing.result()
            assert tail.result() == b"tail"

        await round_(cancel_blocker=False, cancelled={"c:0", "c:3"})
        await round_(cancel_blocker=True, cancelled={"c:7"})
        # the connection is still in step and still the only one
        replies = await asyncio.gather(*(client.execute("GET", k) for k in values))
        assert replies == list(values.values())
        clients, _ = await stats(raw)
        assert clients == 2  # raw and the pipelined connection
    finally:
        await client.close()
        await raw.aclose()


async def test_cancelled_caller_does_not_shift_replies(servers: Servers) -> None:
    await scenario_cancelled_caller(servers)


# --- 3. Redis restarted on the same port -------------------------------------------------------


async def scenario_restart(servers: Servers) -> None:
    server = servers.start()
    store = store_at(server.url)
    try:
        assert await store.acquire("r:before", FP, "t1", LONG) is None
        server.stop()
        # Down: every call fails. The first may still go out on the dead connection (its fate
        # unknown); once the loss is seen, a refused reconnect says nothing reached Redis.
        with pytest.raises(StoreUnavailable):
            await store.acquire("r:down", FP, "t1", LONG)
        await asyncio.sleep(0.1)
        for call in (store.get("r:down"), store.acquire("r:down", FP, "t1", LONG), store.ping()):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            assert caught.value.maybe_applied is False

        server.start()  # same port, a new process: empty data set and empty script cache
        raw = raw_client(server)
        try:
            scripts = (ACQUIRE.sha, COMPLETE.sha, GET.sha)
            assert await raw.script_exists(*scripts) == [False, False, False]
            # the same store object, not re-created: NOSCRIPT makes it fall back to EVAL
            assert await store.acquire("r:after", FP, "t2", LONG) is None
            assert await store.complete("r:after", "t2", RESPONSE, LONG) is True
            record = await store.get("r:after")
            assert record is not None
            assert (record.state, record.token, record.response) == (COMPLETED, "t2", RESPONSE)
            assert await store.get("r:before") is None  # the old server's data is gone
            assert await raw.script_exists(*scripts) == [True, True, True]

            # Restarted again with no call while it was down: the loss was noticed while the
            # loop idled, and the first call afterwards simply reconnects.
            await raw.aclose()
            server.stop()
            await asyncio.sleep(0.2)
            server.start()
            raw = raw_client(server)
            assert await store.acquire("r:again", FP, "t3", LONG) is None
            assert decode_record(cast(bytes, await raw.get("r:again"))).token == "t3"
        finally:
            await raw.aclose()
    finally:
        await store.close()


async def test_redis_restarted_on_same_port_store_recovers_with_scripts(
    servers: Servers,
) -> None:
    await scenario_restart(servers)


async def test_connection_killed_by_server_is_replaced(servers: Servers) -> None:
    server = servers.start()
    raw = raw_client(server)
    store = store_at(server.url)
    try:
        assert await store.acquire("kill:1", FP, "t1", LONG) is None
        _, accepted = await stats(raw)
        assert await raw.client_kill_filter(_type="normal", skipme=True) == 1
        await asyncio.sleep(0.1)
        assert await store.acquire("kill:2", FP, "t2", LONG) is None
        assert (await stats(raw))[1] == accepted + 1
    finally:
        await store.close()
        await raw.aclose()


# --- 4. an unresponsive (frozen) Redis -----------------------------------------------------


async def scenario_frozen(servers: Servers) -> None:
    server = servers.start()
    store = store_at(server.url)
    fresh = store_at(server.url)  # first connects while Redis is frozen (the kernel accepts)
    try:
        assert await store.acquire("f:warm", FP, "t1", LONG) is None
        with Frozen(server):
            results = await asyncio.gather(
                outcome(store.acquire("f:1", FP, "t1", LONG)),
                outcome(store.get("f:warm")),
                outcome(store.complete("f:warm", "t1", RESPONSE, LONG)),
                outcome(fresh.ping()),
            )
        for error, elapsed in results:
            assert isinstance(error, StoreUnavailable), error
            assert error.maybe_applied is True  # sent, answer lost: it may have run
            # not earlier than the store timeout (generously), not much later either
            assert STORE_TIMEOUT / 2 < elapsed < ANSWER_BOUND, elapsed
        # thawed: the same stores work again
        assert await store.acquire("f:2", FP, "t2", LONG) is None
        record = await store.get("f:warm")
        assert record is not None
        assert record.token == "t1"
        await fresh.ping()
    finally:
        await store.close()
        await fresh.close()


async def test_frozen_redis_fails_within_bound_and_recovers(servers: Servers) -> None:
    await scenario_frozen(servers)


async def concurrent_failures_are_bounded(store: RedisStore, callers: int) -> list[float]:
    """Run ``callers`` pings at once; all must fail together, not one after another.

    "Together" is judged by the spread of their failure times, not by elapsed time: callers
    queued one after another would fail a whole STORE_TIMEOUT apart; callers sharing one bound
    fail within milliseconds of each other, so half a STORE_TIMEOUT is a generous margin on a
    loaded machine. The overall wait is a safety net only (longer than serial failures take).
    """
    tasks = [asyncio.create_task(outcome(store.ping())) for _ in range(callers)]
    done, pending = await asyncio.wait(tasks, timeout=callers * STORE_TIMEOUT + ANSWER_BOUND)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    finished = sorted(task.result()[1] for task in done)
    assert not pending, f"{len(pending)} of {callers} callers still waiting; done at {finished}"
    for task in done:
        assert isinstance(task.result()[0], StoreUnavailable)
    assert finished[-1] - finished[0] < STORE_TIMEOUT / 2, finished
    return finished


async def test_frozen_redis_concurrent_callers_on_a_new_connection_fail_together(
    servers: Servers,
) -> None:
    server = servers.start()
    store = store_at(f"redis://{HOST}:{server.port}/2")  # db 2: SELECT on every new connection
    try:
        with Frozen(server):
            await concurrent_failures_are_bounded(store, callers=4)
    finally:
        await store.close()


async def test_hanging_connect_concurrent_callers_fail_together() -> None:
    # A listener with a full accept queue drops further SYNs: connecting to it hangs, like a
    # host that is down behind a firewall.
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection((HOST, port)):  # fills the queue
            store = store_at(f"redis://{HOST}:{port}/0")
            try:
                await concurrent_failures_are_bounded(store, callers=4)
            finally:
                await store.close()


async def test_hanging_connect_fails_as_not_applied() -> None:
    """One caller against a hanging connect: it fails after the connect timeout, and says the
    command never reached Redis."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection((HOST, port)):
            store = store_at(f"redis://{HOST}:{port}/0")
            try:
                error, elapsed = await outcome(store.acquire("h", FP, "t1", LONG))
            finally:
                await store.close()
    assert isinstance(error, StoreUnavailable), error
    assert error.maybe_applied is False
    assert isinstance(error.__cause__, NotSent)
    assert elapsed < ANSWER_BOUND


# --- 5. nothing listening ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_nothing_listening_fails_fast_as_not_applied(where: str) -> None:
    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as workdir:
        url = (
            f"redis://{HOST}:{free_port()}/0"
            if where == "tcp"
            else f"unix://{workdir}/absent.sock?db=1"
        )
        store = store_at(url)
        try:
            for call in (store.acquire("k", FP, "t1", LONG), store.get("k"), store.ping()):
                error, elapsed = await outcome(call)
                assert isinstance(error, StoreUnavailable), error
                assert error.maybe_applied is False
                assert elapsed < STORE_TIMEOUT  # refused at once, not a timeout
        finally:
            await store.close()


# --- 6. AUTH and db ------------------------------------------------------------------------


async def scenario_auth_and_db(servers: Servers) -> None:
    server = servers.start("--requirepass", PASSWORD)
    admin = raw_client(server, password=PASSWORD)
    try:
        await admin.acl_setuser(
            ACL_USER,
            enabled=True,
            passwords=[f"+{ACL_PASSWORD}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        base = f"{HOST}:{server.port}"
        cases = {
            # url -> the db its record must land in
            f"redis://:{PASSWORD}@{base}/2": 2,
            f"redis://:{PASSWORD}@{base}?db=3": 3,
            f"redis://:{PASSWORD}@{base}/2?db=5": 5,  # the query wins, as with redis-py
            f"redis://{ACL_USER}:{quote(ACL_PASSWORD, safe='')}@{base}/4": 4,
        }
        for i, (url, db) in enumerate(cases.items()):
            store = store_at(url)
            try:
                assert await store.acquire(f"auth:{i}", FP, f"t{i}", LONG) is None
                await store.ping()
            finally:
                await store.close()
            in_db = raw_client(server, db=db, password=PASSWORD)
            try:
                stored = cast(bytes, await in_db.get(f"auth:{i}"))
                assert decode_record(stored).token == f"t{i}", url
            finally:
                await in_db.aclose()
            assert await admin.exists(f"auth:{i}") == 0, url  # not in db 0

        # the ACL user really authenticated as itself
        store = store_at(f"redis://{ACL_USER}:{quote(ACL_PASSWORD, safe='')}@{base}/4")
        try:
            await store.ping()
            users = [c["user"] for c in await admin.client_list() if c["db"] == "4"]
            assert users == [ACL_USER]
        finally:
            await store.close()

        wrong = "not-the-password-91c2"
        refused = {
            f"redis://:{wrong}@{base}/2": wrong,
            f"redis://{ACL_USER}:{wrong}@{base}/2": wrong,
            f"redis://nobody:{PASSWORD}@{base}/2": PASSWORD,
            f"redis://{base}/2": None,  # no password at all: NOAUTH
        }
        for url, secret in refused.items():
            store = store_at(url)
            try:
                for call in (store.acquire("auth:no", FP, "t", LONG), store.ping()):
                    with pytest.raises(StoreUnavailable) as caught:
                        await call
                    chain: list[BaseException] = []
                    seen: BaseException | None = caught.value
                    while seen is not None:
                        chain.append(seen)
                        seen = seen.__cause__ or seen.__context__
                    text = " ".join(f"{e!s} {e!r}" for e in chain)
                    for leaked in (secret, PASSWORD, ACL_PASSWORD):
                        if leaked is not None:
                            assert leaked not in text, (url, text)
            finally:
                await store.close()
        in_db = raw_client(server, db=2, password=PASSWORD)
        try:
            assert await in_db.exists("auth:no") == 0  # nothing ran without authentication
        finally:
            await in_db.aclose()
    finally:
        await admin.aclose()


async def test_auth_acl_user_and_db_from_url(servers: Servers) -> None:
    await scenario_auth_and_db(servers)


# --- 7. unix socket ------------------------------------------------------------------------


async def scenario_unix_socket(servers: Servers) -> None:
    path = f"{servers.workdir}/r.sock"
    assert len(path) < 100
    server = servers.start("--unixsocket", path, "--unixsocketperm", "700")
    raw = raw_client(server, db=1)
    store = store_at(f"unix://{path}?db=1")
    try:
        assert await store.acquire("unix:1", FP, "t1", LONG) is None
        assert await store.complete("unix:1", "t1", RESPONSE, LONG) is True
        record = await store.get("unix:1")
        assert record is not None
        assert record.response == RESPONSE
        stored = cast(bytes, await raw.get("unix:1"))  # in db 1, over TCP
        assert decode_record(stored).state == COMPLETED
        unix_clients = [c for c in await raw.client_list() if "U" in c["flags"]]
        assert [c["db"] for c in unix_clients] == ["1"]  # the store came over the socket
    finally:
        await store.close()
        await raw.aclose()


async def test_unix_socket_with_db(servers: Servers) -> None:
    await scenario_unix_socket(servers)


# --- 8. which URLs take the fast path --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fast"),
    [
        ("redis://h:1/0", True),
        ("redis://h:1", True),
        ("redis://:pw@h:1/3", True),
        ("redis://user:pw@h:1/3", True),
        ("unix:///tmp/x.sock", True),
        ("unix:///tmp/x.sock?db=2", True),
        ("redis://h:1?db=2", True),
        ("rediss://h:1/0", False),
        ("rediss://h:1", False),
        ("redis://h:1/0?socket_keepalive=true", False),
        ("redis://h:1/0?db=1&socket_timeout=3", False),
        ("unix:///tmp/x.sock?password=pw", False),
        ("memory://", False),
    ],
)
def test_fast_path_supports(url: str, fast: bool) -> None:
    assert fast_path_supports(url) is fast


@pytest.mark.parametrize(
    ("url", "mode", "client"),
    [
        ("redis://127.0.0.1:1/0", "standalone", PipelinedRedis),
        ("unix:///tmp/x.sock?db=1", "standalone", PipelinedRedis),
        ("redis://127.0.0.1:1/0?socket_keepalive=true", "standalone", _RedisPy),
        ("rediss://127.0.0.1:1/0", "standalone", _RedisPy),
        ("redis://127.0.0.1:1/0", "sentinel", _RedisPy),
    ],
)
async def test_store_picks_the_pipelined_client_only_for_plain_standalone(
    url: str, mode: str, client: type
) -> None:
    config = StoreConfig(
        url,
        "",
        "fail_closed",
        mode=mode,  # type: ignore[arg-type]
        sentinels=((HOST, 1),) if mode == "sentinel" else (),
        service_name="mymaster" if mode == "sentinel" else "",
    )
    store = RedisStore(config)
    try:
        assert type(store._client) is client
    finally:
        await store.close()


def test_script_sha_is_the_sha1_redis_uses() -> None:
    script = Script("return 1")
    assert script.sha == hashlib.sha1(b"return 1", usedforsecurity=False).hexdigest()


# --- 9. a big value among small commands -------------------------------------------------------


async def scenario_big_value(servers: Servers) -> None:
    server = servers.start()
    store = store_at(server.url)
    body = os.urandom(5 * 1024 * 1024)
    big = StoredResponse(200, [("Content-Type", "application/octet-stream")], body)
    digest = hashlib.sha256(body).hexdigest()
    try:
        assert await store.acquire("big", FP, "t1", LONG) is None
        smalls = [f"small:{i}" for i in range(200)]

        async def small(i: int) -> None:
            assert await store.acquire(smalls[i], f"fp-{i}", f"t-{i}", LONG) is None
            record = await store.get(smalls[i])
            assert record is not None
            assert (record.fingerprint, record.token) == (f"fp-{i}", f"t-{i}")

        stored, *_ = await asyncio.gather(
            store.complete("big", "t1", big, LONG), *(small(i) for i in range(len(smalls)))
        )
        assert stored is True

        first, *others, last = await asyncio.gather(
            store.get("big"),
            *(store.get(key) for key in smalls),
            store.acquire("big", FP, "t2", LONG),  # a replay: the record with its response
        )
        for record in (first, last):
            assert record is not None
            assert record.state == COMPLETED
            assert record.response is not None
            assert record.response.status == 200
            assert len(record.response.body) == len(body)
            assert hashlib.sha256(record.response.body).hexdigest() == digest
        assert [r.token if r is not None else None for r in others] == [
            f"t-{i}" for i in range(len(smalls))
        ]
    finally:
        await store.close()


async def test_big_value_round_trips_among_concurrent_small_commands(servers: Servers) -> None:
    await scenario_big_value(servers)


# --- the same scenarios on uvloop ----------------------------------------------------------


UVLOOP_SCENARIOS: dict[str, Scenario] = {
    "pipelining": scenario_pipelining,
    "cancelled-caller": scenario_cancelled_caller,
    "restart": scenario_restart,
    "frozen": scenario_frozen,
    "auth-and-db": scenario_auth_and_db,
    "unix-socket": scenario_unix_socket,
    "big-value": scenario_big_value,
}


@pytest.mark.parametrize("name", list(UVLOOP_SCENARIOS))
def test_on_uvloop(name: str, servers: Servers) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        runner.run(UVLOOP_SCENARIOS[name](servers))
