"""The problem catalogue: every answer the proxy makes itself, and every outcome it counts.

One table names each problem ``code`` (the stable contract of SPEC section 4) with its HTTP
status, its title and the ``outcome`` a request answered with it is counted under. ``engine``
decides which problem applies, ``errors.ProblemError`` carries it, and the client side renders
it as ``application/problem+json``; none of them maps codes to anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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
    CLIENT_GONE = "client_gone"  # 499: the client went away before its request was complete


@dataclass(frozen=True, slots=True)
class ProblemType:
    status: int
    title: str
    # None for the admin listener's own answers: they are not proxied requests.
    outcome: Outcome | None


PROBLEMS: dict[str, ProblemType] = {
    "idempotency_key_missing": ProblemType(400, "Idempotency key missing", Outcome.MISSING_KEY),
    "idempotency_key_invalid": ProblemType(400, "Idempotency key invalid", Outcome.INVALID_KEY),
    "request_too_large": ProblemType(413, "Request body too large", Outcome.TOO_LARGE),
    "request_in_progress": ProblemType(409, "Request in progress", Outcome.CONFLICT),
    "idempotency_key_reused": ProblemType(422, "Idempotency key reused", Outcome.MISMATCH),
    "response_not_replayable": ProblemType(409, "Response not replayable", Outcome.CONFLICT),
    "upstream_unavailable": ProblemType(502, "Upstream unavailable", Outcome.UPSTREAM_ERROR),
    "upstream_timeout": ProblemType(504, "Upstream timeout", Outcome.UPSTREAM_ERROR),
    "store_unavailable": ProblemType(503, "Store unavailable", Outcome.STORE_ERROR),
    "precondition_required": ProblemType(428, "Precondition required", Outcome.PRECONDITION),
    "precondition_failed": ProblemType(412, "Precondition failed", Outcome.PRECONDITION),
    "request_timeout": ProblemType(408, "Request too slow", Outcome.CLIENT_TIMEOUT),
    "invalid_request_target": ProblemType(400, "Request target not supported", Outcome.BAD_REQUEST),
    "proxy_overloaded": ProblemType(503, "Too many keyed requests in progress", Outcome.OVERLOADED),
    # what the HTTP parser refuses before any handler sees a request (SPEC 5, the HTTP edge)
    "malformed_request": ProblemType(400, "Malformed request", Outcome.BAD_REQUEST),
    "request_head_too_large": ProblemType(
        431, "Request header fields too large", Outcome.BAD_REQUEST
    ),
    # a bug of the proxy's own, answered like every other error (and logged with its traceback)
    "internal_error": ProblemType(500, "Internal error", None),
    "unauthorized": ProblemType(401, "Admin token missing or wrong", None),
    "key_not_found": ProblemType(404, "No record for this key", None),
    "keys_api_disabled": ProblemType(404, "The keys API is disabled", None),
    "not_found": ProblemType(404, "No such admin path", None),
    "method_not_allowed": ProblemType(405, "Method not allowed", None),
}
