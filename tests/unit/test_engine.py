"""The pure decision functions of idemproxy.engine, one table per SPEC section 4 row group.

No sockets, no store, no upstream: each row is the facts the proxy gathered and the decision
the engine must name (a problem code of the catalogue, or what to do next).
"""

from __future__ import annotations

import dataclasses

import pytest

from idemproxy import engine
from idemproxy.config import BUILTIN_DEFAULTS, FingerprintPolicy, KeyPolicy, RoutePolicy
from idemproxy.engine import FORWARD_UNPROTECTED, Refuse, UseKey
from idemproxy.errors import UpstreamFailure, UpstreamFailureKind
from idemproxy.keys import KeyProblem
from idemproxy.problems import PROBLEMS, Outcome
from idemproxy.records import COMPLETED, IN_FLIGHT, UNREPLAYABLE, Record, StoredResponse

DEFAULT_RELEASE = frozenset({408, 425, 429, 502, 503, 504})


def make_route(
    *,
    required: bool = False,
    release_statuses: frozenset[int] = DEFAULT_RELEASE,
    ambiguous: engine.Disposition = "store",
) -> RoutePolicy:
    return RoutePolicy(
        label="/orders",
        path="/orders",
        methods=frozenset({"POST"}),
        keyed=True,
        key=KeyPolicy(
            source="header",
            header="Idempotency-Key",
            pointer="",
            query_name="",
            required=required,
            window=10.0,
        ),
        ttl=86400.0,
        lock_ttl=30.0,
        concurrency="reject",
        wait_timeout=10.0,
        fingerprint=FingerprintPolicy(
            include=frozenset({"method", "path", "query", "body"}),
            headers=(),
            json_canonical=True,
        ),
        scope_headers=("Authorization",),
        release_statuses=release_statuses,
        ambiguous=ambiguous,
        max_request_body=1 << 20,
        max_stored_response=1 << 20,
    )


ROUTE = make_route()
REQUIRED = make_route(required=True)
RELEASING = make_route(ambiguous="release")
WAITING = dataclasses.replace(ROUTE, concurrency="wait")
DERIVED = dataclasses.replace(ROUTE, key=dataclasses.replace(ROUTE.key, source="fingerprint"))
IF_MATCH = dataclasses.replace(ROUTE, require_if_match=True)
ETAG = dataclasses.replace(ROUTE, etag_from_get=True)


def code_of(decision: object) -> str | None:
    return decision.code if isinstance(decision, Refuse) else None


# --- on_key: the key rows ------------------------------------------------------------------

MISSING = KeyProblem("missing", "send the Idempotency-Key header")
INVALID = KeyProblem("invalid", "the Idempotency-Key header is empty")


@pytest.mark.parametrize(
    ("route", "found", "expected"),
    [
        # key route, key absent, required: 400 idempotency_key_missing
        (REQUIRED, MISSING, Refuse("idempotency_key_missing", MISSING.detail)),
        # key route, key absent, not required: forwarded unprotected
        (ROUTE, MISSING, FORWARD_UNPROTECTED),
        # key malformed: 400 idempotency_key_invalid, required or not, derived or not
        (ROUTE, INVALID, Refuse("idempotency_key_invalid", INVALID.detail)),
        (REQUIRED, INVALID, Refuse("idempotency_key_invalid", INVALID.detail)),
        (DERIVED, INVALID, Refuse("idempotency_key_invalid", INVALID.detail)),
        # a key: protected for ttl, duplicates in flight by the route's concurrency
        (ROUTE, "k1", UseKey("k1", 86400.0, "reject")),
        (WAITING, "k1", UseKey("k1", 86400.0, "wait")),
        # from: fingerprint, no key sent: derived, kept for the window, duplicates wait
        (DERIVED, MISSING, UseKey(None, 10.0, "wait")),
    ],
    ids=[
        "missing-required",
        "missing-optional",
        "invalid-optional",
        "invalid-required",
        "invalid-derived",
        "key",
        "key-wait",
        "derived",
    ],
)
def test_on_key(route: RoutePolicy, found: str | KeyProblem, expected: object) -> None:
    assert engine.on_key(route, found) == expected


# --- on_existing: a record is already there -------------------------------------------------

FP = "fp-same"
OTHER = "fp-other"
RESPONSE = StoredResponse(201, [("Location", "/orders/1")], b"{}")


def record(state: str, fingerprint: str = FP, response: StoredResponse | None = None) -> Record:
    return Record(state, fingerprint, "holder-token", 1_700_000_000.0, response)


