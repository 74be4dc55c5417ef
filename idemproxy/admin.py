"""The admin listener, on its own port: health, readiness, metrics, and key inspection.

``/keys`` exists only when an admin token is configured, and every call to it must carry
``Authorization: Bearer <token>``, compared in constant time.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from idemproxy.answers import problem_answer
from idemproxy.errors import ProblemError, StoreUnavailable
from idemproxy.keys import store_key, unquote_sf_string
from idemproxy.observability import event
from idemproxy.records import Record
from idemproxy.redact import redact
from idemproxy.settings import StoreConfig
from idemproxy.store import NotReplicated, Store

READY_TIMEOUT = 2.0


def _one_process() -> tuple[int, int]:
    return 1, 1


def _not_stopping() -> bool:
    return False


@dataclass(frozen=True, slots=True)
class AdminContext:
    store: Store
    exposition: Callable[[], bytes]  # the Prometheus text of this process, or of all workers
    key_prefix: str
    token: str
    # (serving, expected) worker processes; the supervisor of --workers N counts its workers.
    workers: Callable[[], tuple[int, int]] = _one_process
    # True from SIGTERM / SIGINT on: /readyz says 503 so that load balancers stop sending
    # while the in-flight requests drain (the listener no longer accepts).
    stopping: Callable[[], bool] = _not_stopping


ADMIN = web.AppKey("admin", AdminContext)


async def store_problem(store: Store) -> str | None:
    """Why the store does not answer a ping within ``READY_TIMEOUT``, or None when it does."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await store.ping()
    except StoreUnavailable as exc:
        return str(exc)
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT:g} s"
    return None


async def probe_store(store: Store, config: StoreConfig) -> bool:
    """Ask the store once at start (bounded by ``READY_TIMEOUT``); warn when it does not answer.

    A wrong password or an unreachable Redis would otherwise show only at the first keyed
    request. The start goes on: the store may come up later, and /readyz follows it.
    """
    problem = await store_problem(store)
    if problem is not None:
        event(
            "the store does not answer: /readyz answers 503 until it does, and keyed requests "
            + ("pass unprotected" if config.on_error == "fail_open" else "get 503"),
            logging.WARNING,
            store=redact(config.url),
            error=problem,
        )
    return problem is None


def _missing_workers(request: web.Request) -> web.Response | None:
    serving, expected = request.app[ADMIN].workers()
    if serving >= expected:
        return None
    body = {"status": "unavailable", "workers_serving": serving, "workers": expected}
    return web.json_response(body, status=503)


async def healthz(request: web.Request) -> web.Response:
    """200 while the process runs and, under a supervisor, every worker serves."""
    return _missing_workers(request) or web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready only while every worker serves and the store answers (and has
    ``store.wait_replicas`` replicas), so traffic follows the store both ways; not once the
    process is stopping."""
    if request.app[ADMIN].stopping():
        return web.json_response({"status": "stopping"}, status=503)
    missing = _missing_workers(request)
    if missing is not None:
        return missing
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[ADMIN].store.ready()
    except NotReplicated as exc:  # answers, but too few replicas: every new key would get 503
        body = {"status": "unavailable", "store": "replicas", "detail": str(exc)}
        return web.json_response(body, status=503)
    except (StoreUnavailable, TimeoutError):
        return web.json_response({"status": "unavailable", "store": "down"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[ADMIN].exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


def _authorize(request: web.Request) -> None:
    expected = request.app[ADMIN].token
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode("utf-8", "surrogateescape"), expected.encode()
    ):
        raise ProblemError("unauthorized", "send Authorization: Bearer <admin token>")


def _store_keys(request: web.Request) -> list[str]:
    """The keys the proxy may have stored this key under, most likely first: ``scope`` values
    are raw credentials, hashed the same way.

    Without ``scope``, the empty-credential namespace: that of a request without its route's
    scope header (one empty value) and that of a route with ``scope: []`` (no value at all).
    A key in the IETF form ``"abc"`` also names ``abc``, as in the ``Idempotency-Key`` header;
    as given first, since a key from a body or a query parameter is taken as it is.
    """
    prefix, raw = request.app[ADMIN].key_prefix, request.match_info["key"]
    keys = [raw]
    unquoted = unquote_sf_string(raw)
    if unquoted and unquoted != raw:
        keys.append(unquoted)
    given = request.query.getall("scope", [])
    scopes = [given] if given else [[""], []]
    return [store_key(prefix, scope, key) for key in keys for scope in scopes]


async def _find(store: Store, keys: list[str]) -> tuple[str, Record] | None:
    """The first of ``keys`` that has a record, with its record."""
    for key in keys:
        record = await store.get(key)
        if record is not None:
            return key, record
    return None


def _describe(record: Record, key_hash: str, with_body: bool) -> dict[str, object]:
    described: dict[str, object] = {
        "key_hash": key_hash,
        "state": record.state,
        "fingerprint": record.fingerprint,
        "status": record.response.status if record.response is not None else None,
        "created_at": record.created_at,
        "age_seconds": round(max(0.0, time.time() - record.created_at), 3),
        "expires_in_seconds": record.expires_in,
    }
    if with_body and record.response is not None:
        described["headers"] = record.response.headers
        described["body_base64"] = base64.b64encode(record.response.body).decode()
    return described


async def get_key(request: web.Request) -> web.StreamResponse:
    try:
        _authorize(request)
        found = await _find(request.app[ADMIN].store, _store_keys(request))
        if found is None:
            raise ProblemError("key_not_found", "no record for this key and scope")
    except ProblemError as problem:
        return problem_answer(problem)
    except StoreUnavailable:
        return problem_answer(ProblemError("store_unavailable", "the store did not answer", 1))
    key, record = found
    key_hash = key.removeprefix(request.app[ADMIN].key_prefix)
    with_body = request.query.get("body") == "1"
    return web.json_response(_describe(record, key_hash, with_body))


async def delete_key(request: web.Request) -> web.StreamResponse:
    try:
        _authorize(request)
        store = request.app[ADMIN].store
        keys = _store_keys(request)
        if len(keys) > 1:  # the record GET shows
            found = await _find(store, keys)
            keys = [found[0]] if found is not None else []
        if not keys or not await store.delete(keys[0]):
            raise ProblemError("key_not_found", "no record for this key and scope")
    except ProblemError as problem:
        return problem_answer(problem)
    except StoreUnavailable:
        return problem_answer(ProblemError("store_unavailable", "the store did not answer", 1))
    return web.Response(status=204)


@web.middleware
async def problems_for_unrouted(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A path or method the admin listener does not serve is a problem+json answer too, like
    every other answer idemproxy makes itself (aiohttp's own are text/plain)."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as refused:
        answer = problem_answer(
            ProblemError("method_not_allowed", "this path does not serve that method (see Allow)")
        )
        answer.headers["Allow"] = ",".join(sorted(refused.allowed_methods))
        return answer
    except web.HTTPNotFound:
        return problem_answer(ProblemError("not_found", "the admin listener has no such path"))


def create_admin_app(context: AdminContext) -> web.Application:
    app = web.Application(middlewares=[problems_for_unrouted])
    app[ADMIN] = context
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if context.token:
        app.router.add_get("/keys/{key:.+}", get_key)
        app.router.add_delete("/keys/{key:.+}", delete_key)
    else:
        app.router.add_route("*", "/keys/{key:.*}", keys_disabled)
    return app


async def keys_disabled(request: web.Request) -> web.Response:
    return problem_answer(
        ProblemError("keys_api_disabled", "set admin.token to enable the keys API")
    )
