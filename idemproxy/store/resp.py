"""A pipelined Redis client for the hot path: standalone Redis over TCP or a unix socket.

All commands share one connection. Under load, those issued in the same loop iteration leave in
one write (a command with nothing else in flight goes at once), and Redis answers in order, so
replies are matched to callers first in, first out. N concurrent requests cost one system call
each way instead of N, and none of redis-py's per-command pool checkout, encoder and parser
layers. Sentinel, Cluster, TLS and URL options stay on redis-py.

Timeouts: instead of a timer per command, a watchdog looks at the oldest unanswered command
twice a second; when it is older than the store timeout the connection is dropped, which fails
every command on it. In-order replies make the oldest command the one that tells.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis

_WATCHDOG_INTERVAL = 0.5

Arg = bytes | str | int


def _pack(args: tuple[Arg, ...]) -> bytes:
    # hiredis's stub declares a 1-tuple; pack_command takes a tuple of any length
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


class ReplyError(Exception):
    """Redis answered the command with an error."""


class NotSent(ConnectionError):
    """No connection to Redis could be made: the command never reached it."""


@dataclass(frozen=True)
class Script:
    """A Lua script run by its SHA1 digest, sent in full only when Redis lacks it."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", digest)


def connected_replicas(info: bytes | str | dict[str, Any]) -> int:
    """``connected_slaves`` from an INFO replication answer (text, or redis-py's dict)."""
    if isinstance(info, dict):
        return int(info.get("connected_slaves", 0))
    text = info.decode() if isinstance(info, bytes) else info
    for line in text.splitlines():
        if line.startswith("connected_slaves:"):
            return int(line.split(":", 1)[1])
    return 0


