"""The pipelined client's lanes: waited scripts (script + ``WAIT`` in one write) on connections
of their own, so that a pending WAIT, which blocks its connection in Redis, holds up neither the
unwaited commands nor more than ``_LANES`` waited batches.

A real master and a real replica on loopback (the ``replicated`` fixture of
test_wait_replicas); "partitioned" is the replica SIGSTOPped. Nothing is mocked; connections are
looked at with CLIENT LIST on the master.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvloop

from idemproxy.config import StoreConfig
from idemproxy.errors import StoreUnavailable
from idemproxy.records import COMPLETED, IN_FLIGHT, StoredResponse
from idemproxy.store import NotReplicated
from idemproxy.store.redis import ACQUIRE, RedisStore
from idemproxy.store.resp import _LANES, PipelinedRedis
from tests.conftest import HOST, free_port
from tests.contract import test_wait_replicas
from tests.contract.test_wait_replicas import Replicated

replicated = test_wait_replicas.replicated  # the fixture: master and replica

RESPONSE = StoredResponse(201, [("Location", "/orders/1")], b"ok")
LONG = 60.0


def waited_store(replicated: Replicated, wait_timeout: float = 0.1) -> RedisStore:
    url = f"redis://{HOST}:{replicated.master.port}/0"
    return RedisStore(
        StoreConfig(url, "", "fail_closed", wait_replicas=1, wait_timeout=wait_timeout)
    )


@pytest.fixture
async def raw(replicated: Replicated) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=HOST, port=replicated.master.port)
    yield client
    await client.aclose()


async def others(raw: aioredis.Redis) -> list[dict[str, Any]]:
    """The master's clients other than ``raw`` itself and the replica."""
    me = await raw.client_id()
    return [
        c
        for c in await raw.client_list()
        if int(c["id"]) != me and "S" not in c["flags"] and "M" not in c["flags"]
    ]


async def storm(store: RedisStore, count: int, prefix: str) -> list[Any]:
    """``count`` acquires, each started in a loop iteration of its own, plus as many reads
    (unwaited) in between; every result paired with what its key must give."""

    async def one(i: int) -> None:
        key = f"{prefix}{i}"
        assert await store.acquire(key, f"fp-{i}", f"t-{i}", LONG) is None
        record = await store.get(key)  # unwaited, on the main connection
        assert record is not None
        assert (record.state, record.fingerprint, record.token) == (IN_FLIGHT, f"fp-{i}", f"t-{i}")
        held = await store.acquire(key, f"fp-{i}", "other", LONG)  # waited, writes nothing
        assert held is not None
        assert held.token == f"t-{i}"
        assert await store.complete(key, f"t-{i}", RESPONSE, LONG)

    tasks = []
    for i in range(count):
        tasks.append(asyncio.ensure_future(one(i)))
        if i % 3 == 0:
            await asyncio.sleep(0)  # spread over many loop iterations: many batches
    return await asyncio.gather(*tasks, return_exceptions=True)


async def scenario_storm(replicated: Replicated) -> None:
    store = waited_store(replicated, wait_timeout=2.0)
    raw = aioredis.Redis(host=HOST, port=replicated.master.port)
    try:
        await raw.config_resetstat()
        count = 300
        results = await storm(store, count, "storm:")
        assert [r for r in results if r is not None] == []
        # Every record reached the replica before its call returned.
        replica = aioredis.Redis(host=HOST, port=replicated.replica.port)
        try:
            assert await replica.dbsize() == count
            pipe = replica.pipeline(transaction=False)
            for i in range(count):
                pipe.getrange(f"storm:{i}", 0, 0)  # the state byte of a record
            states = await pipe.execute()
            assert set(states) == {b"c"}
        finally:
            await replica.aclose()
        # One connection for the unwaited commands, at most _LANES for the waited ones.
        assert 2 <= len(await others(raw)) <= 1 + _LANES
        waits = (await raw.info("commandstats"))["cmdstat_wait"]["calls"]
        assert waits <= 3 * count  # shared WAITs: never more than one per waited script
    finally:
        await store.close()
        await raw.aclose()


async def test_a_storm_of_waited_and_unwaited_calls_pairs_every_reply(
    replicated: Replicated,
) -> None:
    await scenario_storm(replicated)


def test_a_storm_on_uvloop(replicated: Replicated) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario_storm(replicated))


