"""A pipelined Redis client for the hot path: standalone Redis over TCP or a unix socket.

Commands share one connection. Under load, those issued in the same loop iteration leave in
one write (a command with nothing else in flight goes at once), and Redis answers in order, so
replies are matched to callers first in, first out. N concurrent requests cost one system call
each way instead of N, and none of redis-py's per-command pool checkout, encoder and parser
layers. Sentinel, Cluster, TLS and URL options stay on redis-py.

Scripts followed by a ``WAIT`` (``run_waited``) go on connections of their own, "lanes". Redis
blocks a client for as long as its WAIT is pending and reads nothing more from it meanwhile, so
on one shared connection every later command, waited or not, would queue behind each
replication round trip, one WAIT after the other. Instead, a waited batch is written to a lane
with no WAIT pending, followed by one WAIT that covers every write of the batch (a WAIT counts
the writes of the connection it is sent on, so script and WAIT always share a lane). While
every lane is blocked, waited scripts are held, and the next lane to be answered takes all of
them under one WAIT: group commit, at most ``_LANES`` WAITs pending at once. Other commands
stay on the main connection, which never WAITs.

Timeouts: instead of a timer per command, a watchdog looks at the oldest unanswered command
twice a second; when it is older than the store timeout the connection is dropped, which fails
every command on it. In-order replies make the oldest command the one that tells. A held
script waits at most until a lane answers or is dropped, or until a lane's connect attempt
fails.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis

_WATCHDOG_INTERVAL = 0.5
# Connections for waited scripts: at most this many WAITs pending at once.
_LANES = 2

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


# A replica acknowledges its offset every second (REPLCONF ACK); INFO's ``lag`` is the seconds
# since its last one. One silent for longer is linked but takes no writes: a frozen process,
# a partition the master has not noticed yet. It acknowledges no WAIT, so it does not count.
REPLICA_LAG_LIMIT = 2


def connected_replicas(info: bytes | str | dict[str, Any]) -> int:
    """The replicas in an INFO replication answer (text, or redis-py's dict) that are online
    and acknowledged within ``REPLICA_LAG_LIMIT`` seconds."""
    if isinstance(info, dict):
        replicas = [
            value for name, value in info.items() if name.startswith("slave") and name[5:].isdigit()
        ]
    else:
        text = info.decode() if isinstance(info, bytes) else info
        replicas = [
            dict(field.split("=", 1) for field in line.split(":", 1)[1].split(",") if "=" in field)
            for line in text.splitlines()
            if line.startswith("slave") and line[5:].split(":", 1)[0].isdigit()
        ]
    return sum(
        1
        for replica in replicas
        if isinstance(replica, dict)
        and replica.get("state") == "online"
        and int(replica.get("lag", REPLICA_LAG_LIMIT + 1)) <= REPLICA_LAG_LIMIT
    )


def fast_path_supports(url: str) -> bool:
    """Whether ``url`` needs nothing this client lacks: redis:// or unix://, no TLS, no
    options other than ``db``."""
    parts = urlsplit(url)
    options = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    return parts.scheme in ("redis", "unix") and options <= {"db"}


@dataclass(slots=True)
class _Held:
    """A waited script: its packed command, its reply's future and its WAIT's."""

    command: bytes
    reply: asyncio.Future[Any]
    acked: asyncio.Future[Any]


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
        self._transport = None

    def send(self, command: bytes) -> asyncio.Future[Any]:
        future = self._loop.create_future()
        transport = self._transport
        if self._ended is not None or transport is None:
            future.set_exception(self._ended or ConnectionResetError("not connected"))
            return future
        self._waiting.append((future, self._loop.time() + self._timeout))
        if not self._outgoing and len(self._waiting) == 1:
            transport.write(command)  # nothing else in flight: no batch worth waiting for
            return future
        if not self._outgoing:  # the first of a batch: a flush is due later in this iteration
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        return future

    def send_batch(self, batch: list[_Held], wait: bytes) -> asyncio.Future[Any]:
        """Write every command of ``batch`` and then ``wait`` (a packed WAIT) at once; each
        command's reply goes to its future, and the WAIT's reply to the future returned."""
        acked = self._loop.create_future()
        transport = self._transport
        if self._ended is not None or transport is None:
            reason = self._ended or ConnectionResetError("not connected")
            _fail([held.reply for held in batch], reason)
            acked.set_exception(reason)
            return acked
        deadline = self._loop.time() + self._timeout
        for held in batch:
            self._waiting.append((held.reply, deadline))
            self._outgoing.append(held.command)
        self._waiting.append((acked, deadline))
        self._outgoing.append(wait)
        # Anything send() queued earlier leaves first, in order; its pending flush finds
        # nothing left to write.
        transport.write(b"".join(self._outgoing))
        self._outgoing.clear()
        return acked

    def close(self) -> None:
        self._abort(ConnectionResetError("the store was closed"))

    def _flush(self) -> None:
        if self._outgoing and self._transport is not None and self._ended is None:
            self._transport.write(b"".join(self._outgoing))
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


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _fan_out(shared: asyncio.Future[Any], batch: list[_Held]) -> None:
    """Pass one WAIT reply on to every caller that shares it."""
    if shared.cancelled():
        return _fail([held.acked for held in batch], ConnectionResetError("the store was closed"))
    error = shared.exception()
    for held in batch:
        if held.acked.done():  # its caller gave up (cancelled)
            continue
        if error is not None:
            held.acked.set_exception(error)
        else:
            held.acked.set_result(shared.result())
    return None


class PipelinedRedis:
    """A pipelined connection to a standalone Redis, opened on first use and after a loss, and
    up to ``_LANES`` more for waited scripts, opened as they are needed."""

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
        # Bumped by close(): a connection whose attempt began before it is closed on arrival.
        self._generation = 0
        # Lanes: every open one, those with no WAIT pending, and the attempt opening one more.
        self._lanes: list[_Connection] = []
        self._idle: list[_Connection] = []
        self._lane_opening: asyncio.Future[_Connection] | None = None
        # Waited scripts not yet written, by their packed WAIT (in practice there is one).
        self._held: dict[bytes, list[_Held]] = {}
        self._waits: dict[tuple[int, int], bytes] = {}  # packed WAITs
        self._dispatch_due = False

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
        """Run ``script`` and, on the same lane after it, ``WAIT replicas timeout_ms``; return
        the script's reply and how many replicas acknowledged (0 when the WAIT failed)."""
        wait = self._waits.get((replicas, timeout_ms))
        if wait is None:
            wait = self._waits[(replicas, timeout_ms)] = _pack(("WAIT", replicas, timeout_ms))
        for command in (("EVALSHA", script.sha), ("EVAL", script.source)):
            held = self._send_waited(_pack((*command, 1, key, *args)), wait)
            # The script's reply comes first (same lane, in order), then its WAIT's.
            try:
                reply = await held.reply
            except BaseException as exc:
                # Nobody awaits the WAIT's reply now: it is retrieved, or never asked for.
                held.acked.add_done_callback(_retrieve)
                if not isinstance(exc, ReplyError):
                    held.acked.cancel()
                elif str(exc).startswith("NOSCRIPT"):
                    continue
                raise
            try:
                acked = await held.acked
            except Exception:  # the lane was lost or timed out: not acknowledged
                return reply, 0
            return reply, acked if isinstance(acked, int) else 0
        raise ReplyError("NOSCRIPT after EVAL")  # pragma: no cover - EVAL never answers it

    def _send_waited(self, command: bytes, wait: bytes) -> _Held:
        loop = asyncio.get_running_loop()
        held = _Held(command, loop.create_future(), loop.create_future())
        if not self._held and len(self._idle) == len(self._lanes):
            # No WAIT pending anywhere and nothing held: no batch worth waiting for.
            lane = self._free_lane()
            if lane is not None:
                self._write(lane, wait, [held])
                return held
        self._held.setdefault(wait, []).append(held)
        if not self._dispatch_due:  # the rest of this loop iteration joins the batch
            self._dispatch_due = True
            loop.call_soon(self._dispatch)
        return held

    def _dispatch(self) -> None:
        """Write each held batch, with its WAIT, to a lane with no WAIT pending; with none
        free, hold on until one is answered (or opened)."""
        self._dispatch_due = False
        while self._held:
            wait, batch = next(iter(self._held.items()))
            batch = [held for held in batch if not held.reply.done()]  # cancelled: not sent
            if not batch:
                del self._held[wait]
                continue
            lane = self._free_lane()
            if lane is None:
                self._held[wait] = batch
                self._open_lane()
                return
            del self._held[wait]
            self._write(lane, wait, batch)

    def _free_lane(self) -> _Connection | None:
        while self._idle:
            lane = self._idle.pop()
            if lane.usable:
                return lane
            self._lanes.remove(lane)
        return None

    def _write(self, lane: _Connection, wait: bytes, batch: list[_Held]) -> None:
        acked = lane.send_batch(batch, wait)
        acked.add_done_callback(partial(self._answered, lane, batch))

    def _answered(self, lane: _Connection, batch: list[_Held], acked: asyncio.Future[Any]) -> None:
        _fan_out(acked, batch)
        if lane in self._lanes:  # else closed meanwhile
            if lane.usable:
                self._idle.append(lane)
            else:
                self._lanes.remove(lane)
        if self._held:
            self._dispatch()

    def _open_lane(self) -> None:
        if self._lane_opening is not None or len(self._lanes) >= _LANES:
            return
        self._lane_opening = asyncio.ensure_future(self._open())
        self._lane_opening.add_done_callback(partial(self._lane_opened, self._generation))

    def _lane_opened(self, generation: int, attempt: asyncio.Future[_Connection]) -> None:
        self._lane_opening = None
        if attempt.cancelled():
            return
        error = attempt.exception()
        if error is not None:
            if not self._lanes:  # no lane to wait for: the held scripts fail, never sent
                self._fail_held(error)
            return
        lane = attempt.result()
        if generation != self._generation:
            lane.close()
            return
        self._lanes.append(lane)
        self._idle.append(lane)
        if self._held:
            self._dispatch()

    def _fail_held(self, reason: BaseException) -> None:
        held, self._held = self._held, {}
        for batch in held.values():
            _fail([h.reply for h in batch], reason)
            _fail([h.acked for h in batch], reason)

    async def replicas(self) -> int:
        return connected_replicas(await self.execute("INFO", "replication"))

    async def delete(self, key: str) -> int:
        deleted: int = await self.execute("DEL", key)
        return deleted

    async def ping(self) -> None:
        await self.execute("PING")

    async def close(self) -> None:
        """Close every connection; a connect attempt under way is closed when it ends, and
        waited scripts not yet written fail."""
        self._generation += 1
        closed = ConnectionResetError("the store was closed")
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        lanes, self._lanes, self._idle = self._lanes, [], []
        for lane in lanes:
            lane.close()
        self._fail_held(closed)

    async def _connect(self) -> _Connection:
        """Open the connection; callers arriving meanwhile share the one attempt (and its
        time bound) instead of queueing for attempts of their own."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open_main(self._generation))
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, attempt: asyncio.Future[_Connection]) -> None:
        self._opening = None
        if not attempt.cancelled():
            attempt.exception()  # retrieved here too, in case every caller gave up waiting

    async def _open_main(self, generation: int) -> _Connection:
        connection = await self._open()
        if generation != self._generation:
            connection.close()
            raise NotSent("the store was closed")
        self._connection = connection
        return connection

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
        return connection
