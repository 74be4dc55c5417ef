"""One contract for every store: the same tests run against MemoryStore and RedisStore.

The Redis side is a real ``redis-server`` (the session fixture of conftest), never a mock. Lease
expiry is exercised with short TTLs and real sleeps; the assertions are about states (who holds
the key, what acquire answers), never about how long something took.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from idemproxy.config import StoreConfig
from idemproxy.errors import StoreUnavailable
from idemproxy.records import COMPLETED, IN_FLIGHT, UNREPLAYABLE, StoredResponse
from idemproxy.store.base import Store
from idemproxy.store.memory import MemoryStore
from idemproxy.store.redis import RedisStore
from tests.conftest import HOST, RedisProcess, free_port
from tests.contract.test_wait_replicas import wait_for_link

FP = "fingerprint-a"
OTHER_FP = "fingerprint-b"
LONG = 60.0  # a lease or TTL that never runs out during a test
SHORT = 0.2  # a lease or TTL that a test lets run out
PAST_SHORT = 0.5  # sleeping this long lets a SHORT lease or TTL expire

RESPONSE = StoredResponse(
    201,
    [
        ("Content-Type", "application/octet-stream"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Location", "/orders/1"),
        ("Set-Cookie", "b=2; Path=/"),
        ("Set-Cookie", "a=3; Path=/"),
        ("X-Latin", "caf\u00e9"),
    ],
    bytes(range(256)) * 2 + b"\x00",
)


@dataclass
class StoreCase:
    kind: str
    store: Store
    prefix: str

    def key(self, name: str = "k") -> str:
        return self.prefix + name


@pytest.fixture(scope="module")
def replicated_redis() -> Iterator[RedisProcess]:
    """A master with one replica: the contract holds with ``wait_replicas: 1`` too."""
    with tempfile.TemporaryDirectory() as workdir:
        for name in ("master", "replica"):
            (Path(workdir) / name).mkdir()
        master = RedisProcess(free_port(), f"{workdir}/master")
        replica = RedisProcess(
            free_port(), f"{workdir}/replica", extra=["--replicaof", HOST, str(master.port)]
        )
        try:
            master.start()
            replica.start()
            wait_for_link(replica)
            yield master
        finally:
            replica.stop()
            master.stop()


@pytest.fixture(params=["memory", "redis", "redis-py", "redis-wait", "redis-py-wait"])
async def case(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[StoreCase]:
    """``redis`` is the pipelined client; a URL option sends the same store through redis-py.
    The ``-wait`` cases run on a master with a replica and ``wait_replicas: 1``."""
    store: Store
    if request.param == "memory":
        store = MemoryStore()
    else:
        waits = request.param.endswith("-wait")
        server: RedisProcess = request.getfixturevalue(
            "replicated_redis" if waits else "redis_server"
        )
        options = "?socket_keepalive=true" if request.param.startswith("redis-py") else ""
        config = StoreConfig(server.url + options, "", "fail_closed", wait_replicas=int(waits))
        store = RedisStore(config)
    yield StoreCase(request.param, store, prefix)
    await store.close()


async def acquired(store: Store, key: str, token: str, lock_ttl: float = LONG) -> None:
    """Acquire and assert that ``token`` now holds the lease."""
    assert await store.acquire(key, FP, token, lock_ttl) is None


# --- acquire ---------------------------------------------------------------------------------


async def test_acquire_free_key_takes_lease_and_makes_in_flight_record(case: StoreCase) -> None:
    key = case.key()
    assert await case.store.get(key) is None
    assert await case.store.acquire(key, FP, "t1", LONG) is None
    record = await case.store.get(key)
    assert record is not None
    assert record.state == IN_FLIGHT
    assert record.fingerprint == FP
    assert record.token == "t1"
    assert record.response is None
    # created_at is unix seconds (not milliseconds, not monotonic time)
    assert abs(record.created_at - time.time()) < 60


async def test_second_acquire_with_other_token_gets_the_in_flight_record(
    case: StoreCase,
) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    for fp in (FP, OTHER_FP):
        record = await case.store.acquire(key, fp, "t2", LONG)
        assert record is not None
        assert record.state == IN_FLIGHT
        assert record.fingerprint == FP
        assert record.token == "t1"
        assert record.response is None
    # the second caller did not take the lease over
    assert await case.store.renew(key, "t2", LONG) is False
    assert await case.store.renew(key, "t1", LONG) is True


async def test_acquire_again_with_same_token_counts_as_acquired(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.acquire(key, FP, "t1", LONG) is None
    record = await case.store.get(key)
    assert record is not None
    assert (record.state, record.token) == (IN_FLIGHT, "t1")


async def test_keys_are_independent(case: StoreCase) -> None:
    await acquired(case.store, case.key("one"), "t1")
    assert await case.store.acquire(case.key("two"), FP, "t2", LONG) is None
    assert await case.store.complete(case.key("two"), "t2", RESPONSE, LONG) is True
    one = await case.store.get(case.key("one"))
    assert one is not None
    assert (one.state, one.token) == (IN_FLIGHT, "t1")


# --- leases: renew and expiry ----------------------------------------------------------------


async def test_lease_expires_and_a_new_token_can_acquire(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1", lock_ttl=SHORT)
    await asyncio.sleep(PAST_SHORT)
    assert await case.store.get(key) is None
    assert await case.store.acquire(key, FP, "t2", LONG) is None
    record = await case.store.get(key)
    assert record is not None
    assert record.token == "t2"


async def test_renew_extends_the_lease_of_the_holder(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1", lock_ttl=SHORT)
    assert await case.store.renew(key, "t1", LONG) is True
    await asyncio.sleep(PAST_SHORT)
    record = await case.store.get(key)
    assert record is not None
    assert (record.state, record.token) == (IN_FLIGHT, "t1")
    assert record.expires_in is not None
    assert record.expires_in > SHORT
    # still held: another token is told it is in flight
    other = await case.store.acquire(key, FP, "t2", LONG)
    assert other is not None
    assert other.state == IN_FLIGHT


async def test_renew_by_non_holder_fails_and_does_not_extend(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1", lock_ttl=SHORT)
    assert await case.store.renew(key, "t2", LONG) is False
    await asyncio.sleep(PAST_SHORT)
    assert await case.store.get(key) is None


async def test_renew_of_absent_key_fails_and_creates_nothing(case: StoreCase) -> None:
    key = case.key()
    assert await case.store.renew(key, "t1", LONG) is False
    assert await case.store.get(key) is None


async def test_renew_of_completed_record_fails(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is True
    assert await case.store.renew(key, "t1", LONG) is False
    record = await case.store.get(key)
    assert record is not None
    assert record.state == COMPLETED


# --- fencing -----------------------------------------------------------------------------------


async def test_old_holder_is_fenced_off_after_its_lease_expired(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "old", lock_ttl=SHORT)
    await asyncio.sleep(PAST_SHORT)
    await acquired(case.store, key, "new")

    assert await case.store.renew(key, "old", LONG) is False
    assert await case.store.complete(key, "old", RESPONSE, LONG) is False
    assert await case.store.complete(key, "old", None, LONG) is False
    assert await case.store.release(key, "old") is False

    record = await case.store.get(key)
    assert record is not None
    assert record.state == IN_FLIGHT
    assert record.token == "new"
    assert record.response is None
    # the new holder is unaffected and can finish
    assert await case.store.complete(key, "new", RESPONSE, LONG) is True


async def test_old_holder_cannot_touch_a_record_the_new_holder_completed(
    case: StoreCase,
) -> None:
    key = case.key()
    await acquired(case.store, key, "old", lock_ttl=SHORT)
    await asyncio.sleep(PAST_SHORT)
    await acquired(case.store, key, "new")
    newer = StoredResponse(200, [("X-Holder", "new")], b"new")
    assert await case.store.complete(key, "new", newer, LONG) is True

    assert await case.store.complete(key, "old", RESPONSE, LONG) is False
    assert await case.store.release(key, "old") is False
    record = await case.store.get(key)
    assert record is not None
    assert (record.state, record.token, record.response) == (COMPLETED, "new", newer)


# --- complete ----------------------------------------------------------------------------------


async def test_complete_by_non_holder_fails(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t2", RESPONSE, LONG) is False
    record = await case.store.get(key)
    assert record is not None
    assert (record.state, record.token, record.response) == (IN_FLIGHT, "t1", None)


async def test_complete_of_absent_key_fails_and_creates_nothing(case: StoreCase) -> None:
    key = case.key()
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is False
    assert await case.store.get(key) is None


async def test_completed_record_replays_only_for_the_same_fingerprint(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is True

    same = await case.store.acquire(key, FP, "t2", LONG)
    assert same is not None
    assert same.state == COMPLETED
    assert same.fingerprint == FP
    assert same.response == RESPONSE

    other = await case.store.acquire(key, OTHER_FP, "t3", LONG)
    assert other is not None
    assert other.state == COMPLETED
    assert other.fingerprint == FP
    assert other.response is None  # a mismatch reveals nothing of the stored response

    # neither acquire took the completed key over
    record = await case.store.get(key)
    assert record is not None
    assert (record.state, record.token, record.response) == (COMPLETED, "t1", RESPONSE)


async def test_completed_record_is_not_reacquired_by_its_own_token(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is True
    record = await case.store.acquire(key, FP, "t1", LONG)
    assert record is not None
    assert record.state == COMPLETED
    assert record.response == RESPONSE


async def test_complete_without_response_makes_it_unreplayable(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", None, LONG) is True
    record = await case.store.get(key)
    assert record is not None
    assert record.state == UNREPLAYABLE
    assert record.response is None
    seen = await case.store.acquire(key, FP, "t2", LONG)
    assert seen is not None
    assert seen.state == UNREPLAYABLE
    assert seen.fingerprint == FP
    assert seen.response is None


async def test_retried_complete_with_same_token_returns_true(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is True
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is True
    record = await case.store.get(key)
    assert record is not None
    assert (record.state, record.response) == (COMPLETED, RESPONSE)


async def test_retried_unreplayable_complete_with_same_token_returns_true(
    case: StoreCase,
) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", None, LONG) is True
    assert await case.store.complete(key, "t1", None, LONG) is True
    record = await case.store.get(key)
    assert record is not None
    assert record.state == UNREPLAYABLE


async def test_complete_cannot_change_the_outcome_already_stored(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", None, LONG) is True
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is False
    record = await case.store.get(key)
    assert record is not None
    assert (record.state, record.response) == (UNREPLAYABLE, None)


async def test_completed_record_expires_after_its_ttl(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", RESPONSE, SHORT) is True
    assert await case.store.get(key) is not None
    await asyncio.sleep(PAST_SHORT)
    assert await case.store.get(key) is None
    assert await case.store.acquire(key, FP, "t2", LONG) is None


async def test_complete_replaces_the_lease_ttl_with_the_record_ttl(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1", lock_ttl=SHORT)
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is True
    await asyncio.sleep(PAST_SHORT)
    record = await case.store.get(key)
    assert record is not None
    assert record.state == COMPLETED


# --- release -----------------------------------------------------------------------------------


async def test_release_by_holder_deletes_the_record(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.release(key, "t1") is True
    assert await case.store.get(key) is None
    await acquired(case.store, key, "t2")
    assert await case.store.release(key, "t1") is False  # second release: no longer held


async def test_release_by_non_holder_fails_and_keeps_the_lease(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.release(key, "t2") is False
    record = await case.store.get(key)
    assert record is not None
    assert (record.state, record.token) == (IN_FLIGHT, "t1")


async def test_release_of_completed_record_fails_and_keeps_it(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is True
    assert await case.store.release(key, "t1") is False
    record = await case.store.get(key)
    assert record is not None
    assert record.state == COMPLETED


async def test_release_of_absent_key_fails(case: StoreCase) -> None:
    assert await case.store.release(case.key(), "t1") is False


# --- get / delete ------------------------------------------------------------------------------


async def test_get_reports_expires_in_for_lease_and_record(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1", lock_ttl=LONG)
    leased = await case.store.get(key)
    assert leased is not None
    assert leased.expires_in is not None
    assert 0 < leased.expires_in <= LONG

    assert await case.store.complete(key, "t1", RESPONSE, 3600.0) is True
    done = await case.store.get(key)
    assert done is not None
    assert done.expires_in is not None
    assert LONG < done.expires_in <= 3600.0
    assert done.response == RESPONSE  # get always shows a completed response


async def test_delete_removes_a_record(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", RESPONSE, LONG) is True
    assert await case.store.delete(key) is True
    assert await case.store.get(key) is None
    assert await case.store.delete(key) is False
    assert await case.store.acquire(key, OTHER_FP, "t2", LONG) is None


async def test_delete_of_an_expired_record_reports_nothing_deleted(case: StoreCase) -> None:
    key = case.key()
    await acquired(case.store, key, "t1", lock_ttl=SHORT)
    await asyncio.sleep(PAST_SHORT)
    assert await case.store.delete(key) is False


async def test_ping_answers(case: StoreCase) -> None:
    await case.store.ping()


# --- the stored response -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        RESPONSE,
        StoredResponse(500, [], b""),
        StoredResponse(204, [("Set-Cookie", "x=1"), ("set-cookie", "x=2")], b""),
        StoredResponse(200, [("Content-Type", "text/plain; charset=utf-8")], "\u20ac".encode()),
    ],
    ids=["binary-and-duplicates", "empty-500", "case-kept", "utf8"],
)
async def test_response_round_trips_exactly(case: StoreCase, response: StoredResponse) -> None:
    key = case.key()
    await acquired(case.store, key, "t1")
    assert await case.store.complete(key, "t1", response, LONG) is True
    for record in (
        await case.store.get(key),
        await case.store.acquire(key, FP, "t2", LONG),
    ):
        assert record is not None
        assert record.response is not None
        assert record.response.status == response.status
        assert [tuple(h) for h in record.response.headers] == response.headers
        assert record.response.body == response.body
        assert type(record.response.body) is bytes


# --- Redis only --------------------------------------------------------------------------------


@pytest.fixture
async def raw_redis(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    store = RedisStore(StoreConfig(redis_server.url, "", "fail_closed"))
    yield store
    await store.close()


async def test_redis_key_always_has_a_ttl(
    redis_store: RedisStore, raw_redis: aioredis.Redis, prefix: str
) -> None:
    key = prefix + "ttl"
    await acquired(redis_store, key, "t1", lock_ttl=LONG)
    assert 0 < await raw_redis.pttl(key) <= LONG * 1000
    assert await redis_store.renew(key, "t1", LONG) is True
    assert 0 < await raw_redis.pttl(key) <= LONG * 1000
    assert await redis_store.complete(key, "t1", RESPONSE, 3600.0) is True
    assert LONG * 1000 < await raw_redis.pttl(key) <= 3600 * 1000

    unreplayable = prefix + "ttl-u"
    await acquired(redis_store, unreplayable, "t1")
    assert await redis_store.complete(unreplayable, "t1", None, 3600.0) is True
    assert LONG * 1000 < await raw_redis.pttl(unreplayable) <= 3600 * 1000


async def test_redis_failed_calls_leave_no_key_behind(
    redis_store: RedisStore, raw_redis: aioredis.Redis, prefix: str
) -> None:
    key = prefix + "ghost"
    assert await redis_store.renew(key, "t1", LONG) is False
    assert await redis_store.complete(key, "t1", RESPONSE, LONG) is False
    assert await redis_store.complete(key, "t1", None, LONG) is False
    assert await redis_store.release(key, "t1") is False
    assert await raw_redis.exists(key) == 0


StoreCall = Callable[[RedisStore], Awaitable[object]]

CALLS: dict[str, StoreCall] = {
    "acquire": lambda s: s.acquire("k", FP, "t1", LONG),
    "renew": lambda s: s.renew("k", "t1", LONG),
    "complete": lambda s: s.complete("k", "t1", RESPONSE, LONG),
    "complete-none": lambda s: s.complete("k", "t1", None, LONG),
    "release": lambda s: s.release("k", "t1"),
    "get": lambda s: s.get("k"),
    "delete": lambda s: s.delete("k"),
    "ping": lambda s: s.ping(),
}


@pytest.mark.parametrize("name", list(CALLS))
async def test_redis_unreachable_raises_store_unavailable(name: str) -> None:
    store = RedisStore(StoreConfig(f"redis://{HOST}:{free_port()}/0", "", "fail_closed"))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await CALLS[name](store)
        # A refused connection: the command surely never ran, nothing to clean up later.
        assert caught.value.maybe_applied is False
    finally:
        await store.close()
