"""The decision table of SPEC section 4, as pure functions. No I/O, no awaits.

The async shell (``proxy``) gathers the facts - the route, the key or why there is none, the
record the store holds - and asks these functions what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Literal

from idemproxy.config import RoutePolicy
from idemproxy.errors import UpstreamFailureKind
from idemproxy.keys import KeyProblem
from idemproxy.records import IN_FLIGHT, UNREPLAYABLE, Record


class Outcome(StrEnum):
    """What happened to one request; the ``outcome`` label of metrics and logs."""

    PASSTHROUGH = "passthrough"
    NEW = "new"
    REPLAYED = "replayed"
    CONFLICT = "conflict"
    MISMATCH = "mismatch"
    MISSING_KEY = "missing_key"
    INVALID_KEY = "invalid_key"
    TOO_LARGE = "too_large"
    RELEASED = "released"
    STORE_ERROR = "store_error"
    UPSTREAM_ERROR = "upstream_error"
    PRECONDITION = "precondition"  # 428 / 412 of require_if_match and etag_from_get
    OVERLOADED = "overloaded"  # 503: limits.max_in_flight keyed requests already in progress
    CLIENT_TIMEOUT = "client_timeout"  # 408: the body did not arrive within limits.body_timeout
    BAD_REQUEST = "bad_request"  # 400: a request target that is not a path (absolute form, *)


OUTCOME_OF_PROBLEM = {
    "idempotency_key_missing": Outcome.MISSING_KEY,
    "idempotency_key_invalid": Outcome.INVALID_KEY,
    "request_too_large": Outcome.TOO_LARGE,
    "request_in_progress": Outcome.CONFLICT,
    "response_not_replayable": Outcome.CONFLICT,
    "idempotency_key_reused": Outcome.MISMATCH,
    "store_unavailable": Outcome.STORE_ERROR,
    "upstream_unavailable": Outcome.UPSTREAM_ERROR,
    "upstream_timeout": Outcome.UPSTREAM_ERROR,
    "precondition_required": Outcome.PRECONDITION,
    "precondition_failed": Outcome.PRECONDITION,
    "proxy_overloaded": Outcome.OVERLOADED,
    "request_timeout": Outcome.CLIENT_TIMEOUT,
    "invalid_request_target": Outcome.BAD_REQUEST,
}


class Existing(Enum):
    """What to do about a record someone else made for the same scoped key."""

    REPLAY = "replay"
    IN_PROGRESS = "in_progress"
    MISMATCH = "mismatch"
    NOT_REPLAYABLE = "not_replayable"


@dataclass(frozen=True, slots=True)
class Refusal:
    """The proxy answers the request itself: problem ``code`` and the outcome to count."""

    code: str
    outcome: Outcome


def on_key_problem(route: RoutePolicy, problem: KeyProblem) -> Refusal | None:
    """A keyed route without a usable key: refuse, or (None) forward it unprotected."""
    if problem.kind == "invalid":
        return Refusal("idempotency_key_invalid", Outcome.INVALID_KEY)
    if route.key.required:
        return Refusal("idempotency_key_missing", Outcome.MISSING_KEY)
    return None


def classify(existing: Record, fingerprint: str) -> Existing:
    # A different request under the same key is a reuse whatever state the first one is in.
    if existing.fingerprint != fingerprint:
        return Existing.MISMATCH
    if existing.state == IN_FLIGHT:
        return Existing.IN_PROGRESS
    if existing.state == UNREPLAYABLE or existing.response is None:
        return Existing.NOT_REPLAYABLE
    return Existing.REPLAY


Disposition = Literal["store", "release"]


def after_response(route: RoutePolicy, status: int) -> Disposition:
    """An upstream answer: keep it for replay, unless the status says "try again"."""
    return "release" if status in route.release_statuses else "store"


def after_failure(route: RoutePolicy, kind: UpstreamFailureKind) -> tuple[str, Disposition]:
    """No upstream answer: the problem code to send, and whether to keep it for replay.

    ``connect``: nothing was sent, so a retry is safe. ``timeout`` / ``broken``: the request may
    have run; ``ambiguous: store`` keeps this answer (at most once), ``release`` lets a retry run.
    """
    if kind == "connect":
        return "upstream_unavailable", "release"
    code = "upstream_timeout" if kind == "timeout" else "upstream_unavailable"
    return code, route.ambiguous
