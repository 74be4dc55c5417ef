"""The proxy's HTTP/1.1 server: aiohttp's, plus a deadline for request heads (slowloris).

aiohttp bounds an idle keep-alive connection (``keepalive_timeout``) and, through the handler,
a slow body, but not a client that trickles the request line and headers. Here a connection
must deliver a complete request head within ``header_timeout`` of being opened, and a later
request's head within ``header_timeout`` of its first byte.

"Head complete" is what aiohttp's parser reports: it returns a message from ``feed_data`` as
soon as the head is parsed (``RequestHandler.data_received`` counts it: ``heads_parsed``).
"A new head started" is a byte arriving while the newest message's body is complete: until
then, bytes are that body, which ``body_timeout`` and aiohttp's lingering read bound. The parser
does not tell how many bytes it holds, so the start of a head that arrives in the same segment
as the end of the previous request is only noticed with the next byte; if none comes, the
connection waits like an idle one and ``idle_timeout`` (aiohttp's keep-alive timer) closes it.

The clock costs almost nothing per request: one ``loop.time()`` when a head starts and an
attribute store when it completes. Like aiohttp's keep-alive timer, one timer handle per
connection is scheduled lazily and, when it fires early, re-armed for the current deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from idemproxy.aiohttp_internals import (
    InspectableRequestHandler,
    handler_options,
    server_loop,
)
from idemproxy.answers import problem_answer
from idemproxy.errors import ProblemError


def request_timeout(header_timeout: float) -> ProblemError:
    """The problem of a request head that did not arrive in time."""
    return ProblemError(
        "request_timeout",
        f"the request line and headers did not arrive within {header_timeout:g}s",
    )


def request_timeout_answer(problem: ProblemError) -> bytes:
    """The whole 408 response of ``problem``, written straight to the transport: there is no
    request for aiohttp to answer."""
    body = problem.body()
    head = "".join(
        [
            "HTTP/1.1 408 Request Timeout\r\n",
            *(f"{name}: {value}\r\n" for name, value in problem.headers()),
            f"Content-Length: {len(body)}\r\n",
            "Connection: close\r\n\r\n",
        ]
    )
    return head.encode("ascii") + body


# A request refused before the proxy's handler saw it: its method and path ("-" where no
# request line arrived whole), and why. It writes the access line.
RefusedCallback = Callable[[str, str, ProblemError], None]


def parser_refusal(exc: BaseException | None) -> ProblemError:
    """The problem for a request aiohttp's parser refused. The detail names the kind of error
    only: aiohttp's own message quotes the offending bytes (an Authorization value, say)."""
    kind = type(exc).__name__ if exc is not None else "BadHttpMessage"
    if isinstance(exc, LineTooLong):
        return ProblemError(
            "request_head_too_large", f"a request line or header is too long ({kind})"
        )
    # aiohttp's parsers (C and Python) say it in this message only (http_parser.py)
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return ProblemError("request_head_too_large", "the request has too many header fields")
    return ProblemError("malformed_request", f"the request is not valid HTTP/1.1 ({kind})")