def fast_path_supports(url: str) -> bool:
    """Whether ``url`` needs nothing this client lacks: redis:// or unix://, no TLS, no
    options other than ``db``."""
    parts = urlsplit(url)
    options = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    return parts.scheme in ("redis", "unix") and options <= {"db"}


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader()
        # (caller's future, deadline), in the order the commands were written
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._outgoing: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._ended: BaseException | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        # The WAIT that closes the batch being gathered, and the callers waiting for it.
        self._batch_wait: tuple[bytes, list[asyncio.Future[Any]]] | None = None

    @property
    def usable(self) -> bool:
        return self._ended is None and self._transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._watchdog = self._loop.call_later(_WATCHDOG_INTERVAL, self._watch)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                future = self._waiting.popleft()[0]
                if future.done():  # its caller gave up (cancelled): the reply is dropped
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(ReplyError(str(reply)))
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:
            self._abort(ConnectionError(f"unreadable reply from redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ended is None:
            self._ended = exc or ConnectionResetError("redis closed the connection")
        if self._watchdog is not None:
            self._watchdog.cancel()
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(self._ended)
        if self._batch_wait is not None:
            _fail(self._batch_wait[1], self._ended)
            self._batch_wait = None
        self._transport = None

    def send(self, command: bytes) -> asyncio.Future[Any]:
        return self._send(command, None)[0]

    def send_waited(
        self, command: bytes, wait: bytes
    ) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
        """Send ``command`` followed, in the same write, by ``wait`` (a packed WAIT); return
        the command's future and the WAIT's. The commands batched in one loop iteration share
        one WAIT, written after the last of them: it covers every write before it."""
        return self._send(command, wait)

    def _send(
        self, command: bytes, wait: bytes | None
    ) -> tuple[asyncio.Future[Any], asyncio.Future[Any]]:
        future = self._loop.create_future()
        transport = self._transport
        if self._ended is not None or transport is None:
            future.set_exception(self._ended or ConnectionResetError("not connected"))
            return future, future
        deadline = self._loop.time() + self._timeout
        self._waiting.append((future, deadline))
        if not self._outgoing and len(self._waiting) == 1:
            # Nothing else in flight: no batch worth waiting for.
            if wait is None:
                transport.write(command)
                return future, future
            acked = self._loop.create_future()
            self._waiting.append((acked, deadline))
            transport.write(command + wait)
            return future, acked
        if not self._outgoing:  # the first of a batch: a flush is due later in this iteration
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        if wait is None:
            return future, future
        # Each caller gets a future of its own: a cancelled caller cancels only its own.
        acked = self._loop.create_future()
        if self._batch_wait is None:
            self._batch_wait = (wait, [])
        self._batch_wait[1].append(acked)
        return future, acked

    def close(self) -> None:
        self._abort(ConnectionResetError("the store was closed"))

    def _flush(self) -> None:
        batch_wait, self._batch_wait = self._batch_wait, None
        if self._transport is not None and self._ended is None:
            if batch_wait is not None:
                wait, callers = batch_wait
                shared = self._loop.create_future()
                shared.add_done_callback(lambda done: _fan_out(done, callers))
                self._waiting.append((shared, self._loop.time() + self._timeout))
                self._outgoing.append(wait)
            self._transport.write(b"".join(self._outgoing))
        elif batch_wait is not None:
            _fail(batch_wait[1], self._ended or ConnectionResetError("not connected"))
        self._outgoing.clear()

    def _watch(self) -> None:
        if self._waiting and self._waiting[0][1] < self._loop.time():
            self._abort(TimeoutError(f"redis did not answer within {self._timeout:g}s"))
            return
        self._watchdog = self._loop.call_later(_WATCHDOG_INTERVAL, self._watch)

    def _abort(self, reason: BaseException) -> None:
        if self._ended is None:
            self._ended = reason
        if self._transport is not None:
            self._transport.abort()  # connection_lost fails whatever still waits


def _fail(futures: list[asyncio.Future[Any]], reason: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(reason)


def _fan_out(shared: asyncio.Future[Any], callers: list[asyncio.Future[Any]]) -> None:
    """Pass one WAIT reply on to every caller that shares it."""
    if shared.cancelled():
        return _fail(callers, ConnectionResetError("the store was closed"))
    error = shared.exception()
    for future in callers:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(shared.result())
    return None


class PipelinedRedis:
    """One pipelined connection to a standalone Redis, opened on first use and after a loss."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        self._unix_path = parts.path if parts.scheme == "unix" else None
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        path_db = parts.path.strip("/") if parts.scheme == "redis" else ""
        self._db = int(options.get("db") or path_db or "0")
        self._timeout = timeout
        self._connection: _Connection | None = None
        self._opening: asyncio.Future[_Connection] | None = None

    def execute(self, *args: Arg) -> Awaitable[Any]:
        """Send one command; the reply is awaited. Connected, that is the reply's future itself:
        no coroutine frame per command on the hot path."""
        connection = self._connection
        if connection is not None and connection.usable:
            return connection.send(_pack(args))
        return self._connect_and_execute(args)

    async def _connect_and_execute(self, args: tuple[Arg, ...]) -> Any:
        connection = await self._connect()
        return await connection.send(_pack(args))

    async def run(self, script: Script, key: str, args: tuple[Arg, ...]) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha, 1, key, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", script.source, 1, key, *args)

    async def run_waited(
        self, script: Script, key: str, args: tuple[Arg, ...], replicas: int, timeout_ms: int
    ) -> tuple[Any, int]:
        """Run ``script`` and, in the same write, ``WAIT replicas timeout_ms``; return the
        script's reply and how many replicas acknowledged (0 when the WAIT failed)."""
        wait = _pack(("WAIT", replicas, timeout_ms))
        for command in (("EVALSHA", script.sha), ("EVAL", script.source)):
            connection = self._connection
            if connection is None or not connection.usable:
                connection = await self._connect()
            sent = connection.send_waited(_pack((*command, 1, key, *args)), wait)
            results: Any = await asyncio.gather(*sent, return_exceptions=True)
            reply, acked = results
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                continue
            if isinstance(reply, BaseException):
                raise reply
            return reply, acked if isinstance(acked, int) else 0
        raise ReplyError("NOSCRIPT after EVAL")  # pragma: no cover - EVAL never answers it

    async def replicas(self) -> int:
        return connected_replicas(await self.execute("INFO", "replication"))

    async def delete(self, key: str) -> int:
        deleted: int = await self.execute("DEL", key)
        return deleted

    async def ping(self) -> None:
        await self.execute("PING")

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _connect(self) -> _Connection:
        """Open the connection; callers arriving meanwhile share the one attempt (and its
        time bound) instead of queueing for attempts of their own."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, attempt: asyncio.Future[_Connection]) -> None:
        self._opening = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here too, in case every caller gave up waiting

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout):
                if self._unix_path is not None:
                    _, connection = await loop.create_unix_connection(
                        lambda: _Connection(loop, self._timeout), self._unix_path
                    )
                else:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(loop, self._timeout), self._host, self._port
                    )
        except (OSError, TimeoutError) as exc:
            raise NotSent(f"cannot connect to redis: {exc}") from exc
        try:
            if self._password is not None:
                auth = (self._username, self._password) if self._username else (self._password,)
                await connection.send(_pack(("AUTH", *auth)))
            if self._db:
                await connection.send(_pack(("SELECT", self._db)))
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection
