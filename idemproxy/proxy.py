"""The request handler: the async shell around ``engine``.

It gathers facts (route, key, fingerprint, the store's record), asks ``engine`` what they mean,
and does the waiting: on the client, the store and the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import HttpVersion10, HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from idemproxy import engine
from idemproxy.answers import (
    body_left_unread,
    buffered,
    problem_answer,
    relay_exchange,
    relay_websocket,
    replay,
    send_continue,
)
from idemproxy.engine import FORWARD_UNPROTECTED, Refuse
from idemproxy.errors import (
    AnswerCutShort,
    ClientGone,
    ProblemError,
    StoreUnavailable,
    UpstreamFailure,
)
from idemproxy.keys import derived_key, extract_key, fingerprint, store_key
from idemproxy.observability import Metrics, Trace, event
from idemproxy.policy import Policy
from idemproxy.problems import Outcome
from idemproxy.records import StoredResponse, unusual_reason
from idemproxy.settings import Concurrency, Limits, RoutePolicy
from idemproxy.store import NotReplicated, Store
from idemproxy.tracing import NOOP, Span, Tracer
from idemproxy.upstream import Exchange, Upstream, arrived_body

log = logging.getLogger("idemproxy")

# Lease tokens only need to be unique (they fence holders; they guard no secret): a random
# per-process prefix and a counter, far cheaper than fresh random bytes per request.
_TOKEN_PREFIX = secrets.token_hex(8)
_tokens = (f"{_TOKEN_PREFIX}-{n}" for n in itertools.count())
_FIRST_POLL = 0.01
_MAX_SETTLING = 10_000  # settlements retried in the background at once, per process
_LAST_SETTLE_TIMEOUT = 2.0  # shutdown: the last try of all pending settlements together
_MAX_POLL = 0.2
# Seconds between tries of a lease's renewal or settlement while the store fails: a store that
# comes back with less than this left of the lease finds it expired.
_STORE_RETRY = 0.25
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before its answer


class _Lease(msgspec.Struct, frozen=True):
    """One keyed request's claim on its store key (a Struct: immutable, and made far faster
    than a frozen dataclass, once per keyed request)."""

    route: RoutePolicy
    key: str  # the scoped store key
    fingerprint: str
    token: str
    ttl: float  # how long the completed record is kept
    concurrency: Concurrency
    trace: Trace


class _Renewals:
    """Keeps leases alive while their upstream calls run: each is renewed every ``lock_ttl / 3``.

    Most upstream calls end long before their first renewal is due, so a lease costs two dict
    operations, not a timer of its own: the leases of one ``lock_ttl`` wait in the order they
    fall due (their start order), one timer waits for the first of them, and a renewing task is
    created only for a lease still held when its renewal falls due.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        # Per lock_ttl: token -> (when its first renewal is due, on the loop's clock; the lease)
        self._waiting: dict[float, dict[str, tuple[float, _Lease]]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}  # per lock_ttl, while one is armed
        self._renewing: dict[str, asyncio.Task[None]] = {}  # by token

    def start(self, lease: _Lease) -> None:
        loop = asyncio.get_running_loop()
        lock_ttl = lease.route.lock_ttl
        due = loop.time() + lock_ttl / 3
        waiting = self._waiting.get(lock_ttl)
        if waiting is None:
            waiting = self._waiting[lock_ttl] = {}
        waiting[lease.token] = (due, lease)
        if lock_ttl not in self._timers:
            self._timers[lock_ttl] = loop.call_at(due, self._fall_due, lock_ttl)

    def stop(self, lease: _Lease) -> asyncio.Task[None] | None:
        """The lease's renewing task, cancelled, if its renewals had started: await it."""
        if self._waiting[lease.route.lock_ttl].pop(lease.token, None) is not None:
            return None
        task = self._renewing.pop(lease.token, None)
        if task is not None:
            task.cancel()
        return task

    def _fall_due(self, lock_ttl: float) -> None:
        del self._timers[lock_ttl]
        loop = asyncio.get_running_loop()
        waiting = self._waiting[lock_ttl]
        while waiting:
            token = next(iter(waiting))
            due, lease = waiting[token]
            if due > loop.time():
                self._timers[lock_ttl] = loop.call_at(due, self._fall_due, lock_ttl)
                return
            del waiting[token]
            self._renewing[token] = loop.create_task(self._renew(lease), name="lease-renewal")

    async def _renew(self, lease: _Lease) -> None:
        """Renew every ``lock_ttl / 3``; after a failure, again within ``_STORE_RETRY``: a store
        back from an outage may have little of the lease left (one warning per outage)."""
        lock_ttl = lease.route.lock_ttl
        failing = False
        while True:
            delay = lock_ttl / 3
            try:
                if not await self._store.renew(lease.key, lease.token, lock_ttl):
                    event(
                        "lease lost while the upstream call was running",
                        logging.WARNING,
                        key_hash=lease.trace.key_hash,
                    )
                    return
                failing = False
            except StoreUnavailable as exc:
                if not failing:
                    event("could not renew a lease", logging.WARNING, error=str(exc))
                failing = True
                delay = min(delay, _STORE_RETRY)
            await asyncio.sleep(delay)


