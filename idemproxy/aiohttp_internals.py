"""Every private attribute of aiohttp that idemproxy reads or overrides, in one place.

aiohttp has no public hook for three things a proxy needs: knowing when a request head has been
parsed (the slowloris deadline in ``server.py``), sending a response without the
``Content-Type`` and ``Server`` headers aiohttp fills in, and sending header bytes over 0x7F as
they came. All reach into aiohttp's internals;
this module is the only one that does, and gives each internal a name that says what it means.
``tests/unit/test_aiohttp_internals.py`` checks those meanings against the installed aiohttp, and
pyproject.toml caps aiohttp at the minor release that test last passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import aiohttp
from aiohttp import HttpVersion10, HttpVersion11, hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.connector import Connection
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

_FILLED_IN = (hdrs.CONTENT_TYPE, hdrs.SERVER)


class InspectableRequestHandler(RequestHandler):
    """aiohttp's connection handler, with the parts of its state the proxy reads named."""

    __slots__ = ()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    # How many request heads the parser has returned on this connection so far. The slot itself
    # under a second name, not a property: server.py reads it twice for every segment received,
    # body segments included, and a slot read is no Python call.
    heads_parsed: int = RequestHandler.__dict__["_request_count"]

    @property
    def newest_request_body(self) -> StreamReader:
        """The body of the request whose head was parsed last (queued, not yet handled)."""
        return self._messages[-1][1]

    @property
    def newest_refusal(self) -> BaseException | None:
        """The parser's error when the newest queued message is its refusal, else None. aiohttp
        queues a refusal (with no body) when its parser fails, also mid-way through a body whose
        head it returned earlier: that body then never ends."""
        if not self._messages:
            return None
        message = self._messages[-1][0]
        return message.exc if isinstance(message, _ErrInfo) else None

    def stop_lingering(self) -> None:
        """Read nothing more of the current request's body once it is answered (aiohttp's
        lingering read would raise the body's error): the connection closes instead."""
        self._lingering_time = 0.0

    @property
    def awaiting_request(self) -> bool:
        """Whether the handler task is idle, waiting for the next request head."""
        return self._waiter is not None

    @property
    def carries_frames(self) -> bool:
        """Whether the connection left HTTP: a WebSocket's frames or an upgraded protocol."""
        return self._payload_parser is not None or self._upgraded

    @property
    def closing(self) -> bool:
        """Whether the connection is already set to close (after the current answer or now)."""
        return self._force_close or self._close

    @contextlib.contextmanager
    def parsing_through_shutdown(self) -> Iterator[None]:
        """Within this, ``data_received`` parses what arrives although ``shutdown`` began.

        aiohttp's runner sets every connection to close (``Server.pre_shutdown``, then
        ``shutdown``) before it waits for the request in flight, and ``data_received`` drops
        every byte while ``_close`` or ``_force_close`` is set: the rest of a body still
        arriving never reached its handler, which could only wait for the drain deadline.
        """
        closing = (self._close, self._force_close)
        self._close = self._force_close = False
        try:
            yield
        finally:
            self._close |= closing[0]
            self._force_close |= closing[1]


def server_loop(server: web.Server) -> asyncio.AbstractEventLoop:
    return server._loop


def handler_options(server: web.Server) -> dict[str, Any]:
    """The keyword options ``web.Server`` hands to every ``RequestHandler`` it makes."""
    return server._kwargs


class VerbatimStreamResponse(web.StreamResponse):
    """A response that carries the upstream's headers as they were.

    aiohttp fills in ``Content-Type: application/octet-stream`` and its own ``Server`` when a
    response lacks them (in ``_prepare_headers``); a proxy must not, so those are taken out
    again when they were added.
    """

    async def _prepare_headers(self) -> None:
        request = self._req
        if (
            request is not None
            and request.version < HttpVersion11
            and self.content_length is None
            and not self._must_be_empty_body
        ):
            # An HTTP/1.0 client's body without a length ends with the connection. aiohttp
            # writes it so but leaves a keep-alive connection open: the client never sees the
            # end, or reads the next answer as part of this body.
            self.force_close()
        added = [name for name in _FILLED_IN if name not in self.headers]
        await super()._prepare_headers()
        for name in added:
            self.headers.popall(name, None)

    async def _write_headers(self) -> None:
        """The head as the upstream sent it, bytes over 0x7F included.

        The proxy holds the upstream's header bytes as latin-1 text, one character per byte
        (``upstream.end_to_end``); aiohttp writes header text as UTF-8, which would send
        ``caf\\xe9`` as ``caf\\xc3\\xa9`` and a UTF-8 cookie value encoded twice. A head with
        such a byte is written as latin-1 instead; the usual all-ASCII head is left to aiohttp.
        """
        request, writer = self._req, self._payload_writer
        assert request is not None
        assert isinstance(writer, StreamWriter)
        version = request.version
        if version != HttpVersion10:  # HTTP/1.1, or the 400 to a "HTTP/2.0" request line
            version = HttpVersion11
        status_line = f"HTTP/{version[0]}.{version[1]} {self._status} {self._reason}"
        # aiohttp's serialisation (UTF-8) first: its checks (no CR or LF) and its hook run. Its
        # bytes are ASCII exactly when the text is: the usual head is checked in one C call
        # (checking the text instead cost ~6k instructions a response).
        await writer.write_headers(status_line, self._headers)
        if writer._headers_buf is not None and not writer._headers_buf.isascii():
            lines = [status_line, *(f"{n}: {v}" for n, v in self._headers.items()), "", ""]
            # Text of the proxy's own beyond latin-1 (none is known) stays UTF-8.
            with contextlib.suppress(UnicodeEncodeError):
                replace_serialised_head(writer, "\r\n".join(lines).encode("latin-1"))
        if self._send_headers_immediately:
            writer.send_headers()


class VerbatimResponse(VerbatimStreamResponse, web.Response):
    """The buffered twin of ``VerbatimStreamResponse`` (same headers rule, body given whole)."""


class VerbatimClientRequest(aiohttp.ClientRequest):
    """aiohttp's client request, sending the client's header bytes as they came.

    ``Upstream.request_headers`` holds them as UTF-8 text with the bytes that are not UTF-8 as
    surrogates (``surrogateescape``); aiohttp writes header text as UTF-8 and silently drops
    surrogates, so ``X-Name: caf\\xe9`` reached the upstream as ``X-Name: caf``. A head with
    such a character is written again from the same text, surrogates back to their bytes, before
    the first body bytes send it (aiohttp holds the head until then, ``write_bytes``).
    """

    async def write_bytes(
        self, writer: AbstractStreamWriter, conn: Connection, content_length: int | None = None
    ) -> None:
        headers = self.headers
        if not ("".join(headers.values()).isascii() and "".join(headers.keys()).isascii()):
            assert isinstance(writer, StreamWriter)
            assert writer._headers_buf is not None
            status_line = writer._headers_buf.partition(b"\r\n")[0]  # ASCII: method and target
            lines = (f"{name}: {value}" for name, value in headers.items())
            fields = "\r\n".join(lines).encode("utf-8", "surrogateescape")
            replace_serialised_head(writer, status_line + b"\r\n" + fields + b"\r\n\r\n")
        await super().write_bytes(writer, conn, content_length)


def replace_serialised_head(writer: AbstractStreamWriter, head: bytes) -> None:
    """Have ``writer`` send ``head`` instead of the head its ``write_headers`` serialised (it
    keeps that until the first write or ``send_headers``)."""
    assert isinstance(writer, StreamWriter)
    assert writer._headers_buf is not None, "the head was already sent"
    writer._headers_buf = head
