"""A lean HTTP/1.1 client for keyed exchanges.

A keyed request's body is already in memory and its answer is read whole, up to the storable
limit, so the exchange needs little of aiohttp's client: here the request goes out in one write
with the client's header bytes as they came, and the answer is parsed as it arrives, on
keep-alive connections from a small pool. It costs about half of an aiohttp client request
(bench/profile-new-keys.txt). Pass-through goes through it too, unless its request body is still
arriving (streamed up through aiohttp's client); ETag reads and WebSockets stay on aiohttp.

Failures say whether the request may have reached the upstream: ``connect`` when nothing was
sent, ``timeout`` or ``broken`` after it was.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from idemproxy.errors import UpstreamFailure
from idemproxy.response_parser import (
    MAX_HEAD,
    MAX_HEADER_FIELDS,
    Event,
    Head,
    RawHeaders,
    ResponseParser,
)

__all__ = ["MAX_HEAD", "MAX_HEADER_FIELDS", "Answer", "Http1Pool", "RawHeaders", "ResponseRest"]
# A pooled connection idle longer than this is closed rather than reused: below the keep-alive
# timeouts of common upstream servers (Node and uvicorn 5 s, gunicorn 2 s), so that a request is
# not sent on a connection the upstream is closing at that moment (a lost answer is ambiguous).
_IDLE_EXPIRY = 1.5
_PAUSE_AT = 256 * 1024  # streamed rest buffered for a slow client before reading pauses


@dataclass(slots=True)
class Answer:
    """A response: all of it, or (``rest`` set) the part read so far and the rest to come."""

    status: int
    reason: str
    headers: RawHeaders
    body: bytes
    rest: ResponseRest | None


class ResponseRest:
    """The part of a response beyond the storable limit, read as the client takes it."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._ended = False
        self._error: UpstreamFailure | None = None

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _PAUSE_AT:
            self._connection.pause()
        self._wake()

    def end(self, error: UpstreamFailure | None = None) -> None:
        self._ended = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= _PAUSE_AT // 2 and not self._ended:
                    self._connection.resume()
                yield chunk
            elif self._ended:
                if self._error is not None:
                    raise self._error
                return
            else:
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup

    def close(self) -> None:
        """Done with it. Abandoned before its end, the connection is dropped (not worth
        draining for reuse); once ended, the connection may already serve another request."""
        if not self._ended:
            self._connection.close()


class _Connection(asyncio.Protocol):
    """One upstream connection: the socket, the timer and one exchange at a time; the bytes
    are parsed by a ``ResponseParser``."""

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = ResponseParser()
        self.closed = False
        self.idle_since = 0.0
        self._answer: asyncio.Future[Answer] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._rest: ResponseRest | None = None
        self._max_body = 0
        self._stream_all = False  # pass-through: the body streams from the head on
        self._paused = False
        self._last_read = 0.0
        self._head: Head | None = None
        self._chunks: list[bytes] = []
        self._size = 0

    # -- the exchange ---------------------------------------------------------------------

    def send(
        self, request: bytes, head_request: bool, max_body: int | None
    ) -> asyncio.Future[Answer]:
        """``max_body``: read the body up to this size before answering (keyed: the timeout
        bounds the whole exchange); None: answer at the head and stream all of the body (pass-
        through: the timeout bounds each silence)."""
        assert self._transport is not None
        loop = self._pool.loop
        self._answer = loop.create_future()
        self._timer = loop.call_later(self._pool.timeout, self._time_out)
        self._parser.expect(head_request)
        self._stream_all = max_body is None
        self._max_body = max_body or 0
        self._last_read = loop.time()
        self._head = None
        self._chunks = []
        self._size = 0
        self._rest = None
        self._transport.write(request)
        return self._answer

    def _time_out(self) -> None:
        if self._stream_all:
            quiet_until = self._last_read + self._pool.timeout
            if quiet_until > self._pool.loop.time():  # data came meanwhile: not silent yet
                self._timer = self._pool.loop.call_at(quiet_until, self._time_out)
                return
        self._fail(UpstreamFailure("timeout", "no answer in time"))

    def _fail(self, failure: UpstreamFailure) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(failure)
        elif self._rest is not None:
            self._rest.end(failure)
        self._parser.abandon()
        self.close()

    def _body(self, chunk: bytes) -> None:
        if self._rest is not None:
            self._rest.feed(chunk)
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > self._max_body and not self._stream_all:
            self._rest = ResponseRest(self)  # too large to keep: the caller streams the rest
            self._resolve(self._rest)

    def _resolve(self, rest: ResponseRest | None) -> None:
        assert self._answer is not None
        assert self._head is not None
        body = b"".join(self._chunks)
        self._chunks = []
        if not self._answer.done():
            head = self._head
            self._answer.set_result(Answer(head.status, head.reason, head.headers, body, rest))

    def _complete(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._rest is not None:
            self._rest.end()
            self._rest = None
        else:
            self._resolve(None)
        if self._paused:
            self.resume()
        reusable = self._head is not None and self._head.keep_alive
        if reusable and not self._parser.unexpected_bytes and not self.closed:
            self._pool.release(self)
        else:
            self.close()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if type(event) is bytes:
                self._body(event)
            elif isinstance(event, Head):
                self._head = event
            else:
                self._complete()
                return
        if self._stream_all and self._head is not None and self._rest is None:
            # Pass-through: answered at the head with what came with it, the rest streamed.
            # An answer that came whole in one read was answered whole, by _complete.
            self._rest = ResponseRest(self)
            self._resolve(self._rest)

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._stream_all:
            self._last_read = self._pool.loop.time()
        try:
            events = self._parser.feed(data)
        except UpstreamFailure as failure:
            self._fail(failure)
            return
        self._handle(events)
        if self._parser.unexpected_bytes and not self._parser.in_response:
            self.close()  # bytes nobody asked for: the connection cannot be trusted again

    def eof_received(self) -> bool:
        try:
            self._handle(self._parser.feed_eof())
        except UpstreamFailure as failure:
            self._fail(failure)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None:
            self.eof_received()
        elif self._parser.in_response:
            self._fail(UpstreamFailure("broken", f"the connection was lost: {exc}"))
        if not self.closed:
            self.closed = True
            self._pool.forget(self)

    def pause(self) -> None:
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._transport is not None and self._paused and not self.closed:
            self._paused = False
            self._last_read = self._pool.loop.time()  # paused time is not upstream silence
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self.closed:
            self.closed = True
            self._pool.forget(self)


def serialise_request(method: bytes, target: bytes, headers: RawHeaders, body: bytes) -> bytes:
    """One whole HTTP/1.1 request: request line, header lines as given, blank line, body."""
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    lines.extend(name + b": " + value for name, value in headers)
    lines.append(b"")
    lines.append(body)
    return b"\r\n".join(lines)


class Http1Pool:
    """Keep-alive connections to one upstream, at most ``limit`` open at a time."""

    def __init__(self, url: str, limit: int, connect_timeout: float, timeout: float) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or ""
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        port = f":{parts.port}" if parts.port else ""
        self.host_header = self._host.encode("idna") + port.encode()
        self.path_prefix = parts.path.encode()
        self._limit = limit
        self._connect_timeout = connect_timeout
        self.timeout = timeout
        self._idle: deque[_Connection] = deque()
        self._open = 0
        self._slot_freed: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl = ssl.create_default_context() if self._tls else None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    async def exchange(self, request: bytes, head_request: bool, max_body: int | None) -> Answer:
        """Send ``request`` (head and body, serialised) and read its answer."""
        connection = self._idle_connection()
        if connection is None:
            connection = await self._new_connection()
        try:
            return await connection.send(request, head_request, max_body)
        except asyncio.CancelledError:
            connection.close()  # mid-exchange: the connection cannot be reused
            raise

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()  # the most recently used is the least likely closed
            if not connection.closed and self.loop.time() - connection.idle_since < _IDLE_EXPIRY:
                return connection
            connection.close()
        return None

    async def _new_connection(self) -> _Connection:
        self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                while self._open >= self._limit:
                    waiter = self.loop.create_future()
                    self._slot_freed.append(waiter)
                    await waiter
                    connection = self._idle_connection()
                    if connection is not None:
                        return connection
                self._open += 1
                try:
                    _, connection = await self.loop.create_connection(
                        lambda: _Connection(self),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._tls else None,
                    )
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
                return connection
        except TimeoutError as exc:
            raise UpstreamFailure("connect", "connecting timed out") from exc
        except OSError as exc:
            raise UpstreamFailure("connect", f"cannot connect: {exc}") from exc

    def release(self, connection: _Connection) -> None:
        connection.idle_since = self.loop.time()
        self._idle.append(connection)
        self._wake_one()

    def forget(self, connection: _Connection) -> None:
        """A connection closed: its slot is free."""
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_freed:
            waiter = self._slot_freed.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
