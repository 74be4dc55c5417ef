"""The request handler: the async shell around ``engine``.

It gathers facts (route, key, fingerprint, the store's record), asks ``engine`` what they mean,
and does the waiting: on the client, the store and the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import web

from idemproxy import engine
from idemproxy.config import RoutePolicy
from idemproxy.engine import Existing
from idemproxy.errors import ProblemError, StoreUnavailable
from idemproxy.keys import KeyProblem, extract_key, fingerprint, store_key
from idemproxy.policy import Policy
from idemproxy.records import StoredResponse
from idemproxy.store import Store
from idemproxy.upstream import (
    Exchange,
    Upstream,
    UpstreamFailure,
    VerbatimResponse,
    VerbatimStreamResponse,
)

log = logging.getLogger("idemproxy")

REPLAYED_HEADER = ("Idempotent-Replayed", "true")
_FIRST_POLL = 0.01
_MAX_POLL = 0.2


class KeyedProxy:
    """Everything one request needs: the policy, the store and the upstream."""

    def __init__(
        self, policy: Policy, store: Store, upstream: Upstream, key_prefix: str, fail_open: bool
    ) -> None:
        self.policy = policy
        self.store = store
        self.upstream = upstream
        self.key_prefix = key_prefix
        self.fail_open = fail_open
        self.in_flight_leases = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        route = self.policy.match(request.method, request.path)
        if route is None or not route.keyed:
            return await self._passthrough(request)
        try:
            return await self._keyed(request, route)
        except ProblemError as problem:
            return problem.response()

    async def _passthrough(
        self, request: web.BaseRequest, body: bytes | None = None
    ) -> web.StreamResponse:
        if body is None and _is_websocket(request):
            return await self.upstream.websocket(request)
        return await self.upstream.stream(request, body)

    async def _keyed(self, request: web.BaseRequest, route: RoutePolicy) -> web.StreamResponse:
        body = b""
        if route.key.source != "body":
            key = extract_key(route.key, request.headers.get, request.query.get, b"")
            if isinstance(key, KeyProblem):
                refusal = engine.on_key_problem(route, key)
                if refusal is None:
                    return await self._passthrough(request)
                raise ProblemError(refusal.code, key.detail)
            body = await _read_body(request, route.max_request_body)
        else:
            body = await _read_body(request, route.max_request_body)
            key = extract_key(route.key, request.headers.get, request.query.get, body)
            if isinstance(key, KeyProblem):
                refusal = engine.on_key_problem(route, key)
                if refusal is None:
                    return await self._passthrough(request, body)
                raise ProblemError(refusal.code, key.detail)

        scoped = store_key(
            self.key_prefix, (request.headers.get(h, "") for h in route.scope_headers), key
        )
        print_ = fingerprint(
            route.fingerprint,
            request.method,
            request.path,
            request.query_string,
            request.headers.getall,
            body,
        )
        token = secrets.token_hex(16)
        try:
            holds = await self._claim(route, scoped, print_, token)
        except StoreUnavailable as exc:
            return await self._store_down(request, body, exc)
        if isinstance(holds, web.StreamResponse):
            return holds
        return await self._forward_holding_lease(request, route, scoped, token, body)

    async def _claim(
        self, route: RoutePolicy, scoped: str, print_: str, token: str
    ) -> web.StreamResponse | None:
        """Take the lease (None), or answer from the record someone else made."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + route.wait_timeout
        delay = _FIRST_POLL
        while True:
            existing = await self.store.acquire(scoped, print_, token, route.lock_ttl)
            if existing is None:
                return None
            verdict = engine.classify(existing, print_)
            if verdict is Existing.REPLAY:
                assert existing.response is not None
                return replay(existing.response)
            if verdict is Existing.MISMATCH:
                raise ProblemError(
                    "idempotency_key_reused",
                    "this idempotency key was already used for a different request",
                )
            if verdict is Existing.NOT_REPLAYABLE:
                raise ProblemError(
                    "response_not_replayable",
                    "the request ran, but its response was too large to keep for replay",
                )
            if route.concurrency == "reject" or loop.time() + delay > deadline:
                raise ProblemError(
                    "request_in_progress",
                    "a request with this idempotency key is still being processed",
                    retry_after=1,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_POLL)

    async def _store_down(
        self, request: web.BaseRequest, body: bytes, exc: StoreUnavailable
    ) -> web.StreamResponse:
        if self.fail_open:
            log.warning("store unavailable, forwarding unprotected (fail_open): %s", exc)
            return await self._passthrough(request, body)
        log.warning("store unavailable, refusing keyed request (fail_closed): %s", exc)
        raise ProblemError("store_unavailable", "the idempotency store is unavailable", 1)

    async def _forward_holding_lease(
        self, request: web.BaseRequest, route: RoutePolicy, scoped: str, token: str, body: bytes
    ) -> web.StreamResponse:
        self.in_flight_leases += 1
        try:
            async with self._renewing(scoped, token, route.lock_ttl):
                try:
                    exchange = await self.upstream.exchange(
                        request, body, route.max_stored_response
                    )
                except UpstreamFailure as failure:
                    return await self._failed(route, scoped, token, failure)
                except asyncio.CancelledError:
                    # Shutdown or a lost client while the request may have been sent: the
                    # outcome is unknown, so it is settled like any other ambiguous failure.
                    cancelled = UpstreamFailure("broken", "cancelled while waiting for upstream")
                    await asyncio.shield(self._failed(route, scoped, token, cancelled))
                    raise
            if not exchange.complete:
                await self._settle(scoped, token, None, route.ttl)
                return await _stream_rest(request, exchange)
            if engine.after_response(route, exchange.status) == "release":
                await self._settle(scoped, token, None, None)
                return _buffered(exchange.status, exchange.headers, exchange.body)
            stored = StoredResponse(exchange.status, exchange.headers, exchange.body)
            await self._settle(scoped, token, stored, route.ttl)
            return _buffered(exchange.status, exchange.headers, exchange.body)
        finally:
            self.in_flight_leases -= 1

    async def _failed(
        self, route: RoutePolicy, scoped: str, token: str, failure: UpstreamFailure
    ) -> web.StreamResponse:
        code, disposition = engine.after_failure(route, failure.kind)
        problem = ProblemError(code, f"upstream: {failure}")
        log.warning("upstream failure (%s): %s", failure.kind, failure)
        if disposition == "store":
            stored = StoredResponse(problem.status, problem.headers(), problem.body())
            await self._settle(scoped, token, stored, route.ttl)
        else:
            await self._settle(scoped, token, None, None)
        return problem.response()

    async def _settle(
        self, scoped: str, token: str, response: StoredResponse | None, ttl: float | None
    ) -> None:
        """Complete (``ttl`` given) or release the lease. The client gets its answer regardless:
        a store error here only means the lease expires on its own after ``lock_ttl``."""
        try:
            if ttl is None:
                settled = await self.store.release(scoped, token)
            else:
                settled = await self.store.complete(scoped, token, response, ttl)
        except StoreUnavailable as exc:
            log.warning("store unavailable when settling a lease: %s", exc)
            return
        if not settled:
            log.warning("lease was lost before the response could be recorded")

    @contextlib.asynccontextmanager
    async def _renewing(self, scoped: str, token: str, lock_ttl: float) -> AsyncIterator[None]:
        """Keep the lease alive while the upstream call runs."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(lock_ttl / 3)
                try:
                    if not await self.store.renew(scoped, token, lock_ttl):
                        log.warning("lease lost while the upstream call was running")
                        return
                except StoreUnavailable as exc:
                    log.warning("could not renew a lease: %s", exc)

        task = asyncio.create_task(renew(), name="lease-renewal")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _is_websocket(request: web.BaseRequest) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if not request.body_exists:
        return b""
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> ProblemError:
    return ProblemError("request_too_large", f"the request body is larger than {limit} bytes")


def _buffered(status: int, headers: list[tuple[str, str]], body: bytes) -> web.Response:
    response = VerbatimResponse(status=status)
    for name, value in headers:
        response.headers.add(name, value)
    response.body = body
    return response


def replay(stored: StoredResponse) -> web.Response:
    response = _buffered(stored.status, stored.headers, stored.body)
    response.headers.add(*REPLAYED_HEADER)
    return response


async def _stream_rest(request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
    """Send a response too large to store: what was read, then the rest as it arrives."""
    assert exchange.pending is not None
    upstream = exchange.pending
    try:
        response = VerbatimStreamResponse(status=exchange.status, reason=exchange.reason)
        for name, value in exchange.headers:
            response.headers.add(name, value)
        await response.prepare(request)
        await response.write(exchange.body)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()
