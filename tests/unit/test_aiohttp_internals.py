"""Canary: the aiohttp internals idemproxy reads still mean what idemproxy/aiohttp_internals.py
says they mean. A new aiohttp release that changes one fails here, by name, instead of
silently breaking the slowloris deadline or the verbatim headers.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from idemproxy.aiohttp_internals import (
    InspectableRequestHandler,
    VerbatimResponse,
    VerbatimStreamResponse,
    handler_options,
    server_loop,
)


@dataclass
class Seen:
    """What the handler's named internals said after each chunk of bytes it was fed."""

    heads_parsed: list[int] = field(default_factory=list)
    body_complete: list[bool] = field(default_factory=list)
    awaiting_request: list[bool] = field(default_factory=list)
    carries_frames: list[bool] = field(default_factory=list)
    closing: list[bool] = field(default_factory=list)


class RecordingHandler(InspectableRequestHandler):
    """Reads the internals the way server.py does: the newest body right after its head."""

    __slots__ = ("newest_body", "seen")

    def __init__(self, manager: web.Server, seen: Seen, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.seen = seen
        self.newest_body: StreamReader | None = None

    def data_received(self, data: bytes) -> None:
        heads_before = self.heads_parsed
        super().data_received(data)
        if self.heads_parsed != heads_before:
            self.newest_body = self.newest_request_body
        self.seen.heads_parsed.append(self.heads_parsed)
        if self.newest_body is not None:
            self.seen.body_complete.append(self.newest_body.is_eof())
        self.seen.awaiting_request.append(self.awaiting_request)
        self.seen.carries_frames.append(self.carries_frames)
        self.seen.closing.append(self.closing)


class RecordingServer(web.Server):
    def __init__(self, handler: Any, seen: Seen) -> None:
        super().__init__(handler)
        self.seen = seen

    def __call__(self) -> RequestHandler:
        return RecordingHandler(self, self.seen, loop=server_loop(self), **handler_options(self))


@dataclass
class Running:
    port: int
    seen: Seen
    release: asyncio.Event


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    seen = Seen()
    release = asyncio.Event()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for _ in ws:
                await ws.send_str("pong")
            return ws
        await request.read()
        await release.wait()
        return web.Response(text="ok")

    server = RecordingServer(handle, seen)
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield Running(port, seen, release)
    finally:
        listener.close()
        await server.shutdown(1)
        await listener.wait_closed()


async def poll(condition: Any, what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_the_installed_aiohttp_is_within_the_tested_cap() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if d.startswith("aiohttp"))
    cap = re.search(r"<(\d+)\.(\d+)", spec)
    assert cap, f"aiohttp has no upper bound in pyproject.toml: {spec}"
    installed = tuple(int(part) for part in aiohttp.__version__.split(".")[:2])
    assert installed < (int(cap[1]), int(cap[2])), (aiohttp.__version__, spec)


def test_every_internal_named_exists_on_the_installed_aiohttp() -> None:
    slots = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
    for name in ("_request_count", "_messages", "_waiter", "_payload_parser", "_force_close"):
        assert name in slots, f"aiohttp's RequestHandler no longer has {name}"
    assert "_close" in slots
    assert "_lingering_time" in slots
    # server.py marks its connections as draining here, before aiohttp sets them to close.
    assert callable(getattr(web.Server, "pre_shutdown", None))
    # A refusal queued as a message carries the parser's error (newest_refusal).
    refused = ValueError("refused")
    assert _ErrInfo(status=400, exc=refused, message="m").exc is refused
    assert callable(getattr(web.StreamResponse, "_prepare_headers", None))
    assert callable(getattr(web.StreamResponse, "_write_headers", None))
    assert isinstance(web.StreamResponse._send_headers_immediately, bool)
    # VerbatimStreamResponse._write_headers reads the status line and headers from these.
    made = web.StreamResponse(status=201, reason="Made")
    assert (made._status, made._reason, made._headers) == (201, "Made", made.headers)
    # VerbatimClientRequest: the client sends its head from write_bytes' first write.
    parameters = list(inspect.signature(aiohttp.ClientRequest.write_bytes).parameters)
    assert parameters[:3] == ["self", "writer", "conn"], parameters


async def test_heads_bodies_and_the_idle_wait_mean_what_server_py_relies_on(
    running: Running,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        await poll(lambda: running.seen.heads_parsed, "the first chunk was fed")
        # The head is parsed as soon as it is complete; its body is not complete yet.
        assert running.seen.heads_parsed[-1] == 1
        assert running.seen.body_complete[-1] is False
        writer.write(b"cd")
        await poll(lambda: running.seen.body_complete[-1], "the body completes with its last byte")
        assert running.seen.heads_parsed[-1] == 1
        # The handler is busy answering: not waiting for a request head.
        assert running.seen.awaiting_request[-1] is False
        # A pipelined second request while the first is still being answered.
        writer.write(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await poll(lambda: running.seen.heads_parsed[-1] == 2, "the second head is parsed")
        assert running.seen.awaiting_request[-1] is False
        assert running.seen.carries_frames == [False] * len(running.seen.carries_frames)
        running.release.set()
        answers = await asyncio.wait_for(reader.read(), 10)
        assert answers.count(b"HTTP/1.1 200") == 2
    finally:
        writer.close()


async def test_an_idle_connection_awaits_a_request_and_a_close_request_is_closing(
    running: Running,
) -> None:
    running.release.set()
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"ok")
        # Between requests the handler task waits for the next head.
        writer.write(b"G")
        await poll(lambda: running.seen.heads_parsed[-1:] == [1], "a byte of the next head")
        assert running.seen.awaiting_request[-1] is True
        assert running.seen.closing[-1] is False
        writer.write(b"ET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_a_websocket_connection_carries_frames(running: Running) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{running.port}/ws") as ws,
    ):
        await ws.send_str("ping")
        assert (await ws.receive()).data == "pong"
    assert running.seen.carries_frames[-1] is True


@pytest.mark.parametrize("response_class", [VerbatimResponse, VerbatimStreamResponse])
async def test_verbatim_responses_add_no_content_type_or_server(
    response_class: type[web.StreamResponse],
) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        # A value held as latin-1 text (one character per byte, as upstream.end_to_end makes it).
        response = response_class(status=201, headers={"X-Upstream": "1", "X-Legacy": "caf\xe9"})
        await response.prepare(request)
        await response.write(b"body")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        answer = (await asyncio.wait_for(reader.read(), 10)).lower()
        writer.close()
    finally:
        await runner.cleanup()
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"http/1.1 201")
    assert b"x-upstream: 1" in head
    assert b"x-legacy: caf\xe9\r\n" in head  # the byte as it came, not UTF-8 (c3 a9)
    assert b"content-type" not in head
    assert b"\r\nserver:" not in head
