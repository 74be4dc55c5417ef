"""A lean HTTP/1.1 client for keyed exchanges.

A keyed request's body is already in memory and its answer is read whole, up to the storable
limit, so the exchange needs little of aiohttp's client: here the request goes out in one write
with the client's header bytes as they came, and the answer is parsed as it arrives, on
keep-alive connections from a small pool. It costs about half of an aiohttp client request
(bench/profile-new-keys.txt). Pass-through, ETag reads and WebSockets stay on aiohttp.

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

RawHeaders = list[tuple[bytes, bytes]]

# Response heads relayed on every path (aiohttp's client is given the same bounds).
MAX_HEAD = 64 * 1024  # status line and headers of one response
MAX_HEADER_FIELDS = 256
# A pooled connection idle longer than this is closed rather than reused: below the keep-alive
# timeouts of common upstream servers (Node and uvicorn 5 s, gunicorn 2 s), so that a request is
# not sent on a connection the upstream is closing at that moment (a lost answer is ambiguous).
_IDLE_EXPIRY = 1.5
_PAUSE_AT = 256 * 1024  # streamed rest buffered for a slow client before reading pauses

# Parser states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


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
    """One upstream connection; parses one response at a time."""

    def __init__(self, pool: Http1Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.closed = False
        self.idle_since = 0.0
        self._answer: asyncio.Future[Answer] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._rest: ResponseRest | None = None
        self._state = _DONE
        self._head_request = False
        self._max_body = 0
        self._stream_all = False  # pass-through: the body streams from the head on
        self._paused = False
        self._last_read = 0.0
        self._status = 0
        self._reason = ""
        self._headers: RawHeaders = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._remaining = 0
        self._reusable = False

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
        self._state = _HEAD
        self._head_request = head_request
        self._stream_all = max_body is None
        self._max_body = max_body or 0
        self._last_read = loop.time()
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
        self._state = _DONE
        self.close()

    def _body(self, chunk: bytes) -> None:
        if self._rest is not None:
            self._rest.feed(chunk)
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > self._max_body:  # too large to keep: the caller streams the rest
            self._rest = ResponseRest(self)
            self._resolve(self._rest)

    def _resolve(self, rest: ResponseRest | None) -> None:
        assert self._answer is not None
        body = b"".join(self._chunks)
        self._chunks = []
        if not self._answer.done():
            self._answer.set_result(Answer(self._status, self._reason, self._headers, body, rest))

    def _complete(self) -> None:
        self._state = _DONE
        if self._timer is not None:
            self._timer.cancel()
        if self._rest is not None:
            self._rest.end()
            self._rest = None
        else:
            self._resolve(None)
        if self._paused:
            self.resume()
        if self._reusable and not self._buffer and not self.closed:
            self._pool.release(self)
        else:
            self.close()

    # -- parsing --------------------------------------------------------------------------

    def _advance(self) -> None:
        buffer = self._buffer
        while True:
            state = self._state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end > MAX_HEAD or (end < 0 and len(buffer) > MAX_HEAD):
                    self._fail(UpstreamFailure("broken", "the response head is too large"))
                    return
                if end < 0:
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                if not self._read_head(head):
                    return
            elif state in (_LENGTH, _CHUNK_DATA):
                take = min(self._remaining, len(buffer))
                if take:
                    self._body(bytes(buffer[:take]))
                    del buffer[:take]
                    self._remaining -= take
                if self._remaining:
                    return
                if state == _LENGTH:
                    self._complete()
                    return
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    self._fail(UpstreamFailure("broken", "malformed chunked body"))
                    return
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state in (_CHUNK_SIZE, _TRAILERS):
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        self._fail(UpstreamFailure("broken", "malformed chunked body"))
                    return
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if state == _TRAILERS:
                    if not line:
                        self._complete()
                        return
                    continue  # trailers are dropped, as aiohttp's client does
                size = _chunk_size(line)
                if size is None:
                    self._fail(UpstreamFailure("broken", "malformed chunk size"))
                    return
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILERS
            elif state == _UNTIL_CLOSE:
                if buffer:
                    self._body(bytes(buffer))
                    buffer.clear()
                return
            else:  # _DONE: bytes nobody asked for; the connection cannot be trusted again
                if buffer:
                    buffer.clear()
                    self.close()
                return

    def _read_head(self, head: bytes) -> bool:
        """Take a status line and headers; False when there is nothing more to parse now."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not _is_status(parts[1]):
            self._fail(UpstreamFailure("broken", "not an HTTP/1.x response"))
            return False
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            return True  # an interim response (100 Continue, 103 Early Hints): the real one follows
        headers: RawHeaders = []
        length: bytes | None = None
        chunked = False
        transfer_coded = False
        keep_alive = parts[0] == b"HTTP/1.1"
        if len(lines) > MAX_HEADER_FIELDS + 1:
            self._fail(UpstreamFailure("broken", f"more than {MAX_HEADER_FIELDS} header fields"))
            return False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b"\r" in line or b"\n" in line:
                self._fail(UpstreamFailure("broken", "malformed response header"))
                return False
            value = value.strip(b" \t")
            headers.append((name, value))
            lower = name.lower()
            if lower == b"content-length":
                if length is not None and value != length:
                    self._fail(UpstreamFailure("broken", "conflicting Content-Length headers"))
                    return False
                length = value
            elif lower == b"transfer-encoding":
                transfer_coded = True
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            elif lower == b"connection":
                tokens = {token.strip().lower() for token in value.split(b",")}
                keep_alive = (keep_alive and b"close" not in tokens) or b"keep-alive" in tokens
        if length is not None and transfer_coded:
            # RFC 9112 6.3: a sign of response splitting. Refused, as aiohttp's parser refuses
            # it on the other paths, so every path frames an answer the same way.
            self._fail(UpstreamFailure("broken", "both Transfer-Encoding and Content-Length"))
            return False
        self._status = status
        self._reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        self._headers = headers
        self._reusable = keep_alive and status != 101
        if self._stream_all:
            self._rest = ResponseRest(self)
            self._resolve(self._rest)
        if self._head_request or status in (101, 204, 304):
            self._remaining = 0
            self._state = _LENGTH
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None and not transfer_coded:
            if not length.isdigit():
                self._fail(UpstreamFailure("broken", "invalid Content-Length"))
                return False
            self._remaining = int(length)
            self._state = _LENGTH
        else:
            self._reusable = False
            self._state = _UNTIL_CLOSE
        return True

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._stream_all:
            self._last_read = self._pool.loop.time()
        self._buffer += data
        self._advance()

    def eof_received(self) -> bool:
        if self._state == _UNTIL_CLOSE:
            self._complete()
        elif self._state != _DONE:
            self._fail(UpstreamFailure("broken", "the upstream closed the connection"))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _UNTIL_CLOSE and exc is None:
            self._complete()
        elif self._state != _DONE:
            detail = f": {exc}" if exc else ""
            self._fail(UpstreamFailure("broken", f"the connection was lost{detail}"))
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


def _is_status(text: bytes) -> bool:
    return len(text) == 3 and text.isdigit() and text[:1] != b"0"


def _chunk_size(line: bytes) -> int | None:
    digits = line.split(b";", 1)[0].strip(b" \t")
    if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
        return None
    return int(digits, 16)


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