class KeyedProxy:
    """Everything one request needs: the policy, the store and the upstream."""

    def __init__(
        self,
        policy: Policy[RoutePolicy],
        store: Store,
        upstream: Upstream,
        key_prefix: str,
        fail_open: bool,
        metrics: Metrics,
        limits: Limits,
        tracer: Tracer = NOOP,
    ) -> None:
        self.policy = policy
        self.store = store
        self.upstream = upstream
        self.key_prefix = key_prefix
        self.fail_open = fail_open
        self.metrics = metrics
        self.limits = limits
        self.tracer = tracer
        # Settlements retried in the background, with what each one is to settle.
        self._settling: dict[asyncio.Task[None], tuple[_Lease, StoredResponse | None, bool]] = {}
        self._keyed_in_flight = 0
        # The tasks answering a request now: cancelled when shutdown_timeout runs out.
        self._handling: set[asyncio.Task[object]] = set()
        # Settlements of keyed requests cancelled mid-exchange: awaited before the store closes.
        self._cut_off: set[asyncio.Task[web.StreamResponse]] = set()
        self._renewals = _Renewals(store)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        trace = Trace(request.method, request.path, time.monotonic())
        span = self.tracer.request(request, trace)
        status = CLIENT_CLOSED_REQUEST  # cancelled: the client went away before its answer
        task: asyncio.Task[object] = request.task  # the handler task aiohttp runs this in
        self._handling.add(task)
        try:
            try:
                response = await self._dispatch(request, trace)
            except ProblemError as problem:
                if problem.outcome is not None:
                    trace.outcome = problem.outcome
                response = problem_answer(problem)
                if (
                    body_left_unread(request)
                    or request.method == hdrs.METH_CONNECT
                    or problem.code == "malformed_request"
                ):
                    # Bytes after it are a body the proxy did not read, a tunnel's data, or
                    # framed in a way the proxy does not follow.
                    response.force_close()
            if request.transport is None and not response.prepared:
                # The client went away while its answer was made: nobody will read it.
                raise ClientGone("the client went away before its answer", answered=True)
            status = response.status
            return response
        except ClientGone as gone:
            status = CLIENT_CLOSED_REQUEST
            if not gone.answered:
                trace.outcome = Outcome.CLIENT_GONE
            if request.transport is not None:
                request.transport.close()
            # Nobody is left to read it: aiohttp's attempt to send it ends quietly.
            return web.Response(status=CLIENT_CLOSED_REQUEST)
        except AnswerCutShort as cut:
            status = cut.status
            if cut.side == "upstream":
                trace.outcome = Outcome.UPSTREAM_ERROR
            event(
                "answer cut short",
                logging.WARNING,
                side=cut.side,
                error=str(cut),
                route=trace.route,
                key_hash=trace.key_hash,
            )
            raise  # aiohttp closes the connection: the client sees the answer end early
        except Exception:
            status = 500
            log.exception("unexpected error while handling a request")
            raise
        finally:
            self._handling.discard(task)
            trace.finish(self.metrics, status)
            span.finish(trace, status)

    def cancel_in_flight(self) -> None:
        """``shutdown_timeout`` ran out: cancel every request still being answered. A keyed one
        whose request may have been sent is settled like any ambiguous failure (``drain``
        waits for that before the store closes)."""
        if self._handling:
            event(
                "shutdown_timeout reached: cancelling the requests still in flight",
                logging.WARNING,
                requests=len(self._handling),
            )
        for task in list(self._handling):
            task.cancel()

    def refused(self, method: str, path: str, problem: ProblemError) -> None:
        """A request the HTTP edge refused before ``handle`` saw it (the parser refused it, or
        its head did not arrive in time): its access line."""
        trace = Trace(method, path, time.monotonic())
        if problem.outcome is not None:
            trace.outcome = problem.outcome
        event("request refused at the HTTP edge", logging.INFO, error=problem.detail)
        trace.finish(self.metrics, problem.status)

    async def _dispatch(self, request: web.BaseRequest, trace: Trace) -> web.StreamResponse:
        _refuse_unclear_framing(request)
        if not request.raw_path.startswith("/") or request.method == hdrs.METH_CONNECT:
            # A reverse proxy forwards origin-form targets only (no "http://host/x", "*", CONNECT).
            raise ProblemError("invalid_request_target", "the request target must be a path")
        # The policy is read once: a reload (SIGHUP) swaps it, and this request keeps its route.
        route = self.policy.match(request.method, request.path, request.raw_path)
        if route is None:
            return await self._passthrough(request, trace)
        trace.route = route.label
        trace.route_path = route.path
        refusal = engine.preconditions(route, request.method, hdrs.IF_MATCH in request.headers)
        if refusal is not None:
            raise refusal.error()
        if not route.keyed:
            await self._check_etag(request, route)
            return await self._passthrough(request, trace)
        refusal = engine.admit(self._keyed_in_flight, self.limits.max_in_flight)
        if refusal is not None:
            raise refusal.error()
        self._keyed_in_flight += 1
        try:
            return await self._keyed(request, route, trace)
        finally:
            self._keyed_in_flight -= 1

    async def _passthrough(
        self, request: web.BaseRequest, trace: Trace, body: bytes | None = None
    ) -> web.StreamResponse:
        try:
            if body is None and _is_websocket(request):
                upgraded = await self.upstream.open_websocket(request)
                if isinstance(upgraded, Exchange):  # the upstream refused the upgrade
                    return await relay_exchange(request, upgraded)
                return await relay_websocket(request, upgraded)
            if body is None:
                await send_continue(request)
            started = time.monotonic()
            try:
                exchange = await self.upstream.stream(request, body)
            finally:
                self.metrics.upstream_timer(trace.route).observe(time.monotonic() - started)
        except UpstreamFailure as failure:
            refused = request.content.exception()
            if body is None and isinstance(refused, ProblemError):
                raise refused from None  # the parser refused the rest of its body (server.py)
            if body is None and _client_went_away(request):
                raise ClientGone(str(failure)) from None  # its body broke off, not the upstream
            event(
                "upstream failure",
                logging.WARNING,
                kind=failure.kind,
                error=str(failure),
                route=trace.route,
            )
            raise engine.on_passthrough_failure(failure).error() from None
        return await relay_exchange(request, exchange)

    async def _check_etag(self, request: web.BaseRequest, route: RoutePolicy) -> None:
        """``etag_from_get``: 412 unless If-Match names the resource's current ETag."""
        if_match = request.headers.get(hdrs.IF_MATCH)
        if if_match is None or not engine.checks_etag(route, request.method, if_match):
            return
        try:
            status, etag = await self.upstream.current_etag(request)
        except UpstreamFailure as failure:
            event("upstream failure", logging.WARNING, kind=failure.kind, error=str(failure))
            raise engine.on_passthrough_failure(failure).error() from failure
        _refuse_if(engine.on_current_etag(if_match, status, etag))

    async def _read_body(self, request: web.BaseRequest, route: RoutePolicy) -> bytes:
        """A keyed request's body, bounded in size and in time (a slow client holds memory)."""
        if request.content.is_eof():  # already all here (the usual small body): no timer needed
            return await _read_bounded(request, route.max_request_body)
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                return await _read_bounded(request, route.max_request_body)
        except TimeoutError:
            raise ProblemError(
                "request_timeout",
                f"the request body did not arrive within {self.limits.body_timeout:g}s",
            ) from None

    async def _keyed(
        self, request: web.BaseRequest, route: RoutePolicy, trace: Trace
    ) -> web.StreamResponse:
        body = None
        if route.key.source == "body":
            body = await self._read_body(request, route)
        header_lines = _header_lines(request)
        found = extract_key(route.key, header_lines, _query_values(request), body or b"")
        use = engine.on_key(route, found)
        if use == FORWARD_UNPROTECTED:
            await self._check_etag(request, route)
            return await self._passthrough(request, trace, body)
        if isinstance(use, Refuse):
            raise use.error()
        if body is None:
            body = _arrived_body(request, route.max_request_body)
        if body is None:
            body = await self._read_body(request, route)
        print_ = fingerprint(
            route.fingerprint,
            request.method,
            request.path,
            request.query_string,
            header_lines,
            body,
        )
        scope_values = [request.headers.get(h, "") for h in route.scope_headers]
        key = derived_key(print_) if use.client_key is None else use.client_key
        scoped = store_key(self.key_prefix, scope_values, key)
        trace.key_hash = scoped.removeprefix(self.key_prefix)
        lease = _Lease(
            route=route,
            key=scoped,
            fingerprint=print_,
            token=next(_tokens),
            ttl=use.ttl,
            concurrency=use.concurrency,
            trace=trace,
        )
        try:
            answer = await self._claim(lease)
        except StoreUnavailable as exc:
            # The acquire may have run with its reply lost: release our token once the store
            # is back, or a lease nobody holds would refuse retries until lock_ttl.
            if exc.maybe_applied:
                self._settle_in_background(lease, None, release=True, maybe_held=True)
            return await self._store_down(request, trace, body, exc)
        if answer is not None:
            return answer
        return await self._forward_holding_lease(request, lease, body)

    async def _claim(self, lease: _Lease) -> web.StreamResponse | None:
        """Take the lease (None), or answer from the record someone else made."""
        # time.monotonic, not the loop's clock through get_running_loop (cheaper per request)
        deadline = time.monotonic() + lease.route.wait_timeout
        delay = _FIRST_POLL
        waiting: Span | None = None  # the wait's span, from its first poll on
        try:
            while True:
                existing = await self.store.acquire(
                    lease.key, lease.fingerprint, lease.token, lease.route.lock_ttl
                )
                if existing is None:
                    return None
                # Until the deadline itself: the last sleep is cut short to end there, and one
                # last look at the record follows it (a holder that finishes in time is seen).
                left = deadline - time.monotonic()
                verdict = engine.on_existing(
                    existing, lease.fingerprint, lease.concurrency, may_wait=left > 0
                )
                if isinstance(verdict, Refuse):
                    raise verdict.error()
                if verdict == "replay":
                    assert existing.response is not None
                    lease.trace.outcome = Outcome.REPLAYED
                    return replay(existing.response, lease.route.replay_status)
                if waiting is None:
                    waiting = self.tracer.start_span("wait")
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, _MAX_POLL)
        finally:
            if waiting is not None:
                waiting.end()

    async def _store_down(
        self, request: web.BaseRequest, trace: Trace, body: bytes, exc: StoreUnavailable
    ) -> web.StreamResponse:
        decision = engine.on_store_down(self.fail_open)
        if isinstance(decision, Refuse):
            event("store unavailable, refusing a keyed request", logging.WARNING, error=str(exc))
            raise decision.error()
        event("store unavailable, forwarding unprotected", logging.WARNING, error=str(exc))
        self.metrics.fail_open.inc()
        response = await self._passthrough(request, trace, body)
        trace.outcome = Outcome.STORE_ERROR
        return response

    async def _forward_holding_lease(
        self, request: web.BaseRequest, lease: _Lease, body: bytes
    ) -> web.StreamResponse:
        self.metrics.locks_in_flight.inc()
        try:
            if lease.route.etag_from_get:  # else no coroutine to make: nothing to check
                try:
                    await self._check_etag(request, lease.route)
                except ProblemError:
                    await self._settle(lease, None, release=True)  # nothing ran
                    raise
            self._renewals.start(lease)
            started = time.monotonic()
            try:
                exchange = await self.upstream.exchange(
                    request, body, lease.route.max_stored_response
                )
            except UpstreamFailure as failure:
                return await self._failed(lease, failure)
            except asyncio.CancelledError:
                # Shutdown or a lost client while the request may have been sent: the outcome
                # is unknown, so it is settled like any other ambiguous failure.
                cancelled = UpstreamFailure("broken", "cancelled while waiting for upstream")
                settlement = asyncio.ensure_future(self._failed(lease, cancelled))
                self._cut_off.add(settlement)
                settlement.add_done_callback(self._cut_off.discard)
                await asyncio.shield(settlement)
                raise
            finally:
                elapsed = time.monotonic() - started
                self.metrics.upstream_timer(lease.route.label).observe(elapsed)
                renewing = self._renewals.stop(lease)
                if renewing is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await renewing
            release = engine.after_response(lease.route, exchange.status) == "release"
            lease.trace.outcome = Outcome.RELEASED if release else Outcome.NEW
            if exchange.pending is not None:
                # Too large to keep: streamed, and remembered as not replayable, unless its
                # status releases the key (a large 503 page is still "try again").
                await self._settle(lease, None, release=release)
                return await relay_exchange(request, exchange)
            reason = unusual_reason(exchange.status, exchange.reason)
            stored = StoredResponse(exchange.status, exchange.headers, exchange.body, reason)
            await self._settle(lease, stored, release=release)
            return buffered(exchange.status, exchange.headers, exchange.body, reason)
        finally:
            self.metrics.locks_in_flight.dec()

    async def _failed(self, lease: _Lease, failure: UpstreamFailure) -> web.StreamResponse:
        refusal, disposition = engine.after_failure(lease.route, failure)
        problem = refusal.error()
        lease.trace.outcome = Outcome.UPSTREAM_ERROR
        event(
            "upstream failure",
            logging.WARNING,
            kind=failure.kind,
            error=str(failure),
            route=lease.route.label,
            key_hash=lease.trace.key_hash,
            settled="stored" if disposition == "store" else "released",
        )
        stored = StoredResponse(problem.status, problem.headers(), problem.body())
        await self._settle(lease, stored, release=disposition == "release")
        return problem_answer(problem)

    async def _settle(self, lease: _Lease, response: StoredResponse | None, release: bool) -> None:
        """Release the lease, or complete it with ``response`` (None: not replayable).

        The client gets its answer regardless. When the store is down at this moment, the
        settlement is retried in the background for as long as the lease lasts: a record lost
        to a short store outage would let a retry run the request a second time.
        """
        try:
            settled = await self._settle_once(lease, response, release)
        except NotReplicated as exc:
            # Recorded on the master, not yet on enough replicas: answered all the same.
            self.metrics.store_unreplicated.inc()
            event(
                "completion not acknowledged by the replicas; retrying in the background",
                logging.WARNING,
                error=str(exc),
                key_hash=lease.trace.key_hash,
            )
            self._settle_in_background(lease, response, release)
            return
        except StoreUnavailable as exc:
            event(
                "store unavailable when settling a lease; retrying in the background",
                logging.WARNING,
                error=str(exc),
                key_hash=lease.trace.key_hash,
            )
            self._settle_in_background(lease, response, release)
            return
        if not settled:
            self._lease_lost(lease)

    def _settle_in_background(
        self,
        lease: _Lease,
        response: StoredResponse | None,
        release: bool,
        maybe_held: bool = False,
    ) -> None:
        """``maybe_held``: we do not know whether we hold the lease at all (an acquire whose
        reply was lost), so not finding it is no news. Bounded: past _MAX_SETTLING pending
        settlements, a lease is left to expire on its own."""
        if len(self._settling) >= _MAX_SETTLING:
            return
        task = asyncio.create_task(
            self._settle_later(lease, response, release, maybe_held), name="settle-retry"
        )
        self._settling[task] = (lease, response, release)
        task.add_done_callback(lambda done: self._settling.pop(done, None))

    def _settle_once(
        self, lease: _Lease, response: StoredResponse | None, release: bool
    ) -> Awaitable[bool]:
        """The store call that settles ``lease`` (to await), with no coroutine of its own."""
        if release:
            return self.store.release(lease.key, lease.token)
        return self.store.complete(lease.key, lease.token, response, lease.ttl)

    async def _settle_later(
        self, lease: _Lease, response: StoredResponse | None, release: bool, maybe_held: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lease.route.lock_ttl
        delay = _FIRST_POLL * 10
        # A lease we may not hold (one per request refused while the store hangs, up to
        # _MAX_SETTLING) is only in the way of retries: a slower pace costs less CPU then.
        longest = 1.0 if maybe_held else _STORE_RETRY
        while loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
            try:
                settled = await self._settle_once(lease, response, release)
            except StoreUnavailable:
                continue
            if settled:
                event("lease settled after the store came back", key_hash=lease.trace.key_hash)
            elif not maybe_held and not release:
                # A completion retried is recognised (COMPLETE answers 1 to its own token), so
                # a refusal means the lease is gone. A release is not: the try that timed out
                # may have released it, and a key released either way is what was asked.
                self._lease_lost(lease)
            return
        if maybe_held:
            return
        event(
            "store still unavailable; the lease expires after lock_ttl",
            logging.WARNING,
            key_hash=lease.trace.key_hash,
        )

    async def drain(self) -> None:
        """On shutdown, before the store closes: the settlements of requests cut off at the
        deadline finish, then one last try for each settlement still being retried, then give
        up (those leases expire after lock_ttl). Bounded by two store timeouts in all."""
        if self._cut_off:
            await asyncio.wait(set(self._cut_off), timeout=_LAST_SETTLE_TIMEOUT)
        pending = dict(self._settling)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        try:
            async with asyncio.timeout(_LAST_SETTLE_TIMEOUT):
                for lease, response, release in pending.values():
                    with contextlib.suppress(StoreUnavailable):
                        await self._settle_once(lease, response, release)
        except TimeoutError:
            event("store unavailable at shutdown; leases left expire after lock_ttl")

    def _lease_lost(self, lease: _Lease) -> None:
        self.metrics.leases_lost.inc()
        event(
            "lease lost before the response could be recorded",
            logging.WARNING,
            key_hash=lease.trace.key_hash,
        )


def _refuse_if(refusal: Refuse | None) -> None:
    if refusal is not None:
        raise refusal.error()


def _refuse_unclear_framing(request: web.BaseRequest) -> None:
    """What aiohttp's parser lets through but the proxy cannot forward as the client meant it
    (RFC 9112): a version other than HTTP/1.0 and 1.1 (it takes "HTTP/2.0" and "HTTP/0.9"
    request lines); a transfer coding other than chunked (the parser decodes only chunked, so
    ``gzip, chunked`` would reach the upstream still gzip-coded with nothing saying so; 6.1
    lets a server refuse codings it does not understand); and any Transfer-Encoding in an
    HTTP/1.0 request, whose framing 6.1 says to treat as faulty."""
    version = request.version
    if version != HttpVersion11 and version != HttpVersion10:
        raise ProblemError("malformed_request", "the request is not HTTP/1.0 or HTTP/1.1")
    codings = request.headers.get(hdrs.TRANSFER_ENCODING)
    if codings is None:
        return
    if version == HttpVersion10:
        raise ProblemError("malformed_request", "an HTTP/1.0 request has Transfer-Encoding")
    if [coding.strip(" \t").lower() for coding in codings.split(",")] != ["chunked"]:
        raise ProblemError("malformed_request", "a transfer coding other than chunked")


def _header_lines(request: web.BaseRequest) -> Callable[[str], list[str]]:
    return lambda name: request.headers.getall(name, [])


def _query_values(request: web.BaseRequest) -> Callable[[str], list[str]]:
    """Every value of a query parameter; the query is parsed only when one is asked for."""
    return lambda name: request.query.getall(name, [])


def _is_websocket(request: web.BaseRequest) -> bool:
    """A WebSocket opening handshake: a GET (RFC 6455 4.1). aiohttp's client opens the
    upstream end with a GET, so any other method asking to upgrade is forwarded as itself."""
    return (
        request.method == hdrs.METH_GET
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


def _arrived_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The body if all of it is here already (the usual small body), else None (read it with
    ``_read_bounded``). Taken in one call: no coroutine, no read to await and no 100 Continue
    to send (send_continue sends none once the body has ended)."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    if not request.body_exists:
        return b""
    body = arrived_body(request)
    if body is not None and len(body) > limit:
        raise _too_large(limit)
    return body


async def _read_bounded(request: web.BaseRequest, limit: int) -> bytes:
    arrived = _arrived_body(request, limit)
    if arrived is not None:
        return arrived
    await send_continue(request)
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except (ConnectionError, HttpProcessingError) as exc:
        # A reset, or a client that closed its end short of Content-Length (the parser's
        # ContentLengthError): the request never became whole.
        raise ClientGone(str(exc) or type(exc).__name__) from exc
    return b"".join(chunks)


def _client_went_away(request: web.BaseRequest) -> bool:
    """Whether the client's end failed: its body stream broke, or its connection is closing."""
    transport = request.transport
    return request.content.exception() is not None or transport is None or transport.is_closing()


def _too_large(limit: int) -> ProblemError:
    return ProblemError("request_too_large", f"the request body is larger than {limit} bytes")