async def test_unwaited_commands_do_not_queue_behind_a_pending_wait(
    replicated: Replicated,
) -> None:
    store = waited_store(replicated, wait_timeout=1.5)
    try:
        assert await store.acquire("ready", "fp", "t", LONG) is None
        replicated.freeze()
        try:
            pending = asyncio.ensure_future(store.acquire("blocked", "fp", "t", LONG))
            await asyncio.sleep(0.1)  # its WAIT is blocked in Redis now
            assert not pending.done()
            started = time.monotonic()
            record = await store.get("ready")
            assert await store.renew("ready", "t", LONG)
            assert time.monotonic() - started < 0.5  # not the 1.5 s of the WAIT
            assert record is not None
            assert record.token == "t"
            with pytest.raises(NotReplicated):
                await pending
        finally:
            replicated.thaw()
        assert replicated.on_master("blocked") == ""  # the unacknowledged lease was released
    finally:
        await store.close()


async def test_a_frozen_replica_blocks_at_most_the_lanes_and_fails_every_lease(
    replicated: Replicated,
    raw: aioredis.Redis,
) -> None:
    store = waited_store(replicated, wait_timeout=0.3)
    try:
        assert await store.acquire("warm", "fp", "t", LONG) is None
        replicated.freeze()
        try:
            tasks = []
            for i in range(60):
                tasks.append(asyncio.ensure_future(store.acquire(f"cut:{i}", "fp", "t", LONG)))
                await asyncio.sleep(0.002)
            blocked = [c for c in await others(raw) if c["cmd"] == "wait"]
            assert 1 <= len(blocked) <= _LANES
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, NotReplicated) for r in results), results
            assert not any(r.maybe_applied for r in results if isinstance(r, NotReplicated))
            assert await raw.exists(*(f"cut:{i}" for i in range(60))) == 0  # none left locked
        finally:
            replicated.thaw()
        assert await store.acquire("cut:0", "fp", "t2", LONG) is None  # acknowledged again
        assert replicated.on_replica("cut:0") == "i"
    finally:
        await store.close()


async def test_a_lane_killed_mid_wait_fails_its_callers_and_is_replaced(
    replicated: Replicated,
    raw: aioredis.Redis,
) -> None:
    store = waited_store(replicated, wait_timeout=1.5)
    try:
        assert await store.acquire("a", "fp", "t", LONG) is None
        replicated.freeze()
        try:
            lease = asyncio.ensure_future(store.acquire("lease", "fp", "t", LONG))
            await asyncio.sleep(0.1)
            blocked = [c for c in await others(raw) if c["cmd"] == "wait"]
            assert blocked
            for client in blocked:
                await raw.client_kill_filter(_id=client["id"])
            # The script ran; its WAIT's connection is gone: not acknowledged, and released.
            with pytest.raises(NotReplicated) as caught:
                await asyncio.wait_for(lease, 1.0)
            assert not caught.value.maybe_applied
        finally:
            replicated.thaw()
        assert replicated.on_master("lease") == ""
        assert await store.acquire("lease", "fp", "t", LONG) is None  # on a new lane
        assert replicated.on_replica("lease") == "i"
    finally:
        await store.close()


async def test_an_idle_lane_dropped_by_redis_is_replaced_without_failing_a_caller(
    replicated: Replicated,
    raw: aioredis.Redis,
) -> None:
    store = waited_store(replicated)
    try:
        assert await store.acquire("x", "fp", "t", LONG) is None
        assert await store.get("x") is not None
        for client in await others(raw):
            await raw.client_kill_filter(_id=client["id"])
        await asyncio.sleep(0.05)  # the client reads the close
        assert await store.acquire("y", "fp", "t", LONG) is None
        assert await store.complete("y", "t", RESPONSE, LONG)
        record = await store.get("y")
        assert record is not None
        assert record.state == COMPLETED
    finally:
        await store.close()


async def test_a_frozen_master_fails_a_waited_script_as_maybe_applied(
    replicated: Replicated,
) -> None:
    store = waited_store(replicated)
    try:
        assert await store.acquire("x", "fp", "t", LONG) is None
        assert replicated.master.process is not None
        pid = replicated.master.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await store.acquire("y", "fp", "t", LONG)
            assert caught.value.maybe_applied
            assert time.monotonic() - started < 10.0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await store.acquire("z", "fp", "t", LONG) is None
    finally:
        await store.close()


