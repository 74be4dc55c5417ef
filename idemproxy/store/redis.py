"""Redis store: standalone, Sentinel or Cluster. One Lua script per state change, one key each.

Standalone Redis at a plain ``redis://`` or ``unix://`` URL is spoken to by the pipelined client in
``resp``; Sentinel, Cluster, TLS and URLs with options go through redis-py.

A record is a hash: ``s`` state, ``f`` fingerprint, ``t`` lease token, ``c`` creation time (ms),
``r`` the msgpack-encoded response. Value and expiry are always written by the same script, so no
reader ever sees a record without its TTL. Because each script names one key, the same scripts
run unchanged on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from idemproxy.config import StoreConfig
from idemproxy.errors import StoreUnavailable
from idemproxy.records import (
    COMPLETED,
    IN_FLIGHT,
    UNREPLAYABLE,
    Record,
    StoredResponse,
    decode_response,
    encode_response,
)
from idemproxy.store.resp import (
    Arg,
    NotSent,
    PipelinedRedis,
    ReplyError,
    Script,
    fast_path_supports,
)

# How long one store call may take before the request is answered as "store unavailable".
STORE_TIMEOUT = 2.0

_STATE_CODES = {"i": IN_FLIGHT, "c": COMPLETED, "u": UNREPLAYABLE}

# ARGV: fingerprint, token, lock_ttl_ms, now_ms.
# Returns 1 when the caller now holds the lease, else {state, fingerprint, token, created, resp}
# where resp is only filled for a completed record with the same fingerprint.
ACQUIRE = Script(
    """
local cur = redis.call('HMGET', KEYS[1], 's', 'f', 't', 'c')
if not cur[1] then
  redis.call('HSET', KEYS[1], 's', 'i', 'f', ARGV[1], 't', ARGV[2], 'c', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if cur[1] == 'i' and cur[3] == ARGV[2] then
  return 1
end
local resp = ''
if cur[1] == 'c' and cur[2] == ARGV[1] then
  resp = redis.call('HGET', KEYS[1], 'r')
end
return {cur[1], cur[2], cur[3], cur[4], resp}
"""
)

# ARGV: token, lock_ttl_ms
RENEW = Script(
    """
local cur = redis.call('HMGET', KEYS[1], 's', 't')
if cur[1] == 'i' and cur[2] == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
)

# ARGV: token, new state ('c' or 'u'), encoded response, ttl_ms
COMPLETE = Script(
    """
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
  return 1
end
return 0
"""
)

# ARGV: token
RELEASE = Script(
    """
local cur = redis.call('HMGET', KEYS[1], 's', 't')
if cur[1] == 'i' and cur[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
)

GET = Script(
    """
local cur = redis.call('HMGET', KEYS[1], 's', 'f', 't', 'c', 'r')
if not cur[1] then
  return 0
end
return {cur[1], cur[2], cur[3], cur[4], cur[5] or '', redis.call('PTTL', KEYS[1])}
"""
)

T = TypeVar("T")


def _refused(exc: BaseException) -> bool:
    """Whether no connection could be made: then no command reached Redis."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError | NotSent):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class _Client(Protocol):
    async def run(self, script: Script, key: str, args: tuple[Arg, ...]) -> Any: ...

    async def delete(self, key: str) -> int: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class _RedisPy:
    """redis-py: Sentinel (follows failover), Cluster, TLS and URL options."""

    def __init__(self, config: StoreConfig) -> None:
        self._sentinel: Sentinel | None = None
        self._redis = self._connect(config)
        self._scripts: dict[Script, AsyncScript] = {}

    def _connect(self, config: StoreConfig) -> aioredis.Redis | RedisCluster:
        timeouts: dict[str, Any] = {
            # Reads are bounded once per call in _bounded (a per-read socket timeout costs a
            # task per command in redis-py); connecting keeps its own bound.
            "socket_connect_timeout": STORE_TIMEOUT,
            # One quick retry rides over a dropped pooled connection; every script is safe to
            # run twice because a retried call with the same token is recognised.
            "retry": Retry(NoBackoff(), 1),
        }
        if config.mode == "cluster":
            return RedisCluster.from_url(config.url, **timeouts)
        if config.mode == "sentinel":
            parts = urlsplit(config.url)
            self._sentinel = Sentinel(
                list(config.sentinels),
                sentinel_kwargs={"socket_timeout": STORE_TIMEOUT},
                **timeouts,
            )
            master: aioredis.Redis = self._sentinel.master_for(
                config.service_name,
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
                db=int(parts.path.strip("/") or "0"),
                ssl=parts.scheme == "rediss",
            )
            return master
        return aioredis.Redis.from_url(config.url, **timeouts)

    async def _bounded(self, call: Awaitable[T]) -> T:
        async with asyncio.timeout(STORE_TIMEOUT):
            return await call

    async def run(self, script: Script, key: str, args: tuple[Arg, ...]) -> Any:
        registered = self._scripts.get(script)
        if registered is None:
            registered = self._scripts[script] = self._redis.register_script(script.source)
        return await self._bounded(registered(keys=[key], args=list(args)))

    async def delete(self, key: str) -> int:
        deleted: int = await self._bounded(self._redis.delete(key))
        return deleted

    async def ping(self) -> None:
        await self._bounded(self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                await client.aclose()


class RedisStore:
    def __init__(self, config: StoreConfig) -> None:
        self._client: _Client = (
            PipelinedRedis(config.url, STORE_TIMEOUT)
            if config.mode == "standalone" and fast_path_supports(config.url)
            else _RedisPy(config)
        )

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, ReplyError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(
                f"redis: {type(exc).__name__}: {exc}", maybe_applied=not _refused(exc)
            ) from exc

    async def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Record | None:
        args = (fingerprint, token, _ms(lock_ttl), int(time.time() * 1000))
        result: Any = await self._call(self._client.run(ACQUIRE, key, args))
        if result == 1:
            return None
        state, fp, holder, created, resp = result
        return Record(
            _STATE_CODES[state.decode()],
            fp.decode(),
            holder.decode(),
            int(created) / 1000,
            decode_response(resp) if resp else None,
        )

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        return bool(await self._call(self._client.run(RENEW, key, (token, _ms(lock_ttl)))))

    async def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> bool:
        state, data = ("c", encode_response(response)) if response is not None else ("u", b"")
        args = (token, state, data, _ms(ttl))
        return bool(await self._call(self._client.run(COMPLETE, key, args)))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._call(self._client.run(RELEASE, key, (token,))))

    async def get(self, key: str) -> Record | None:
        result: Any = await self._call(self._client.run(GET, key, ()))
        if result == 0:
            return None
        state, fp, holder, created, resp, pttl = result
        return Record(
            _STATE_CODES[state.decode()],
            fp.decode(),
            holder.decode(),
            int(created) / 1000,
            decode_response(resp) if resp else None,
            max(0, int(pttl)) / 1000,
        )

    async def delete(self, key: str) -> bool:
        return bool(await self._call(self._client.delete(key)))

    async def ping(self) -> None:
        await self._call(self._client.ping())

    async def close(self) -> None:
        await self._client.close()
