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
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, MovedError, NoScriptError, RedisError

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
from idemproxy.settings import StoreConfig
from idemproxy.store.base import NotReplicated
from idemproxy.store.resp import (
    Arg,
    NotSent,
    PipelinedRedis,
    ReplyError,
    Script,
    connected_replicas,
    fast_path_supports,
)

# How long one store call may take before the request is answered as "store unavailable".
STORE_TIMEOUT = 2.0
# With wait_replicas, how long /readyz trusts its last look at the connected replicas.
REPLICAS_CACHE_SECONDS = 1.0

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
  -- a retried completion: written again, so that a WAIT after it covers the record
  redis.call('HSET', KEYS[1], 's', ARGV[2])
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

    async def run_waited(
        self, script: Script, key: str, args: tuple[Arg, ...], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]: ...

    async def replicas(self) -> int:
        """The fewest replicas connected to a master (on Cluster: to any master)."""

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

    async def run_waited(
        self, script: Script, key: str, args: tuple[Arg, ...], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        if isinstance(self._redis, RedisCluster):
            waited = self._cluster_waited(script, key, args, replicas, timeout_ms)
            return await self._bounded(waited)
        redis = self._redis
        for command in (("EVALSHA", script.sha), ("EVAL", script.source)):
            # Not a transaction: the script and its WAIT leave in one write on one connection,
            # so the WAIT counts the replicas that have the script's write.
            pipe = redis.pipeline(transaction=False)
            pipe.execute_command(*command, 1, key, *args)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            reply, acked = await self._bounded(pipe.execute(raise_on_error=False))
            if isinstance(reply, NoScriptError):
                continue
            if isinstance(reply, BaseException):
                raise reply
            return reply, acked if isinstance(acked, int) else 0
        raise NoScriptError("NOSCRIPT after EVAL")  # pragma: no cover - EVAL never answers it

    async def _cluster_waited(
        self, script: Script, key: str, args: tuple[Arg, ...], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """On Cluster the WAIT must reach the master that owns the key's slot, on the script's
        connection. A cluster pipeline sends a keyless WAIT to its default node, whose answer
        says nothing about the script's write (and routes it by its own policy again on a
        retry), so both go to the slot's node as one pipeline of their own; a MOVED answer
        patches the slot map and tries again. Uses redis-py's ClusterNode.execute_pipeline:
        tests/process/test_chaos_failover.py checks the routing on a real cluster."""
        cluster = self._redis
        assert isinstance(cluster, RedisCluster)
        commands = [("EVALSHA", script.sha), ("EVAL", script.source)]
        for _ in range(3):
            if cluster._initialize_due():
                await cluster.initialize()
            node = cluster.get_node_from_key(key)
            if node is None:  # pragma: no cover - get_node_from_key raises instead
                raise ConnectionError("no node owns the key's slot")
            sent = [
                PipelineCommand(0, *commands[0], 1, key, *args),
                PipelineCommand(1, "WAIT", replicas, timeout_ms),
            ]
            try:
                await node.execute_pipeline(sent)
            except (RedisError, OSError):
                cluster._request_refresh(last_failed_node_name=node.name)
                raise
            reply, acked = sent[0].result, sent[1].result
            if isinstance(reply, NoScriptError) and len(commands) > 1:
                commands.pop(0)
                continue
            if isinstance(reply, MovedError):  # a failover or a moved slot: patch the map
                reply.host = reply.host or node.host
                await cluster.nodes_manager.move_slot(reply)
                cluster._request_refresh()
                continue
            if isinstance(reply, AskError):  # a slot being migrated: answered as unavailable
                cluster._request_refresh()
            if isinstance(reply, BaseException):
                raise reply
            return reply, acked if isinstance(acked, int) else 0
        raise ConnectionError(f"the slot of {key!r} kept moving")

    async def replicas(self) -> int:
        if isinstance(self._redis, RedisCluster):
            answers = await self._bounded(
                self._redis.info("replication", target_nodes=RedisCluster.PRIMARIES)
            )
            # One answer per master (a dict of them), or the one answer of a 1-master cluster
            if answers and all(isinstance(a, dict) for a in answers.values()):
                return min(connected_replicas(a) for a in answers.values())
            return connected_replicas(answers)
        return connected_replicas(await self._bounded(self._redis.info("replication")))

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
    """With ``wait_replicas`` N > 0, ``acquire`` and ``complete`` send their script and a
    ``WAIT N wait_timeout`` in one write, and raise ``NotReplicated`` when fewer than N
    replicas acknowledged; an unacknowledged new lease is released first."""

    def __init__(self, config: StoreConfig) -> None:
        self._client: _Client = (
            PipelinedRedis(config.url, STORE_TIMEOUT)
            if config.mode == "standalone" and fast_path_supports(config.url)
            else _RedisPy(config)
        )
        self._replicas = config.wait_replicas
        self._wait_ms = max(1, round(config.wait_timeout * 1000))
        self._replicas_seen: tuple[float, int] | None = None  # (when, connected replicas)

    async def _run_waited(self, script: Script, key: str, args: tuple[Arg, ...]) -> tuple[Any, int]:
        waited = self._client.run_waited(script, key, args, self._replicas, self._wait_ms)
        return await self._call(waited)

    def _unacknowledged(self, what: str, acked: int) -> str:
        return (
            f"{what} not acknowledged by {self._replicas} replica(s) within "
            f"{self._wait_ms}ms ({acked} did)"
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
        result: Any
        if self._replicas:
            result, acked = await self._run_waited(ACQUIRE, key, args)
            if result == 1 and acked < self._replicas:
                # A lease a failover could lose must not be forwarded on: give it back now
                # (an existing record read here needs no acknowledgement: nothing was written).
                message = self._unacknowledged("lease", acked)
                try:
                    await self.release(key, token)
                except StoreUnavailable as exc:
                    raise NotReplicated(f"{message}; release failed: {exc}") from exc
                raise NotReplicated(message, maybe_applied=False)
        else:
            result = await self._call(self._client.run(ACQUIRE, key, args))
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
        if not self._replicas:
            return bool(await self._call(self._client.run(COMPLETE, key, args)))
        done, acked = await self._run_waited(COMPLETE, key, args)
        if done and acked < self._replicas:
            raise NotReplicated(self._unacknowledged("completion", acked))
        return bool(done)

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

    async def ready(self) -> None:
        if not self._replicas:
            return await self.ping()
        now = time.monotonic()
        if self._replicas_seen is None or now - self._replicas_seen[0] > REPLICAS_CACHE_SECONDS:
            connected = await self._call(self._client.replicas())
            self._replicas_seen = (now, connected)
        connected = self._replicas_seen[1]
        if connected < self._replicas:
            raise NotReplicated(
                f"{connected} replica(s) connected; wait_replicas needs {self._replicas}"
            )
        return None

    async def close(self) -> None:
        await self._client.close()
