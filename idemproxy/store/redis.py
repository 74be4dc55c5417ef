"""Redis store: standalone, Sentinel or Cluster. One Lua script per state change, one key each.

Standalone Redis at a plain ``redis://`` or ``unix://`` URL is spoken to by the pipelined client in
``resp``; Sentinel, Cluster, TLS and URLs with options go through redis-py.

A record is one string value (a hash would cost a hashtable once the response outgrows a
listpack's 64-byte fields)::

    0        state: ``i`` in flight, ``c`` completed, ``u`` completed but not replayable
    1-6      creation time, ms since the epoch, 48-bit big-endian
    7-       fingerprint, then lease token: each a tag byte and the bytes it counts. Below 128:
             the length of UTF-8 text; 0x80 + n: lowercase hex packed into n bytes (a sha256
             fingerprint takes 32); 0xC0 + n: a proxy's lease token ``<16 hex>-<counter>``,
             the hex packed and the counter big-endian in as few bytes as it needs
    rest     the response (``records.encode_response``) of a ``c`` record

Each encoding is one-to-one, so the scripts compare encoded fields as they are: Lua needs only
``string.byte`` and ``string.sub`` (``_READ``). Value and expiry are always written by the same
script (``SET ... PX``), so no reader ever sees a record without its TTL; a retried lease or
completion rewrites its state byte (``SETRANGE``) so that a ``WAIT`` after it covers it. Because
each script names one key, the same scripts run unchanged on Redis Cluster.

Records of the previous layout, a hash (``s`` state, ``f`` fingerprint, ``t`` token, ``c``
creation ms, ``r`` msgpack response) written by an older proxy, are still read and fenced: its
lease blocks, its completed record replays, until it expires. New records are always strings.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.asyncio.connection import parse_url
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
_STATE_BYTES = {ord(code): state for code, state in _STATE_CODES.items()}

# A fingerprint or a token in the record: a tag byte, then the bytes it counts. A tag below 128
# is the length of UTF-8 text; 0x80 + n: n bytes of packed lowercase hex; 0xC0 + n: a proxy's
# lease token "<16 hex>-<n>", the hex packed and the counter big-endian (n bytes in all).
_HEX, _LEASE = 0x80, 0xC0
# Lowercase hex of 1 to 63 whole bytes: its length is checked apart, as a repeated pair group
# costs the regex engine several times a plain character run (a fingerprint on every acquire).
_HEX_DIGITS = re.compile(r"[0-9a-f]+")
_LEASE_PREFIX = re.compile(r"[0-9a-f]{16}")


@functools.lru_cache(maxsize=64)
def _packed_prefix(prefix: str) -> bytes | None:
    """A lease token's 16-hex process prefix, packed; None if it is not one. Cached: a proxy
    process has one prefix, and packing it anew cost a microsecond per store call."""
    return bytes.fromhex(prefix) if _LEASE_PREFIX.fullmatch(prefix) else None


def _lease_field(text: str) -> bytes | None:
    """The field of ``text`` (with "-" at 16) if it is a lease token ``<16 hex>-<counter below
    2**64, no leading zero>``, else None."""
    counter = text[17:]
    if not (counter.isascii() and counter.isdigit()) or len(counter) > 20:
        return None
    if (counter[0] == "0" and counter != "0") or (n := int(counter)) >= 2**64:
        return None
    prefix = _packed_prefix(text[:16])
    if prefix is None:
        return None
    data = prefix + n.to_bytes(max(1, -(-n.bit_length() // 8)), "big")
    return bytes((_LEASE | len(data),)) + data


def _field(text: str) -> bytes:
    if text[16:17] == "-" and (lease := _lease_field(text)) is not None:
        return lease
    if len(text) % 2 == 0 and len(text) <= 126 and _HEX_DIGITS.fullmatch(text):
        data = bytes.fromhex(text)
        return bytes((_HEX | len(data),)) + data
    data = text.encode()
    if len(data) >= 128:
        raise ValueError(f"{text[:20]!r}...: a fingerprint or token longer than a record keeps")
    return bytes((len(data),)) + data


def _unfield(value: bytes, at: int) -> tuple[str, int]:
    """The text of the field at ``at``, and where the next one starts."""
    tag = value[at]
    if tag < 0x80:
        end = at + 1 + tag
        return value[at + 1 : end].decode(), end
    end = at + 1 + (tag & 63)
    data = value[at + 1 : end]
    if tag & _LEASE == _LEASE:
        return f"{data[:8].hex()}-{int.from_bytes(data[8:], 'big')}", end
    return data.hex(), end


def _header(fingerprint: str, token: str, created_ms: int) -> bytes:
    """A new in-flight record: everything but the response (see the module docstring)."""
    return b"i" + created_ms.to_bytes(6, "big") + _field(fingerprint) + _field(token)


def decode_record(value: bytes, expires_in: float | None = None) -> Record:
    """A record of this layout (a string value) as the store answers it."""
    fingerprint, at = _unfield(value, 7)
    token, at = _unfield(value, at)
    return Record(
        _STATE_BYTES[value[0]],
        fingerprint,
        token,
        int.from_bytes(value[1:7], "big") / 1000,
        decode_response(value[at:]) if len(value) > at else None,
        expires_in,
    )


def _hash_record(fields: list[Any], expires_in: float | None = None) -> Record:
    """A record of the previous layout, a hash: state, fingerprint, token, created, response."""
    state, fp, holder, created, resp = fields
    return Record(
        _STATE_CODES[state.decode()],
        fp.decode(),
        holder.decode(),
        int(created) / 1000,
        decode_response(resp) if resp else None,
        expires_in,
    )


# Every script starts with this. A string is a record of this layout; a hash is one of the
# previous layout (written by an older proxy), read and fenced as the previous scripts did.
# record(key) -> state, fingerprint, token as kept (string: encoded fields; hash: text), the
# string value (nil for a hash), and the position of the header's last byte. GET's WRONGTYPE on a
# hash is caught (pcall) but Redis counts it in errorstat_WRONGTYPE: only while old records live.
_READ = """
local function size(tag)
  if tag < 128 then
    return tag
  end
  return tag % 64