@pytest.mark.parametrize(
    ("existing", "fingerprint", "concurrency", "may_wait", "expected"),
    [
        # same key, same fingerprint, completed: the replay
        (record(COMPLETED, response=RESPONSE), FP, "reject", True, "replay"),
        (record(COMPLETED, response=RESPONSE), FP, "wait", False, "replay"),
        # in flight, reject: 409 at once; wait: poll, and 409 once wait_timeout is spent
        (record(IN_FLIGHT), FP, "reject", True, "request_in_progress"),
        (record(IN_FLIGHT), FP, "wait", True, "wait"),
        (record(IN_FLIGHT), FP, "wait", False, "request_in_progress"),
        # ran, but too large to keep (or no response handed over): 409 not replayable
        (record(UNREPLAYABLE), FP, "reject", True, "response_not_replayable"),
        (record(COMPLETED), FP, "reject", True, "response_not_replayable"),
        # other fingerprint: 422 whatever state the first request is in
        (record(COMPLETED, response=RESPONSE), OTHER, "reject", True, "idempotency_key_reused"),
        (record(COMPLETED), OTHER, "reject", True, "idempotency_key_reused"),
        (record(IN_FLIGHT), OTHER, "wait", True, "idempotency_key_reused"),
        (record(UNREPLAYABLE), OTHER, "reject", True, "idempotency_key_reused"),
    ],
    ids=[
        "completed-replay",
        "completed-replay-wait-spent",
        "in-flight-reject",
        "in-flight-wait",
        "in-flight-wait-spent",
        "unreplayable",
        "completed-without-response",
        "mismatch-completed",
        "mismatch-completed-without-response",
        "mismatch-in-flight",
        "mismatch-unreplayable",
    ],
)
def test_on_existing(
    existing: Record, fingerprint: str, concurrency: str, may_wait: bool, expected: str
) -> None:
    decision = engine.on_existing(existing, fingerprint, concurrency, may_wait)  # type: ignore[arg-type]
    assert (code_of(decision) or decision) == expected


def test_a_request_in_progress_says_when_to_retry() -> None:
    decision = engine.on_existing(record(IN_FLIGHT), FP, "reject", True)
    assert isinstance(decision, Refuse)
    assert decision.error().headers() == [
        ("Content-Type", "application/problem+json"),
        ("Retry-After", "1"),
    ]


# --- admission, preconditions, the store being down ----------------------------------------


@pytest.mark.parametrize(
    ("in_flight", "limit", "expected"),
    [(0, 1, None), (9, 10, None), (10, 10, "proxy_overloaded"), (11, 10, "proxy_overloaded")],
)
def test_admit(in_flight: int, limit: int, expected: str | None) -> None:
    assert code_of(engine.admit(in_flight, limit)) == expected


@pytest.mark.parametrize(
    ("route", "method", "has_if_match", "expected"),
    [
        (IF_MATCH, "PUT", False, "precondition_required"),
        (IF_MATCH, "PATCH", False, "precondition_required"),
        (IF_MATCH, "DELETE", False, "precondition_required"),
        (IF_MATCH, "PUT", True, None),
        (ROUTE, "PUT", False, None),
        # SPEC 4: the rule concerns PUT, PATCH and DELETE; a POST that creates names no ETag
        (IF_MATCH, "POST", False, None),
    ],
)
def test_preconditions(
    route: RoutePolicy, method: str, has_if_match: bool, expected: str | None
) -> None:
    assert code_of(engine.preconditions(route, method, has_if_match)) == expected


@pytest.mark.parametrize(
    ("route", "method", "if_match", "expected"),
    [
        (ETAG, "PUT", '"v1"', True),
        (ETAG, "DELETE", '"v1"', True),
        (ETAG, "PUT", None, False),
        (ROUTE, "PUT", '"v1"', False),
        (ETAG, "POST", '"v1"', False),
    ],
)
def test_checks_etag(route: RoutePolicy, method: str, if_match: str | None, expected: bool) -> None:
    assert engine.checks_etag(route, method, if_match) is expected


@pytest.mark.parametrize(
    ("if_match", "status", "etag", "expected"),
    [
        ('"v1"', 200, '"v1"', None),
        ("*", 200, '"v1"', None),
        ('"v0"', 200, '"v1"', "precondition_failed"),
        ('"v1"', 404, None, "precondition_failed"),  # no current resource matches no ETag
        ('"v1"', 200, None, "precondition_failed"),
        ("*", 200, None, None),  # the resource exists, without an ETag
        ("*", 404, None, "precondition_failed"),
        ('"v1"', 503, '"v1"', "upstream_unavailable"),
    ],
)
def test_on_current_etag(
    if_match: str, status: int, etag: str | None, expected: str | None
) -> None:
    assert code_of(engine.on_current_etag(if_match, status, etag)) == expected


