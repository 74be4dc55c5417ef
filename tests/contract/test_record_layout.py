"""The record layout in Redis, and mixed fleets: records of the previous layout keep working.

The previous release kept a record as a hash written by the scripts below (copied verbatim
from it) with a plain-msgpack response. These tests write such records into a real Redis the
old way and check that the new code honours them (a lease still blocks, a completed record
still replays, a fingerprint mismatch still reveals nothing), and what an old proxy meets when
it reads a new record: an error (WRONGTYPE), never a wrong answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from idemproxy.config import StoreConfig
from idemproxy.records import COMPLETED, IN_FLIGHT, UNREPLAYABLE, StoredResponse
from idemproxy.records import encode_response as encode_now
from idemproxy.store.redis import RedisStore, _field, decode_record
from tests.conftest import HOST, RedisProcess

FP = hashlib.sha256(b"POST /orders {}").hexdigest()
OTHER_FP = hashlib.sha256(b"POST /orders {1}").hexdigest()
OLD_TOKEN = "0123456789abcdef-41"  # an older proxy's token
LONG = 60.0

OLD_ACQUIRE = """
local cur = redis.call('HMGET', KEYS[1], 's', 'f', 't', 'c')
if not cur[1] then
  redis.call('HSET', KEYS[1], 's', 'i', 'f', ARGV[1], 't', ARGV[2], 'c', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if cur[1] == 'i' and cur[3] == ARGV[2] then
  -- a retried call: written again, so that a WAIT after it covers the lease
  redis.call('HSET', KEYS[1], 't', ARGV[2])
  return 1
end
local resp = ''
if cur[1] == 'c' and cur[2] == ARGV[1] then
  resp = redis.call('HGET', KEYS[1], 'r')
end
return {cur[1], cur[2], cur[3], cur[4], resp}
"""
OLD_COMPLETE = """
local cur = redis.call('HMGET', KEYS[1], 's', 't')
if cur[2] ~= ARGV[1] then
  return 0
end
if cur[1] == 'i' then
  redis.call('HSET', KEYS[1], 's', ARGV[2], 'r', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 1
end
if cur[1] == ARGV[2] then
  -- a retried completion: written again, so that a WAIT after it covers the record
  redis.call('HSET', KEYS[1], 's', ARGV[2])
  return 1
end
return 0
"""
OLD_RELEASE = """
local cur = redis.call('HMGET', KEYS[1], 's', 't')
if cur[1] == 'i' and cur[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class OldResponse(msgspec.Struct, array_like=True, frozen=True):
    """The previous release's response encoding: plain msgpack."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    reason: str = ""


HEADERS = [
    ("Content-Type", "application/json"),
    ("Content-Length", "11"),
    ("Set-Cookie", "a=1"),
    ("set-cookie", "a=1"),
    ("Date", "Sun, 06 Dec 2026 00:15:05 GMT"),
]
RESPONSE = StoredResponse(201, HEADERS, b'{"id": 42}\n', "CREATED")


@dataclass
class OldProxy:
    """What a proxy of the previous release does to Redis: its scripts, its encoding."""

    raw: aioredis.Redis
    token: str = OLD_TOKEN

    async def acquire(self, key: str, fp: str = FP, ttl_ms: int = 60_000) -> object:
        now = int(time.time() * 1000)
        return await self.raw.eval(OLD_ACQUIRE, 1, key, fp, self.token, ttl_ms, now)

    async def complete(self, key: str, response: StoredResponse | None) -> object:
        data = b"" if response is None else msgspec.msgpack.encode(OldResponse(*_fields(response)))
        state = "u" if response is None else "c"
        return await self.raw.eval(OLD_COMPLETE, 1, key, self.token, state, data, 60_000)

    async def release(self, key: str) -> object:
        return await self.raw.eval(OLD_RELEASE, 1, key, self.token)


def _fields(response: StoredResponse) -> tuple[int, list[tuple[str, str]], bytes, str]:
    return response.status, response.headers, response.body, response.reason


@pytest.fixture(params=["redis", "redis-py"])
async def store(
    request: pytest.FixtureRequest, redis_server: RedisProcess
) -> AsyncIterator[RedisStore]:
    """The pipelined client, and redis-py (a URL option sends the store through it)."""
    options = "?socket_keepalive=true" if request.param == "redis-py" else ""
    store = RedisStore(StoreConfig(redis_server.url + options, "", "fail_closed"))
    yield store
    await store.close()


@pytest.fixture
async def old(redis_server: RedisProcess) -> AsyncIterator[OldProxy]:
    raw = aioredis.Redis(host=HOST, port=redis_server.port)
    yield OldProxy(raw)
    await raw.aclose()


async def test_a_lease_held_by_an_old_proxy_blocks_and_stays_its_own(
    store: RedisStore, old: OldProxy, prefix: str
) -> None:
    key = prefix + "k"
    assert await old.acquire(key) == 1
    for fp in (FP, OTHER_FP):
        record = await store.acquire(key, fp, "fedcba9876543210-1", LONG)
        assert record is not None
        assert (record.state, record.fingerprint, record.token) == (IN_FLIGHT, FP, OLD_TOKEN)
        assert record.response is None
        assert abs(record.created_at - time.time()) < 60
    assert await store.renew(key, "fedcba9876543210-1", LONG) is False
    assert await store.complete(key, "fedcba9876543210-1", RESPONSE, LONG) is False
    assert await store.release(key, "fedcba9876543210-1") is False
    assert await old.raw.type(key) == b"hash"  # untouched: still the old proxy's
    # the old proxy finishes its request; new proxies replay its answer
    assert await old.complete(key, RESPONSE) == 1
    record = await store.acquire(key, FP, "fedcba9876543210-2", LONG)
    assert record is not None
    assert (record.state, record.response) == (COMPLETED, RESPONSE)


async def test_the_new_store_renews_and_releases_an_old_layout_lease_by_its_token(
    store: RedisStore, old: OldProxy, prefix: str
) -> None:
    """The hash branches keep the previous scripts' fencing (a token is a token)."""
    key = prefix + "k"
    assert await old.acquire(key) == 1
    assert await store.acquire(key, FP, OLD_TOKEN, LONG) is None  # a retried call
    assert await store.renew(key, OLD_TOKEN, LONG) is True
    assert await store.release(key, OLD_TOKEN) is True
    assert await old.raw.exists(key) == 0
    assert await store.acquire(key, FP, "fedcba9876543210-1", LONG) is None
    assert await old.raw.type(key) == b"string"  # a new record, of the new layout


async def test_an_old_completed_record_replays_and_a_mismatch_reveals_nothing(
    store: RedisStore, old: OldProxy, prefix: str
) -> None:
    key = prefix + "k"
    assert await old.acquire(key) == 1
    assert await old.complete(key, RESPONSE) == 1
    same = await store.acquire(key, FP, "fedcba9876543210-1", LONG)
    assert same is not None
    assert (same.state, same.fingerprint, same.token) == (COMPLETED, FP, OLD_TOKEN)
    assert same.response == RESPONSE
    assert same.response.headers == HEADERS  # order, case, duplicates as the old proxy kept
    other = await store.acquire(key, OTHER_FP, "fedcba9876543210-2", LONG)
    assert other is not None
    assert (other.state, other.fingerprint, other.response) == (COMPLETED, FP, None)
    got = await store.get(key)
    assert got is not None
    assert (got.state, got.response) == (COMPLETED, RESPONSE)
    assert got.expires_in is not None
    assert 0 < got.expires_in <= 60


async def test_an_old_record_without_reason_and_an_unreplayable_one_read(
    store: RedisStore, old: OldProxy, prefix: str
) -> None:
    """Records of releases before reason phrases were kept: a 3-element response."""
    plain = StoredResponse(200, [("A", "1")], b"x")
    assert await old.acquire(prefix + "plain") == 1
    data = msgspec.msgpack.encode([200, [("A", "1")], b"x"])
    assert await old.raw.eval(OLD_COMPLETE, 1, prefix + "plain", OLD_TOKEN, "c", data, 60_000)
    record = await store.acquire(prefix + "plain", FP, "fedcba9876543210-1", LONG)
    assert record is not None
    assert record.response == plain
    assert await old.acquire(prefix + "u") == 1
    assert await old.complete(prefix + "u", None) == 1
    for record in (
        await store.get(prefix + "u"),
        await store.acquire(prefix + "u", FP, "fedcba9876543210-1", LONG),
    ):
        assert record is not None
        assert (record.state, record.response) == (UNREPLAYABLE, None)


async def test_an_expired_old_lease_gives_way_to_a_new_record(
    store: RedisStore, old: OldProxy, prefix: str
) -> None:
    key = prefix + "k"
    assert await old.acquire(key, ttl_ms=100) == 1
    await asyncio.sleep(0.3)
    assert await store.acquire(key, FP, "fedcba9876543210-1", LONG) is None
    assert await store.complete(key, "fedcba9876543210-1", RESPONSE, LONG) is True
    assert await old.raw.type(key) == b"string"


async def test_an_old_proxy_meeting_a_new_record_gets_an_error_never_an_answer(
    store: RedisStore, old: OldProxy, prefix: str
) -> None:
    """WRONGTYPE: the old proxy answers "store unavailable" (fail_closed: 503; fail_open:
    forwards without a lease). It never takes the lease or overwrites the record."""
    key = prefix + "k"
    assert await store.acquire(key, FP, "fedcba9876543210-1", LONG) is None
    for call in (old.acquire(key), old.complete(key, RESPONSE), old.release(key)):
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await call
    record = await store.get(key)
    assert record is not None
    assert (record.state, record.token) == (IN_FLIGHT, "fedcba9876543210-1")


async def test_a_record_is_one_compact_string(
    store: RedisStore, old: OldProxy, prefix: str
) -> None:
    key = prefix + "k"
    token = "89abcdef01234567-70000"
    answer = StoredResponse(
        200,
        [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", "200"),
            ("Date", "Sun, 06 Dec 2026 00:15:05 GMT"),
            ("Server", "Python/3.11 aiohttp/3.9.5"),
        ],
        b"x" * 200,
    )
    assert await store.acquire(key, FP, token, LONG) is None
    assert await store.complete(key, token, answer, LONG) is True
    value = await old.raw.get(key)
    assert value is not None
    assert await old.raw.object("encoding", key) == b"raw"
    # state 1, created 6, fingerprint 1 + 32, token 1 + 8 + 3, response
    assert len(value) == 1 + 6 + 33 + 12 + len(encode_now(answer)) == 294
    record = decode_record(cast(bytes, value))
    assert (record.state, record.fingerprint, record.token) == (COMPLETED, FP, token)
    assert record.response == answer


@pytest.mark.parametrize(
    "text",
    [
        "t1",
        "fingerprint-a",
        "",
        FP,
        FP.upper(),  # not lowercase hex: kept as text
        "0123456789abcdef-0",
        "0123456789abcdef-18446744073709551615",
        "0123456789abcdef-18446744073709551616",  # n too large for 8 bytes: text
        "0123456789abcdef-007",  # not a number as the proxy writes it: text
        "0123456789abcdef-",
        "ab",
        "a",
        "caf\u00e9",
        "x" * 127,
    ],
)
def test_fingerprints_and_tokens_round_trip_through_their_fields(text: str) -> None:
    header = b"i" + (1234).to_bytes(6, "big") + _field(text) + _field(text)
    record = decode_record(header)
    assert (record.fingerprint, record.token, record.created_at) == (text, text, 1.234)


def test_fields_are_one_to_one() -> None:
    texts = ["ab", "AB", "0123456789abcdef-1", "0123456789abcdef01", "t1", "", "00", "0"]
    assert len({_field(text) for text in texts}) == len(texts)


def test_a_field_longer_than_a_record_keeps_is_refused() -> None:
    with pytest.raises(ValueError, match="longer"):
        _field("x" * 128)