end
local function fields(v)
  local f = 8 + size(string.byte(v, 8))
  local t = f + 1 + size(string.byte(v, f + 1))
  return string.sub(v, 1, 1), string.sub(v, 8, f), string.sub(v, f + 1, t), t
end
local function record(key)
  local v = redis.pcall('GET', key)
  if not v then
    return nil
  end
  if type(v) == 'table' then
    local cur = redis.call('HMGET', key, 's', 'f', 't')
    return cur[1], cur[2], cur[3], nil, 0
  end
  local state, fp, token, last = fields(v)
  return state, fp, token, v, last
end
"""

# ARGV: fingerprint, token, lock_ttl_ms, now_ms, the new record's header (``_header``).
# Returns 1 when the caller now holds the lease, else the record: its header (with the response
# only for a completed record with the same fingerprint), or for a hash {state, fingerprint,
# token, created, resp}.
ACQUIRE = Script(
    _READ
    + """
local state, fp, token, v, last = record(KEYS[1])
if not state then
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[3])
  return 1
end
local my_fp, my_token = ARGV[1], ARGV[2]
if v then
  local _
  _, my_fp, my_token = fields(ARGV[5])
end
if state == 'i' and token == my_token then
  -- a retried call: written again, so that a WAIT after it covers the lease
  if v then
    redis.call('SETRANGE', KEYS[1], 0, 'i')
  else
    redis.call('HSET', KEYS[1], 't', ARGV[2])
  end
  return 1
end
local same = state == 'c' and fp == my_fp
if v then
  if same then
    return v
  end
  return string.sub(v, 1, last)
end
local resp = ''
if same then
  resp = redis.call('HGET', KEYS[1], 'r')
end
return {state, fp, token, redis.call('HGET', KEYS[1], 'c'), resp}
"""
)

# ARGV: token, lock_ttl_ms, the token's field (``_field``)
RENEW = Script(
    _READ
    + """
local state, _, token, v = record(KEYS[1])
if state == 'i' and token == (v and ARGV[3] or ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
)

# ARGV: token, new state ('c' or 'u'), encoded response, ttl_ms, the token's field
COMPLETE = Script(
    _READ
    + """
local state, _, token, v, last = record(KEYS[1])
if not state or token ~= (v and ARGV[5] or ARGV[1]) then
  return 0
end
if state == 'i' then
  if v then
    redis.call('SET', KEYS[1], ARGV[2] .. string.sub(v, 2, last) .. ARGV[3], 'PX', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 's', ARGV[2], 'r', ARGV[3])
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
  return 1
end
if state == ARGV[2] then
  -- a retried completion: written again, so that a WAIT after it covers the record
  if v then
    redis.call('SETRANGE', KEYS[1], 0, state)
  else
    redis.call('HSET', KEYS[1], 's', state)
  end
  return 1
end
return 0
"""
)

