"""The decision table of SPEC section 4, whole, as pure functions. No I/O, no awaits.

The async shell (``proxy``) gathers the facts - the route, the request's method and headers,
the key or why there is none, the record the store holds, what the upstream answered - and asks
these functions what to do. Each answer is a decision: go on (forward, replay, wait, store,
release) or ``Refuse`` with a problem code of the catalogue in ``problems``.

The rows, in the order a keyed request meets them::

    admit            max_in_flight reached               -> 503 proxy_overloaded
    preconditions    require_if_match, no If-Match       -> 428 precondition_required
    on_key           key invalid                         -> 400 idempotency_key_invalid
                     key absent, from: fingerprint       -> derive it (window, derived_concurrency)
                     key absent, required                -> 400 idempotency_key_missing
                     key absent, optional                -> forward unprotected
    on_store_down    fail_closed / fail_open             -> 503 store_unavailable / forward
    on_existing      other fingerprint                   -> 422 idempotency_key_reused
                     in flight: reject, or wait spent    -> 409 request_in_progress
                     in flight: wait                     -> wait
                     completed, not replayable           -> 409 response_not_replayable
                     completed                           -> replay
    on_current_etag  If-Match not the current ETag       -> 412 precondition_failed
    after_response   status in release_statuses          -> release, else store
    after_failure    connect / timeout / broken          -> 502 / 504, release or store
    on_passthrough_failure                               -> 502 / 504
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from idemproxy.errors import ProblemError, UpstreamFailure
from idemproxy.keys import KeyProblem, if_match_allows
from idemproxy.records import IN_FLIGHT, UNREPLAYABLE, Record
from idemproxy.settings import Concurrency, RoutePolicy

WRITE_METHODS = frozenset({"PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class Refuse:
    """The proxy answers the request itself with the problem ``code``."""

    code: str
    detail: str
    retry_after: int | None = None

    def error(self) -> ProblemError:
        return ProblemError(self.code, self.detail, self.retry_after)


FORWARD_UNPROTECTED: Literal["forward_unprotected"] = "forward_unprotected"
ForwardUnprotected = Literal["forward_unprotected"]


class UseKey(msgspec.Struct, frozen=True):
    """Protect the request under ``client_key`` (None: derive it from the fingerprint), with
    the record kept for ``ttl`` seconds and duplicates in flight handled by ``concurrency``.
    A Struct, not a dataclass: one is made per keyed request, and a Struct is made in a quarter
    of the time."""

    client_key: str | None
    ttl: float
    concurrency: Concurrency


def admit(keyed_in_flight: int, max_in_flight: int) -> Refuse | None:
    if keyed_in_flight >= max_in_flight:
        return Refuse("proxy_overloaded", "too many keyed requests in progress; retry shortly", 1)
    return None


def preconditions(route: RoutePolicy, method: str, has_if_match: bool) -> Refuse | None:
    """``require_if_match``: a write that names no ETag is refused before anything else.
    It concerns PUT, PATCH and DELETE: a POST that creates has no ETag to name."""
    if route.require_if_match and method in WRITE_METHODS and not has_if_match:
        return Refuse("precondition_required", "send If-Match with the ETag you last read")
    return None


def checks_etag(route: RoutePolicy, method: str, if_match: str | None) -> bool:
    """Whether the resource's current ETag must be fetched (``etag_from_get``, writes only)."""
    return route.etag_from_get and method in WRITE_METHODS and if_match is not None


def on_current_etag(if_match: str, status: int, etag: str | None) -> Refuse | None:
    """The GET for the current ETag answered ``status``: go on (None), or refuse the write."""
    if status >= 500:
        return Refuse("upstream_unavailable", f"the GET for the ETag answered {status}")
    if not if_match_allows(if_match, 200 <= status <= 299, etag):
        return Refuse("precondition_failed", "If-Match does not match the resource's current ETag")
    return None


def on_key(route: RoutePolicy, found: str | KeyProblem) -> UseKey | Refuse | ForwardUnprotected:
    """What the key the request carries (or why it has none) means on a keyed route."""
    if isinstance(found, str):
        return UseKey(found, route.ttl, route.concurrency)
    if found.kind == "invalid":
        return Refuse("idempotency_key_invalid", found.detail)
    if route.key.source == "fingerprint":
        return UseKey(None, route.key.window, route.derived_concurrency)
    if route.key.required:
        return Refuse("idempotency_key_missing", found.detail)
    return FORWARD_UNPROTECTED


def on_store_down(fail_open: bool) -> Refuse | ForwardUnprotected:
    if fail_open:
        return FORWARD_UNPROTECTED
    return Refuse("store_unavailable", "the idempotency store is unavailable", 1)


def on_existing(
    existing: Record, fingerprint: str, concurrency: Concurrency, may_wait: bool
) -> Refuse | Literal["replay", "wait"]:
    """Someone else's record for the same scoped key. ``may_wait``: time is left to poll."""
    # A different request under the same key is a reuse whatever state the first one is in.
    if existing.fingerprint != fingerprint:
        return Refuse(
            "idempotency_key_reused",
            "this idempotency key was already used for a different request",
        )
    if existing.state == IN_FLIGHT:
        if concurrency == "wait" and may_wait:
            return "wait"
        return Refuse(
            "request_in_progress",
            "a request with this idempotency key is still being processed",
            retry_after=1,
        )
    if existing.state == UNREPLAYABLE or existing.response is None:
        return Refuse(
            "response_not_replayable",
            "the request ran, but its response was too large to keep for replay",
        )
    return "replay"


Disposition = Literal["store", "release"]


def after_response(route: RoutePolicy, status: int) -> Disposition:
    """An upstream answer: keep it for replay, unless the status says "try again"."""
    return "release" if status in route.release_statuses else "store"


def after_failure(route: RoutePolicy, failure: UpstreamFailure) -> tuple[Refuse, Disposition]:
    """No upstream answer to a keyed request: the problem to send, and whether to keep it for
    replay. ``connect``: nothing was sent, so a retry is safe. ``timeout`` / ``broken``: the
    request may have run; ``ambiguous: store`` keeps this answer (at most once), ``release``
    lets a retry run."""
    refusal = on_passthrough_failure(failure)
    return refusal, "release" if failure.kind == "connect" else route.ambiguous


_FAILURE_DETAIL = {
    "connect": "the upstream could not be reached",
    "timeout": "the upstream did not answer in time",
    "broken": "the upstream's answer was malformed or broke off",
}


def on_passthrough_failure(failure: UpstreamFailure) -> Refuse:
    """No upstream answer: 504 when it went silent, 502 when it refused or broke off. The
    detail says which, and no more: what exactly failed is for the log, not the client."""
    code = "upstream_timeout" if failure.kind == "timeout" else "upstream_unavailable"
    return Refuse(code, _FAILURE_DETAIL[failure.kind])