class HeadTimeoutRequestHandler(InspectableRequestHandler):
    """One client connection; closes it when a request head takes longer than the deadline.

    Its error answers are problem+json too (``handle_error``): aiohttp's plain-text ones echo
    the offending request bytes.
    """

    __slots__ = (
        "_draining",
        "_head_deadline",
        "_head_started",
        "_head_timer",
        "_header_timeout",
        "_newest_body",
        "_on_refused",
        "_timeout",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: float,
        timeout: ProblemError,
        on_refused: RefusedCallback,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._timeout = timeout
        self._on_refused = on_refused
        # When the head being awaited must be complete; None while none is awaited.
        self._head_deadline: float | None = None
        # Whether a byte of that head arrived (a connection opened in silence has none).
        self._head_started = False
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the newest request whose head arrived; once complete, a byte that
        # arrives starts the next head.
        self._newest_body: StreamReader = EMPTY_PAYLOAD
        self._draining = False  # shutdown began: the request in flight may still finish

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._await_head(self.loop.time() + self._header_timeout)

    def data_received(self, data: bytes) -> None:
        if (
            not self._head_started
            and data
            and self._newest_body.is_eof()
            and not self.carries_frames
        ):
            self._head_started = True
            if self._head_deadline is None:  # else: the deadline since the connection opened
                self._await_head(self.loop.time() + self._header_timeout)
        heads_before = self.heads_parsed
        if self._draining and self._body_arriving():
            with self.parsing_through_shutdown():
                super().data_received(data)
        else:
            super().data_received(data)
        if self.heads_parsed != heads_before:
            self._head_deadline = None
            self._head_started = False
            refusal = self.newest_refusal
            if refusal is not None:
                self._refuse_open_body(refusal)
            self._newest_body = self.newest_request_body

    def _body_arriving(self) -> bool:
        """Whether the request in flight still reads from the client: its body is not
        complete, or it is a WebSocket (or another upgrade) whose frames are relayed."""
        return self.carries_frames or self._body_open()

    def _body_open(self) -> bool:
        """Whether the newest request's body is still being read: not ended, not failed (no
        request's body, EMPTY_PAYLOAD, has ended)."""
        body = self._newest_body
        return not body.is_eof() and body.exception() is None

    def begin_draining(self) -> None:
        """The server stops: the body of the request in flight still arrives (SIGTERM lets
        in-flight requests finish, an upload still under way included)."""
        self._draining = True

    def _refuse_open_body(self, refusal: BaseException) -> None:
        """The parser refused bytes inside a body whose head it returned earlier (a malformed
        chunk): aiohttp queues the refusal as a next message and leaves that body open forever.
        The body is failed with the problem instead, so the handler reading it answers 400 (or
        431) and closes the connection; the queued refusal is never served."""
        if not self._body_open():
            return
        self._newest_body.set_exception(parser_refusal(refusal))
        self.stop_lingering()
        self.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request its parser refused (400), or to a handler that raised
        (500: the handler logged it and wrote its access line already)."""
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already under way; the connection is dropped")
        if status == 500:
            problem = ProblemError("internal_error", "the proxy failed to handle this request")
        else:
            problem = parser_refusal(exc)
            self._on_refused(request.method, request.path, problem)
        response = problem_answer(problem)
        response.force_close()
        return response

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._newest_body = EMPTY_PAYLOAD  # it refers back to this handler
        super().connection_lost(exc)

    def _await_head(self, deadline: float) -> None:
        self._head_deadline = deadline
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self.transport is None or self.closing:
            return
        if self.loop.time() < deadline:  # the head awaited now started after the timer did
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)
            return
        self._head_deadline = None
        if not self.awaiting_request:
            # Not waiting for a request: an earlier one is still being answered, and this head
            # was pipelined behind it. Let that answer finish, then close.
            self.close()
            return
        if self._head_started:
            self.transport.write(request_timeout_answer(self._timeout))
            self._on_refused("-", "-", self._timeout)
        # A connection that never sent a byte has no request to answer: an unsolicited 408
        # would be read as the answer to whatever the client sends next.
        self.force_close()


class HeadTimeoutServer(web.Server):
    """``web.Server`` whose connections are ``HeadTimeoutRequestHandler``s."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        header_timeout: float,
        on_refused: RefusedCallback,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout
        self._timeout = request_timeout(header_timeout)
        self._on_refused = on_refused

    def pre_shutdown(self) -> None:
        """aiohttp sets every connection to close here, which drops the bytes that arrive
        after; each is told first that the body of its request in flight still counts."""
        for connection in self.connections:
            if isinstance(connection, HeadTimeoutRequestHandler):
                connection.begin_draining()
        super().pre_shutdown()

    def __call__(self) -> HeadTimeoutRequestHandler:
        return HeadTimeoutRequestHandler(
            self,
            loop=server_loop(self),
            header_timeout=self._header_timeout,
            timeout=self._timeout,
            on_refused=self._on_refused,
            **handler_options(self),
        )