# ARGV: token, the token's field
RELEASE = Script(
    _READ
    + """
local state, _, token, v = record(KEYS[1])
if state == 'i' and token == (v and ARGV[2] or ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
)

# Returns 0, or {value, pttl} for a string, or {state, fingerprint, token, created, resp, pttl}.
GET = Script(
    _READ
    + """
local state, fp, token, v = record(KEYS[1])
if not state then
  return 0
end
if v then
  return {v, redis.call('PTTL', KEYS[1])}
end
local cur = redis.call('HMGET', KEYS[1], 'c', 'r')
return {state, fp, token, cur[1], cur[2] or '', redis.call('PTTL', KEYS[1])}
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


# What a Redis client raises when the store cannot answer (redis-py's errors or resp's).
_FAILURES = (RedisError, ReplyError, OSError, TimeoutError)


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"redis: {type(exc).__name__}: {exc}", maybe_applied=not _refused(exc))


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
            # The URL's host and port are the sentinels' business; everything else in it
            # (credentials, database, ?db=, ?password= and the other options) is read by
            # redis-py's own parser, as for a standalone URL.
            options: dict[str, Any] = dict(parse_url(config.url))
            for name in ("host", "port", "connection_class"):
                options.pop(name, None)
            self._sentinel = Sentinel(
                list(config.sentinels),
                sentinel_kwargs={"socket_timeout": STORE_TIMEOUT},
                **timeouts,
            )
            master: aioredis.Redis = self._sentinel.master_for(
                config.service_name, ssl=urlsplit(config.url).scheme == "rediss", **options
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
        if isinstance(self._redis, RedisCluster):
            # A PING to one node answers while a dead master's slots refuse every key
            # (CLUSTERDOWN): every master must answer and see the cluster serving.
            answers: dict[str, Any] = await self._bounded(
                self._redis.cluster_info(target_nodes=RedisCluster.PRIMARIES)
            )
            if not all(isinstance(a, dict) for a in answers.values()):
                answers = {"": answers}  # the one answer of a 1-master cluster
            for node, info in answers.items():
                if info.get("cluster_state") != "ok":
                    raise ConnectionError(f"cluster_state {info.get('cluster_state')} at {node}")
            return
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
        except _FAILURES as exc:
            raise _unavailable(exc) from exc

    async def acquire(
        self, key: str, fingerprint: str, token: str, lock_ttl: float
    ) -> Record | None:
        now_ms = int(time.time() * 1000)
        args = (fingerprint, token, _ms(lock_ttl), now_ms, _header(fingerprint, token, now_ms))
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
            try:  # not through _call: one coroutine fewer on the path of every keyed request
                result = await self._client.run(ACQUIRE, key, args)
            except _FAILURES as exc:
                raise _unavailable(exc) from exc
        if result == 1:
            return None
        return decode_record(result) if isinstance(result, bytes) else _hash_record(result)

    async def renew(self, key: str, token: str, lock_ttl: float) -> bool:
        args = (token, _ms(lock_ttl), _field(token))
        return bool(await self._call(self._client.run(RENEW, key, args)))

    async def complete(
        self, key: str, token: str, response: StoredResponse | None, ttl: float
    ) -> bool:
        state, data = ("c", encode_response(response)) if response is not None else ("u", b"")
        args = (token, state, data, _ms(ttl), _field(token))
        if not self._replicas:
            try:  # not through _call: one coroutine fewer on the path of every new key
                return bool(await self._client.run(COMPLETE, key, args))
            except _FAILURES as exc:
                raise _unavailable(exc) from exc
        done, acked = await self._run_waited(COMPLETE, key, args)
        if done and acked < self._replicas:
            raise NotReplicated(self._unacknowledged("completion", acked))
        return bool(done)

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._call(self._client.run(RELEASE, key, (token, _field(token)))))

    async def get(self, key: str) -> Record | None:
        result: Any = await self._call(self._client.run(GET, key, ()))
        if result == 0:
            return None
        *fields, pttl = result
        expires_in = max(0, int(pttl)) / 1000
        if len(fields) == 1:
            return decode_record(fields[0], expires_in)
        return _hash_record(fields, expires_in)

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
                f"{connected} replica(s) connected and acknowledging; wait_replicas needs "
                f"{self._replicas}"
            )
        return None

    async def close(self) -> None:
        await self._client.close()
