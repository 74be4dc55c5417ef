"""Talking to the upstream: hop-by-hop stripping, forwarding headers, streaming.

Three ways through, each returning what the upstream answered or raising ``UpstreamFailure``
(nothing here writes to the client; ``answers`` does):

- ``stream``: pass-through. The answer is handed over at its head, its body to be streamed
  chunk by chunk; nothing is buffered. It goes through the lean client in ``http1`` unless a
  request body is still to be read from the client, which streams up through aiohttp's client.
- ``exchange``: keyed requests (the lean client). The request body is already in memory (it was
  fingerprinted); the response is read up to the storable limit, and the caller streams the
  rest if it is larger.
- ``open_websocket``: the upstream end of an upgrade (aiohttp).

The two clients keep separate connection pools, each bounded by ``max_connections``.

Nothing here retries: an unsafe request is sent to the upstream at most once per call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Protocol

import aiohttp
from aiohttp import hdrs, web
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from yarl import URL

from idemproxy.aiohttp_internals import VerbatimClientRequest
from idemproxy.errors import UpstreamFailure
from idemproxy.http1 import (
    MAX_HEAD,
    MAX_HEADER_FIELDS,
    Http1Pool,
    RawHeaders,
    serialise_request,
)
from idemproxy.response_parser import has_control_byte
from idemproxy.settings import UpstreamConfig

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when empty
# The largest answer refusing a WebSocket upgrade that is relayed; a larger one is a 502.
_MAX_REFUSAL_BODY = 1 << 20


def _not_forwarded(raw: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Lower-case names a proxy must not pass on: hop-by-hop ones and those named in Connection."""
    names = set(HOP_BY_HOP)
    for name, value in raw:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b","))
    return names


def forwarded_headers(
    request: web.BaseRequest, drop_length: bool, extra_dropped: tuple[bytes, ...] = ()
) -> RawHeaders:
    """The client's headers as sent, without hop-by-hop ones, plus the X-Forwarded-* trio
    (For appended to; Proto and Host kept when the client, e.g. a load balancer, sent them)."""
    raw = request.raw_headers
    lowered = [name.lower() for name, _ in raw]  # once: this runs for every request
    dropped = _not_forwarded(raw) if b"connection" in lowered else set(HOP_BY_HOP)
    dropped.update(extra_dropped)
    if drop_length:
        dropped.add(b"content-length")
    dropped.discard(b"host")  # even when Connection names it: an HTTP/1.1 request needs one
    headers: RawHeaders = []
    prior: list[bytes] = []
    present: set[bytes] = set()
    for lower, pair in zip(lowered, raw, strict=True):
        if lower == b"x-forwarded-for":
            prior.append(pair[1])
        elif lower not in dropped:
            headers.append(pair)
            present.add(lower)
    peer = (request.remote or "").encode()
    headers.append((b"X-Forwarded-For", b", ".join([*prior, peer]) if prior else peer))
    if b"x-forwarded-proto" not in present:
        headers.append((b"X-Forwarded-Proto", request.scheme.encode()))
    host = request.headers.get(hdrs.HOST)
    if host and b"x-forwarded-host" not in present:
        headers.append((b"X-Forwarded-Host", host.encode("utf-8", "surrogateescape")))
    return headers


