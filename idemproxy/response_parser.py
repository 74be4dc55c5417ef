"""An HTTP/1.1 response parser that does no I/O: fed bytes, it returns events.

The lean client (``http1``) owns the socket and the timers; this module only turns the bytes of
one connection into events, one response at a time: a ``Head``, body chunks (plain ``bytes``),
an ``End``, the way h11
does for httpcore. It is strict where leniency lets a response be read two ways (RFC 9112):
every malformed answer raises ``UpstreamFailure("broken", ...)`` with a reason fit for a log
(it never quotes the bytes it refused).

Framing, in RFC 9112 6.3 order: no body for HEAD, 1xx, 204 and 304; interim 1xx responses
(other than 101) are skipped; ``Transfer-Encoding`` ending in ``chunked``; ``Content-Length``;
otherwise the body runs until the connection closes. An answer with both ``Transfer-Encoding``
and ``Content-Length`` is refused (a sign of response splitting), as aiohttp's parser refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from idemproxy.errors import UpstreamFailure

RawHeaders = list[tuple[bytes, bytes]]

MAX_HEAD: Final = 64 * 1024  # status line and headers of one response
MAX_HEADER_FIELDS: Final = 256

# States
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


# A msgspec Struct: immutable like a frozen dataclass, and made far faster (one per response).
class Head(msgspec.Struct, frozen=True):
    status: int
    reason: str
    headers: RawHeaders
    # Whether the connection may carry another exchange once this response has ended.
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class End:
    pass


Event = Head | bytes | End  # bytes: a chunk of the body, as it came
_END: Final = End()


def _broken(reason: str) -> UpstreamFailure:
    return UpstreamFailure("broken", reason)


# Every byte a response head may hold: no control byte but HTAB (RFC 9110 5.5), and CR and LF
# only as line ends. Deleting these from a head leaves nothing unless it has another (one C
# loop: half a regex search's time, and this runs for every upstream answer).
_HEAD_BYTES: Final = bytes(b for b in range(256) if b in (9, 10, 13) or 0x20 <= b != 0x7F)


def has_control_byte(data: bytes) -> bool:
    """Whether ``data`` holds a byte no field value may (RFC 9110 5.5; CR and LF included)."""
    return bool(data.translate(None, _HEAD_BYTES)) or b"\r" in data or b"\n" in data


class ResponseParser:
    """One connection's responses. ``expect(head_request)`` before each; then ``feed`` the
    bytes as they arrive and ``feed_eof`` when the peer closes."""

    __slots__ = ("_buffer", "_head_request", "_remaining", "_state", "unexpected_bytes")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = _IDLE
        self._head_request = False
        self._remaining = 0
        # Bytes arrived that no response accounts for: the connection cannot be trusted again.
        self.unexpected_bytes = False

    @property
    def in_response(self) -> bool:
        """Whether a response is expected or under way (its end not yet parsed)."""
        return self._state != _IDLE

    def abandon(self) -> None:
        """The connection is being dropped mid-response: nothing more is parsed."""
        self._state = _IDLE
        self._buffer.clear()

    def expect(self, head_request: bool) -> None:
        """A request was sent: parse its response (no body when ``head_request``)."""
        self._state = _HEAD
        self._head_request = head_request

    def feed(self, data: bytes) -> list[Event]:
        self._buffer += data
        events: list[Event] = []
        self._advance(events)
        return events

    def feed_eof(self) -> list[Event]:
        """The peer closed: the end of a body that runs until close, else a broken answer."""
        if self._state == _UNTIL_CLOSE:
            self._state = _IDLE
            return [_END]
        if self._state != _IDLE:
            raise _broken("the upstream closed the connection")
        return []

    def _advance(self, events: list[Event]) -> None:
        buffer = self._buffer
        while True:
            state = self._state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end > MAX_HEAD or (end < 0 and len(buffer) > MAX_HEAD):
                    raise _broken("the response head is too large")
                if end < 0:
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                self._read_head(head, events)
            elif state in (_LENGTH, _CHUNK_DATA):
                take = min(self._remaining, len(buffer))
                if take:
                    events.append(bytes(buffer[:take]))
                    del buffer[:take]
                    self._remaining -= take
                if self._remaining:
                    return
                if state == _LENGTH:
                    self._end(events)
                    return
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise _broken("malformed chunked body")
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state in (_CHUNK_SIZE, _TRAILERS):
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise _broken("malformed chunked body")
                    return
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if state == _TRAILERS:
                    if not line:
                        self._end(events)
                        return
                    continue  # trailers are dropped, as aiohttp's client does
                size = _chunk_size(line)
                if size is None:
                    raise _broken("malformed chunk size")
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILERS
            elif state == _UNTIL_CLOSE:
                if buffer:
                    events.append(bytes(buffer))
                    buffer.clear()
                return
            else:  # _IDLE: bytes nobody asked for
                if buffer:
                    buffer.clear()
                    self.unexpected_bytes = True
                return

    def _end(self, events: list[Event]) -> None:
        self._state = _IDLE
        events.append(_END)
        if self._buffer:  # more than the response: nothing was asked for it
            self._buffer.clear()
            self.unexpected_bytes = True

    def _read_head(self, head: bytes, events: list[Event]) -> None:
        # RFC 9110 5.5: no control byte but HTAB in a field (CR and LF are checked per line). One
        # with it could not be written to the client: a keyed answer was stored, then every
        # answer and replay of it ended in a closed connection (found by the section 6 audit).
        if head.translate(None, _HEAD_BYTES):
            raise _broken("a control byte in the response head")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not _is_status(parts[1]):
            raise _broken("not an HTTP/1.x response")
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            return  # an interim response (100 Continue, 103 Early Hints): the real one follows
        if len(lines) > MAX_HEADER_FIELDS + 1:
            raise _broken(f"more than {MAX_HEADER_FIELDS} header fields")
        headers: RawHeaders = []
        length: bytes | None = None
        codings: list[bytes] = []  # Transfer-Encoding, over all its lines
        keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b"\r" in line or b"\n" in line:
                raise _broken("malformed response header")
            value = value.strip(b" \t")
            lower = name.lower()
            if lower == b"content-length" and length is not None:
                if value != length:
                    raise _broken("conflicting Content-Length headers")
                continue  # the same length again: relayed once (RFC 9110 8.6)
            headers.append((name, value))
            if lower == b"content-length":
                length = value
            elif lower == b"transfer-encoding":
                codings.extend(c.strip(b" \t").lower() for c in value.split(b",") if c.strip())
            elif lower == b"connection":
                tokens = {token.strip().lower() for token in value.split(b",")}
                keep_alive = (keep_alive and b"close" not in tokens) or b"keep-alive" in tokens
        if codings and length is not None:
            raise _broken("both Transfer-Encoding and Content-Length")
        # Only chunked is read and re-framed; a body still gzip-coded after it (`gzip, chunked`)
        # would reach the client with nothing saying so.
        if codings and codings != [b"chunked"]:
            raise _broken("a transfer coding other than chunked")
        chunked = bool(codings)
        if self._head_request or status in (101, 204, 304):
            self._remaining = 0
            self._state = _LENGTH
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if not length.isdigit():
                raise _broken("invalid Content-Length")
            self._remaining = int(length)
            self._state = _LENGTH
        else:
            self._state = _UNTIL_CLOSE
            keep_alive = False  # the body ends with the connection
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        events.append(Head(status, reason, headers, keep_alive and status != 101))


def _is_status(text: bytes) -> bool:
    return len(text) == 3 and text.isdigit() and text[:1] != b"0"


def _chunk_size(line: bytes) -> int | None:
    digits = line.split(b";", 1)[0].strip(b" \t")
    if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
        return None
    return int(digits, 16)