async def test_nothing_listening_fails_a_waited_script_as_not_applied() -> None:
    url = f"redis://{HOST}:{free_port()}/0"
    store = RedisStore(StoreConfig(url, "", "fail_closed", wait_replicas=1))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.acquire("x", "fp", "t", LONG)
        assert not caught.value.maybe_applied
    finally:
        await store.close()


async def test_close_closes_every_connection_and_fails_waiting_callers(
    replicated: Replicated,
    raw: aioredis.Redis,
) -> None:
    store = waited_store(replicated, wait_timeout=1.5)
    results = await storm(store, 60, "close:")
    assert [r for r in results if r is not None] == []
    assert len(await others(raw)) >= 2
    replicated.freeze()
    try:
        pending = [
            asyncio.ensure_future(store.acquire(f"shut:{i}", "fp", "t", LONG)) for i in range(5)
        ]
        await asyncio.sleep(0.1)  # one batch's WAIT blocked, maybe more held
        await store.close()
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable | NotReplicated) for r in results), results
    finally:
        replicated.thaw()
    # A lease not acknowledged is released, which opens the main connection again (a closed
    # store is not a dead one): closed once more, nothing of the store is left.
    await store.close()
    for _ in range(100):
        if not await others(raw):
            break
        await asyncio.sleep(0.02)
    assert await others(raw) == []


async def test_close_before_a_lane_is_open_fails_held_scripts_and_leaves_no_connection(
    replicated: Replicated,
    raw: aioredis.Redis,
) -> None:
    client = PipelinedRedis(f"redis://{HOST}:{replicated.master.port}/0", 2.0)
    pending = asyncio.ensure_future(client.run_waited(ACQUIRE, "k", ("fp", "t", 1000, 1), 1, 100))
    await asyncio.sleep(0)  # held, its lane's connect attempt under way
    await client.close()
    with pytest.raises(ConnectionError):
        await pending
    await asyncio.sleep(0.2)  # the attempt ends; its connection is closed on arrival
    for _ in range(100):
        if not await others(raw):
            break
        await asyncio.sleep(0.02)
    assert await others(raw) == []
    assert replicated.on_master("k") == ""


async def test_cancelled_waited_callers_shift_no_reply_and_leave_no_unretrieved_error(
    replicated: Replicated, caplog: pytest.LogCaptureFixture
) -> None:
    store = waited_store(replicated, wait_timeout=2.0)
    try:
        for rounds in range(3):
            tasks = []
            for i in range(90):
                key = f"cancel:{rounds}:{i}"
                tasks.append(asyncio.ensure_future(store.acquire(key, f"fp-{i}", f"t-{i}", LONG)))
                if i % 10 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0)
            for task in tasks[::3]:
                task.cancel()  # held, written or answered: each its own outcome
            await asyncio.gather(*tasks, return_exceptions=True)
            # Whoever holds a key, every reply reaches its own caller.
            again = await asyncio.gather(
                *(
                    store.acquire(f"cancel:{rounds}:{i}", f"fp-{i}", "other", LONG)
                    for i in range(90)
                )
            )
            for i, record in enumerate(again):
                if record is not None:
                    assert (record.fingerprint, record.token) == (f"fp-{i}", f"t-{i}")
                else:
                    assert i % 3 == 0  # a cancelled acquire that never ran: "other" has it now
        # Lanes lost before Redis answered (the master frozen), some callers cancelled: the
        # WAITs' errors are retrieved, not logged.
        assert replicated.master.process is not None
        pid = replicated.master.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            pending = []
            for i in range(9):
                pending.append(asyncio.ensure_future(store.acquire(f"lost:{i}", "fp", "t", LONG)))
                await asyncio.sleep(0.01)
            for task in pending[::2]:
                task.cancel()
            await store.close()
            results = await asyncio.gather(*pending, return_exceptions=True)
            assert all(isinstance(r, StoreUnavailable | asyncio.CancelledError) for r in results)
            del pending, results  # their tracebacks hold the futures
        finally:
            os.kill(pid, signal.SIGCONT)
        gc.collect()
        await asyncio.sleep(0)
        assert "exception was never retrieved" not in caplog.text
    finally:
        await store.close()