def test_on_store_down() -> None:
    assert code_of(engine.on_store_down(fail_open=False)) == "store_unavailable"
    assert engine.on_store_down(fail_open=True) == FORWARD_UNPROTECTED
    refusal = engine.on_store_down(fail_open=False)
    assert isinstance(refusal, Refuse)
    assert refusal.retry_after == 1


# --- after_response --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "store"),
        (201, "store"),
        (204, "store"),
        (301, "store"),
        (400, "store"),
        (404, "store"),
        (409, "store"),
        (422, "store"),
        (500, "store"),  # the request did run: stored and replayed, like Stripe
        (501, "store"),
        (408, "release"),
        (425, "release"),
        (429, "release"),
        (502, "release"),
        (503, "release"),
        (504, "release"),
    ],
)
def test_after_response_with_default_release_statuses(status: int, expected: str) -> None:
    assert engine.after_response(ROUTE, status) == expected


def test_after_response_follows_the_route_release_statuses() -> None:
    custom = make_route(release_statuses=frozenset({500}))
    assert engine.after_response(custom, 500) == "release"
    assert engine.after_response(custom, 503) == "store"
    nothing = make_route(release_statuses=frozenset())
    assert all(engine.after_response(nothing, s) == "store" for s in (408, 429, 503, 504))


# --- after_failure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "kind", "expected"),
    [
        # nothing was sent: always safe to run again
        (ROUTE, "connect", ("upstream_unavailable", "release")),
        (RELEASING, "connect", ("upstream_unavailable", "release")),
        # the outcome is unknown: the route's ambiguous setting decides
        (ROUTE, "timeout", ("upstream_timeout", "store")),
        (RELEASING, "timeout", ("upstream_timeout", "release")),
        (ROUTE, "broken", ("upstream_unavailable", "store")),
        (RELEASING, "broken", ("upstream_unavailable", "release")),
    ],
    ids=[
        "connect-store",
        "connect-release",
        "timeout-store",
        "timeout-release",
        "broken-store",
        "broken-release",
    ],
)
def test_after_failure(
    route: RoutePolicy, kind: UpstreamFailureKind, expected: tuple[str, str]
) -> None:
    refusal, disposition = engine.after_failure(route, UpstreamFailure(kind, "boom"))
    assert (refusal.code, disposition) == expected
    # a pass-through request meets the same failure with the same answer, nothing to settle
    assert engine.on_passthrough_failure(UpstreamFailure(kind, "boom")) == refusal


# --- the catalogue ---------------------------------------------------------------------------

# The admin listener's answers are not proxied requests; internal_error's request was counted
# by the handler that failed.
UNCOUNTED = (
    "unauthorized",
    "key_not_found",
    "keys_api_disabled",
    "not_found",
    "method_not_allowed",
    "internal_error",
)


@pytest.mark.parametrize("code", [c for c in PROBLEMS if c not in UNCOUNTED])
def test_every_request_problem_counts_as_an_outcome(code: str) -> None:
    assert PROBLEMS[code].outcome is not None


def test_outcome_labels_include_the_spec_set() -> None:
    spec = {
        "passthrough",
        "new",
        "replayed",
        "conflict",
        "mismatch",
        "missing_key",
        "invalid_key",
        "too_large",
        "released",
        "store_error",
        "upstream_error",
    }
    assert spec <= {outcome.value for outcome in Outcome}


@pytest.mark.parametrize(
    ("code", "status", "outcome"),
    [
        ("idempotency_key_missing", 400, Outcome.MISSING_KEY),
        ("idempotency_key_invalid", 400, Outcome.INVALID_KEY),
        ("request_too_large", 413, Outcome.TOO_LARGE),
        ("request_in_progress", 409, Outcome.CONFLICT),
        ("response_not_replayable", 409, Outcome.CONFLICT),
        ("idempotency_key_reused", 422, Outcome.MISMATCH),
        ("store_unavailable", 503, Outcome.STORE_ERROR),
        ("upstream_unavailable", 502, Outcome.UPSTREAM_ERROR),
        ("upstream_timeout", 504, Outcome.UPSTREAM_ERROR),
        ("precondition_required", 428, Outcome.PRECONDITION),
        ("precondition_failed", 412, Outcome.PRECONDITION),
    ],
)
def test_the_spec_codes(code: str, status: int, outcome: Outcome) -> None:
    assert (PROBLEMS[code].status, PROBLEMS[code].outcome) == (status, outcome)


def test_default_release_statuses_are_the_spec_ones() -> None:
    """The routes of this file use the built-in defaults, which must be SPEC section 3's."""
    assert set(BUILTIN_DEFAULTS.release_statuses or []) == DEFAULT_RELEASE
    assert BUILTIN_DEFAULTS.ambiguous == "store"


def test_the_engine_imports_no_io() -> None:
    """engine decides; it must not be able to await a socket (run in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, idemproxy.engine; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'redis', 'asyncio'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