def end_to_end(raw_headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Response headers in their order, duplicates kept, hop-by-hop ones dropped."""
    pairs = list(raw_headers)
    dropped = _not_forwarded(pairs)
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in pairs
        if name.lower() not in dropped
    ]


class BodyRest(Protocol):
    """The rest of an answer's body, read as the client takes it; ``close`` when done with it.
    A failure of the upstream while it is read is raised as ``UpstreamFailure``."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Exchange:
    """An upstream answer.

    ``pending`` is None when ``body`` is the whole body; otherwise the rest is still to be read
    from ``pending`` and streamed (a keyed answer larger than may be stored, or a pass-through
    answer, handed over at its head).
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    pending: BodyRest | None


class _ClientResponseRest:
    """An aiohttp client response's body as a ``BodyRest``."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamFailure("timeout", "the upstream went silent mid-answer") from exc
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamFailure("broken", describe(exc)) from exc

    def close(self) -> None:
        self._response.release()


def arrived_body(request: web.BaseRequest) -> bytes | None:
    """The request's body if all of it has arrived already (the usual small body: it came with
    its head), taken from aiohttp's buffer without awaiting anything; else None."""
    content = request.content
    if not content.is_eof() or content.exception() is not None:
        return None
    return content.read_nowait()


async def _as_received(content: StreamReader) -> AsyncIterator[bytes]:
    """A request body in the pieces the client's connection delivered them. aiohttp's client,
    given the ``StreamReader`` itself, reads it with ``readany``, which joins every piece
    buffered at that moment into one ``bytes``: a copy of most of a large body."""
    async for chunk, _ in content.iter_chunks():
        if chunk:  # b"" marks the end of a chunk of a chunked body
            yield chunk


# Set by ``open_websocket`` while it connects: where the upstream's answer goes if it refuses
# the upgrade (a 401, a 404 ...), so that the answer is relayed as it came, not as a 502.
_upgrade_refusals: ContextVar[list[Exchange] | None] = ContextVar("upgrade_refusals", default=None)


async def _keep_upgrade_refusal(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestEndParams,
) -> None:
    """An upstream's answer to an upgrade that is not 101, read whole before ``ws_connect``
    discards it (aiohttp has no other way to it: its handshake error keeps status and headers
    only). Runs in the task of ``open_websocket``, for every request of the session."""
    refusals = _upgrade_refusals.get()
    response = params.response
    if refusals is None or response.status == 101:
        return
    body = bytearray()
    try:
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > _MAX_REFUSAL_BODY:
                return
    except (TimeoutError, aiohttp.ClientError):
        return
    headers = end_to_end(response.raw_headers)
    refusals.append(Exchange(response.status, response.reason or "", headers, bytes(body), None))


def _unrelayable(response: aiohttp.ClientResponse) -> str | None:
    """Why an answer aiohttp's client took is refused as the lean client's parser refuses it
    (``response_parser``), or None: every path frames an answer the same way (SPEC 5)."""
    if _head_size(response) > MAX_HEAD:  # aiohttp bounds each field, not the whole head
        return "the response head is too large"
    if not _only_chunked(response.headers.getall(hdrs.TRANSFER_ENCODING, ())):
        return "a transfer coding other than chunked"
    reason = (response.reason or "").encode("utf-8", "surrogateescape")
    if has_control_byte(reason) or any(
        has_control_byte(name) or has_control_byte(value) for name, value in response.raw_headers
    ):  # aiohttp's client takes them; its server would refuse to write them (a 500)
        return "a control byte in the response head"
    return None


def _head_size(response: aiohttp.ClientResponse) -> int:
    """The size of an answer's head as the lean client measures it against ``MAX_HEAD`` (up to
    its blank line), taking each field as ``name:value`` with no space around the value."""
    status_line = len("HTTP/1.1 200 ") + len(response.reason or "")
    return status_line + sum(3 + len(name) + len(value) for name, value in response.raw_headers)


def _only_chunked(transfer_encodings: Iterable[str]) -> bool:
    """Whether an answer's Transfer-Encoding lines name no coding but ``chunked`` (or none):
    aiohttp's client, like the lean one, undoes only that one; a ``gzip`` after it would
    reach the client still coded, with nothing saying so."""
    codings = [c.strip(" \t").lower() for line in transfer_encodings for c in line.split(",")]
    return [coding for coding in codings if coding] in ([], ["chunked"])


def describe(exc: BaseException) -> str:
    """An aiohttp client error for a log line: its kind and the OS's reason, never its message,
    which quotes the upstream URL with its query and the offending bytes of the answer."""
    os_error = getattr(exc, "os_error", None)  # ClientConnectorError's cause
    if isinstance(os_error, OSError) and os_error.strerror:
        return f"{type(exc).__name__}: {os_error.strerror}"
    return type(exc).__name__


def _client_failure(exc: TimeoutError | aiohttp.ClientError) -> UpstreamFailure:
    """An aiohttp client error before any answer, as an ``UpstreamFailure``."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        return UpstreamFailure("connect", describe(exc))
    if isinstance(exc, TimeoutError):
        return UpstreamFailure("timeout", "the upstream did not answer in time")
    return UpstreamFailure("broken", describe(exc))


def _client_session(
    connector: aiohttp.BaseConnector,
    owner: bool = True,
    trace_configs: list[aiohttp.TraceConfig] | None = None,
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        connector_owner=owner,
        auto_decompress=False,  # bytes go back exactly as the upstream sent them
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
        # Heads as large as the lean client takes (aiohttp's defaults are 8 KiB a line and 128
        # fields): an answer is relayed, or refused, the same way on every path.
        max_line_size=MAX_HEAD,
        max_field_size=MAX_HEAD,
        max_headers=MAX_HEADER_FIELDS,
        trace_configs=trace_configs,
        request_class=VerbatimClientRequest,
    )


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.base = config.url
        self._session: aiohttp.ClientSession | None = None
        self._upgrades: aiohttp.ClientSession | None = None
        self._lean = Http1Pool(
            config.url, config.max_connections, config.connect_timeout, config.timeout
        )
        self._keyed_timeout = aiohttp.ClientTimeout(
            total=config.timeout, connect=config.connect_timeout
        )
        # Pass-through may stream for long: bound the silence between reads, not the whole.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=config.connect_timeout, sock_read=config.timeout
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.max_connections, force_close=False)
        self._session = _client_session(connector)
        # WebSocket upgrades get a session of their own on the same connections: the hook that
        # keeps a refused upgrade's answer runs for them only (with any trace hook, aiohttp
        # signals every request's every chunk: +3.6 % instructions on a chunked 1 MiB upload).
        upgrade_refusals = aiohttp.TraceConfig()
        upgrade_refusals.on_request_end.append(_keep_upgrade_refusal)
        self._upgrades = _client_session(connector, owner=False, trace_configs=[upgrade_refusals])

    async def close(self) -> None:
        self._lean.close()
        if self._upgrades is not None:
            await self._upgrades.close()
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Upstream.start() was not awaited"
        return self._session

    def url(self, request: web.BaseRequest) -> URL:
        return URL(self.base + request.raw_path, encoded=True)

    def forwarded(self, request: web.BaseRequest, drop_length: bool) -> RawHeaders:
        """The headers both clients send: ``forwarded_headers`` without ``Expect`` (the proxy
        answers it). Tracing (``idemproxy.otel``) puts its ``traceparent`` in here."""
        return forwarded_headers(request, drop_length, (b"expect",))

    def request_headers(self, request: web.BaseRequest, drop_length: bool) -> CIMultiDict[str]:
        """``forwarded`` for aiohttp's client."""
        return CIMultiDict(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in self.forwarded(request, drop_length)
        )

    def _serialised(self, request: web.BaseRequest, body: bytes) -> bytes:
        """The whole HTTP/1.1 request for the lean client: the client's header bytes as they
        came (minus hop-by-hop and framing headers), a Content-Length, then ``body``."""
        headers = self.forwarded(request, drop_length=True)
        if request.headers.get(hdrs.HOST) is None:
            headers.append((b"Host", self._lean.host_header))
        if body or request.body_exists or request.method in _BODY_METHODS:
            headers.append((b"Content-Length", str(len(body)).encode()))
        target = self._lean.path_prefix + request.raw_path.encode("utf-8", "surrogateescape")
        return serialise_request(request.method.encode(), target, headers, body)

    async def exchange(
        self, request: web.BaseRequest, body: bytes, max_body: int | None
    ) -> Exchange:
        """Send a request once and read its answer up to ``max_body`` bytes (None: hand it over
        at its head, all of the body still to come; see ``Http1Pool.exchange``)."""
        answer = await self._lean.exchange(
            self._serialised(request, body), request.method == "HEAD", max_body
        )
        return Exchange(
            answer.status, answer.reason, end_to_end(answer.headers), answer.body, answer.rest
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
            raise UpstreamFailure(
                "connect", f"the GET for the ETag failed: {describe(exc)}"
            ) from exc

    async def stream(self, request: web.BaseRequest, body: bytes | None = None) -> Exchange:
        """Pass a request through; the answer is handed over at its head, its body still to
        come. ``body``: already read from the client. A body with a Content-Length that has all
        arrived with its head (the usual small POST) is already in aiohttp's buffer: it goes
        through the lean client, in one write. A body still arriving, or a chunked one (SPEC 5
        keeps chunked intact), streams up through aiohttp's client as it comes."""
        if body is None and request.body_exists:
            if request.content_length is not None:
                body = arrived_body(request)
            if body is None:
                return await self._stream_body(request)
        return await self.exchange(request, body or b"", None)

    async def _stream_body(self, request: web.BaseRequest) -> Exchange:
        chunked_in = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        try:
            upstream = await self.session.request(
                request.method,
                self.url(request),
                headers=self.request_headers(request, drop_length=chunked_in),
                data=_as_received(request.content),
                allow_redirects=False,
                timeout=self._stream_timeout,
                chunked=True if chunked_in else None,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _client_failure(exc) from exc
        refusal = _unrelayable(upstream)
        if refusal is not None:
            upstream.close()
            raise UpstreamFailure("broken", refusal)
        return Exchange(
            upstream.status,
            # aiohttp's client decodes the reason as UTF-8 (surrogateescape): back to its bytes,
            # held as latin-1 like every header (end_to_end), so that it is relayed as it came.
            (upstream.reason or "").encode("utf-8", "surrogateescape").decode("latin-1"),
            end_to_end(upstream.raw_headers),
            b"",
            _ClientResponseRest(upstream),
        )

    async def open_websocket(
        self, request: web.BaseRequest
    ) -> aiohttp.ClientWebSocketResponse | Exchange:
        """Connect the upstream end of a WebSocket, offering the client's subprotocols; or the
        upstream's answer when it refuses the upgrade (to relay like any other answer)."""
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
        refusals: list[Exchange] = []
        watching = _upgrade_refusals.set(refusals)
        try:
            assert self._upgrades is not None, "Upstream.start() was not awaited"
            return await self._upgrades.ws_connect(
                self.url(request),
                headers=headers,
                protocols=offered,
                timeout=aiohttp.ClientWSTimeout(ws_close=10.0),
                autoping=False,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if refusals:
                return refusals[0]
            raise UpstreamFailure("connect", f"websocket: {describe(exc)}") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamFailure("connect", f"websocket: {describe(exc)}") from exc
        finally:
            _upgrade_refusals.reset(watching)
