"""Talking to the upstream: one ClientSession per process, hop-by-hop stripping, streaming.

Three ways through:

- ``stream``: pass-through. Request and response bodies flow chunk by chunk; nothing is buffered.
- ``exchange``: keyed requests. The request body is already in memory (it was fingerprinted);
  the response is read up to the storable limit, and the caller streams the rest if it is larger.
- ``websocket``: an upgrade is relayed frame by frame.

Nothing here retries: an unsafe request is sent to the upstream at most once per call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from idemproxy.config import UpstreamConfig
from idemproxy.engine import UpstreamFailureKind
from idemproxy.errors import ProblemError
from idemproxy.responses import VerbatimStreamResponse

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_CHUNK = 64 * 1024


class UpstreamFailure(Exception):
    """The upstream gave no answer. ``kind`` says whether the request may have run."""

    def __init__(self, kind: UpstreamFailureKind, detail: str) -> None:
        self.kind: UpstreamFailureKind = kind
        super().__init__(detail)


def _hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    names = set(HOP_BY_HOP)
    for value in headers.getall("Connection", ()):
        names.update(token.strip().lower() for token in value.split(","))
    return names


def end_to_end(raw_headers: tuple[tuple[bytes, bytes], ...]) -> list[tuple[str, str]]:
    """Response headers in their order, duplicates kept, hop-by-hop ones dropped."""
    pairs = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw_headers]
    dropped = set(HOP_BY_HOP)
    for name, value in pairs:
        if name.lower() == "connection":
            dropped.update(token.strip().lower() for token in value.split(","))
    return [(name, value) for name, value in pairs if name.lower() not in dropped]


@dataclass(slots=True)
class Exchange:
    """An upstream answer to a keyed request.

    ``pending`` is None when ``body`` is the whole body; otherwise the response was larger than
    may be stored and the rest is still to be read from ``pending`` and streamed.
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    pending: aiohttp.ClientResponse | None


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.base = config.url
        self._session: aiohttp.ClientSession | None = None
        self._keyed_timeout = aiohttp.ClientTimeout(
            total=config.timeout, connect=config.connect_timeout
        )
        # Pass-through may stream for long: bound the silence between reads, not the whole.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_read=config.timeout
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes go back exactly as the upstream sent them
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    def url(self, request: web.BaseRequest) -> URL:
        return URL(self.base + request.raw_path, encoded=True)

    def request_headers(self, request: web.BaseRequest, drop_length: bool) -> CIMultiDict[str]:
        dropped = _hop_by_hop(request.headers)
        if drop_length:
            dropped.add("content-length")
        headers = CIMultiDict(
            (name, value) for name, value in request.headers.items() if name.lower() not in dropped
        )
        peer = request.remote or ""
        prior = request.headers.getall("X-Forwarded-For", ())
        headers.popall("X-Forwarded-For", None)
        headers["X-Forwarded-For"] = ", ".join([*prior, peer]) if prior else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        if request.host:
            headers.setdefault("X-Forwarded-Host", request.host)
        return headers

    async def exchange(self, request: web.BaseRequest, body: bytes, max_body: int) -> Exchange:
        """Send a keyed request once and read its answer up to ``max_body`` bytes."""
        try:
            response = await self.session.request(
                request.method,
                self.url(request),
                headers=self.request_headers(request, drop_length=True),
                data=body if body or request.body_exists else None,
                allow_redirects=False,
                timeout=self._keyed_timeout,
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamFailure("connect", f"connecting timed out: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamFailure("connect", f"cannot connect: {exc}") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamFailure("timeout", "no answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailure("broken", f"{type(exc).__name__}: {exc}") from exc
        chunks: list[bytes] = []
        size = 0
        pending = None
        try:
            async for chunk in response.content.iter_chunked(_CHUNK):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_body:
                    pending = response  # too large to keep: the caller streams the rest
                    break
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            response.close()
            raise UpstreamFailure("timeout", "the response did not finish in time") from exc
        except aiohttp.ClientError as exc:
            response.close()
            raise UpstreamFailure("broken", f"the response broke off: {exc}") from exc
        if pending is None:
            response.release()
        return Exchange(
            response.status,
            response.reason or "",
            end_to_end(response.raw_headers),
            b"".join(chunks),
            pending,
        )

    async def current_etag(self, request: web.BaseRequest) -> tuple[int, str | None]:
        """GET the resource a write is about: its status and ETag (``etag_from_get``)."""
        headers = self.request_headers(request, drop_length=True)
        for name in (hdrs.IF_MATCH, hdrs.IF_NONE_MATCH, hdrs.CONTENT_TYPE, hdrs.CONTENT_ENCODING):
            headers.popall(name, None)
        try:
            async with self.session.get(
                self.url(request),
                headers=headers,
                allow_redirects=False,
                timeout=self._keyed_timeout,
            ) as response:
                await response.read()
                return response.status, response.headers.get(hdrs.ETAG)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamFailure("connect", f"the GET for the ETag failed: {exc}") from exc

    async def stream(
        self, request: web.BaseRequest, body: bytes | None = None
    ) -> web.StreamResponse:
        """Pass a request through, streaming both ways. ``body``: already read from the client."""
        has_body = body is not None or request.body_exists
        chunked_in = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        data: object = body if body is not None else (request.content if has_body else None)
        try:
            upstream = await self.session.request(
                request.method,
                self.url(request),
                headers=self.request_headers(request, drop_length=body is not None or chunked_in),
                data=data,
                allow_redirects=False,
                timeout=self._stream_timeout,
                chunked=True if chunked_in and body is None else None,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            timed_out = isinstance(exc, TimeoutError) and not isinstance(
                exc, aiohttp.ConnectionTimeoutError
            )
            code = "upstream_timeout" if timed_out else "upstream_unavailable"
            return ProblemError(code, "the upstream did not answer").response()
        try:
            response = VerbatimStreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in end_to_end(upstream.raw_headers):
                response.headers.add(name, value)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()

    async def websocket(self, request: web.BaseRequest) -> web.StreamResponse:
        """Relay a WebSocket: connect upstream first, then accept the client and pump frames."""
        offered = [
            p.strip()
            for value in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in value.split(",")
            if p.strip()
        ]
        headers = self.request_headers(request, drop_length=True)
        for name in list(headers):
            if name.lower().startswith("sec-websocket-"):
                headers.popall(name, None)
        try:
            upstream = await self.session.ws_connect(
                self.url(request),
                headers=headers,
                protocols=offered,
                timeout=aiohttp.ClientWSTimeout(ws_close=10.0),
                autoping=False,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            return ProblemError("upstream_unavailable", f"websocket: {exc}").response()
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
