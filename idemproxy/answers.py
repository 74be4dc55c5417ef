"""The client side: everything the proxy writes back to its client.

``upstream`` talks to the upstream and hands back an ``Exchange`` (or raises
``UpstreamFailure``); ``proxy`` decides; this module turns the result into the client's answer:
an upstream answer relayed as it arrives, a buffered answer, a replay of a stored one, a
problem+json of the proxy's own, or a WebSocket relayed frame by frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable

import aiohttp
from aiohttp import hdrs, web

from idemproxy.aiohttp_internals import VerbatimResponse, VerbatimStreamResponse
from idemproxy.errors import AnswerCutShort, ClientGone, ProblemError, UpstreamFailure
from idemproxy.records import StoredResponse
from idemproxy.upstream import Exchange

REPLAYED_HEADER = ("Idempotent-Replayed", "true")
_REPLAYED_NAME = REPLAYED_HEADER[0].lower()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CONTINUED = web.RequestKey("continued", bool)  # the 100 was sent


def expects_continue(request: web.BaseRequest) -> bool:
    """Whether the client waits for ``100 Continue`` before it sends its body."""
    expect = request.headers.get(hdrs.EXPECT)
    return (
        expect is not None
        and expect.lower() == "100-continue"
        and request.version >= (1, 1)
        and request.body_exists
    )


async def send_continue(request: web.BaseRequest) -> None:
    """Tell a client that waits (``Expect: 100-continue``) to send its body, once, right before
    the proxy reads it (RFC 9110 10.1.1). The upstream never sees ``Expect``: the proxy answers
    it, so no client waits on its own fallback timer or on ``body_timeout``."""
    if expects_continue(request) and not request.content.is_eof() and _CONTINUED not in request:
        request[_CONTINUED] = True
        await request.writer.write(_CONTINUE)


def body_left_unread(request: web.BaseRequest) -> bool:
    """A client told to wait for 100 that got a final answer instead, or whose body the parser
    refused mid-way: the connection closes after it, so the body it may still send is not read
    as the next request."""
    return (expects_continue(request) and _CONTINUED not in request) or isinstance(
        request.content.exception(), ProblemError
    )


def problem_answer(problem: ProblemError) -> web.Response:
    # Verbatim, so that a stored problem replays with exactly the headers it first had.
    response = VerbatimResponse(status=problem.status, body=problem.body())
    for name, value in problem.headers():
        response.headers[name] = value
    return response


def buffered(
    status: int, headers: list[tuple[str, str]], body: bytes, reason: str = ""
) -> web.Response:
    """A whole answer; ``reason`` empty: the standard phrase of ``status``."""
    return _whole(status, reason or None, headers, body)


def _whole(
    status: int, reason: str | None, headers: list[tuple[str, str]], body: bytes
) -> web.Response:
    """A whole answer with ``reason`` as given (None: the standard phrase). The headers are
    handed over whole: aiohttp builds its multidict from the list in one call (in order, with
    duplicates), not one ``add`` per header."""
    return VerbatimResponse(status=status, reason=reason, headers=headers, body=body)


def replay(stored: StoredResponse, status_for_created: int | None = None) -> web.Response:
    """The stored answer plus ``Idempotent-Replayed``; a 201 may be re-labelled (``replay``).

    An ``Idempotent-Replayed`` the upstream itself sent is left out: the client reads one, ours.
    """
    status, reason = stored.status, stored.reason
    if status == 201 and status_for_created is not None:
        status, reason = status_for_created, ""
    # Only a name of its length can be it (lower() keeps the length of any name that can), so
    # the other names are not lowered: this runs for every header of every replay.
    size = len(_REPLAYED_NAME)
    headers = [
        pair for pair in stored.headers if len(pair[0]) != size or pair[0].lower() != _REPLAYED_NAME
    ]
    headers.append(REPLAYED_HEADER)
    return buffered(status, headers, stored.body, reason)


async def relay(
    request: web.BaseRequest,
    status: int,
    reason: str,
    headers: list[tuple[str, str]],
    first: bytes,
    rest: AsyncIterable[bytes] | None,
) -> web.StreamResponse:
    """Send an upstream answer as it arrives: ``first``, then whatever ``rest`` brings."""
    response = VerbatimStreamResponse(status=status, reason=reason)
    for name, value in headers:
        response.headers.add(name, value)
    try:
        await response.prepare(request)
    except ConnectionError as exc:  # gone while the upstream was slow to start: nothing sent
        raise ClientGone(str(exc) or type(exc).__name__, answered=True) from exc
    try:
        if first:
            await response.write(first)
        if rest is not None:
            async for chunk in rest:
                await response.write(chunk)
        await response.write_eof()
    except UpstreamFailure as exc:
        raise AnswerCutShort(status, "upstream", str(exc) or type(exc).__name__) from exc
    except ConnectionError as exc:
        raise AnswerCutShort(status, "client", str(exc) or type(exc).__name__) from exc
    return response


async def relay_exchange(request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
    """Send an exchange's answer as it arrives, then let go of its upstream connection. One that
    came whole with its Content-Length (the usual small answer) goes out in one write."""
    if exchange.pending is None and request.method != "HEAD" and _framed_by_length(exchange):
        # The reason phrase as the upstream sent it, an empty one included (as relay does).
        return _whole(exchange.status, exchange.reason, exchange.headers, exchange.body)
    try:
        return await relay(
            request,
            exchange.status,
            exchange.reason,
            exchange.headers,
            exchange.body,
            exchange.pending,
        )
    finally:
        if exchange.pending is not None:
            exchange.pending.close()


def _framed_by_length(exchange: Exchange) -> bool:
    """Whether the answer says it is exactly its body's length (a chunked one, relayed as it
    came, stays chunked; a bodiless status keeps the framing aiohttp gives it)."""
    if exchange.status < 200 or exchange.status in (204, 304):
        return False
    lengths = [value for name, value in exchange.headers if name.lower() == "content-length"]
    return lengths == [str(len(exchange.body))]


async def relay_websocket(
    request: web.BaseRequest, upstream: aiohttp.ClientWebSocketResponse
) -> web.StreamResponse:
    """Accept the client's upgrade with the protocol the upstream chose, then pump frames both
    ways until either side closes."""
    client = web.WebSocketResponse(
        protocols=[upstream.protocol] if upstream.protocol else (), autoping=False
    )
    await client.prepare(request)

    async def pump(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == aiohttp.WSMsgType.PING:
                await sink.ping(message.data)
            elif message.type == aiohttp.WSMsgType.PONG:
                await sink.pong(message.data)
        await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)

    tasks = [
        asyncio.create_task(pump(client, upstream), name="ws-client-to-upstream"),
        asyncio.create_task(pump(upstream, client), name="ws-upstream-to-client"),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()
        await client.close()
    return client
