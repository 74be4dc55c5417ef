"""The pure decision functions of idemproxy.engine, table by table (SPEC section 4)."""

from __future__ import annotations

import pytest

from idemproxy import engine
from idemproxy.config import BUILTIN_DEFAULTS, FingerprintPolicy, KeyPolicy, RoutePolicy
from idemproxy.engine import Existing, Outcome, Refusal
from idemproxy.errors import PROBLEMS
from idemproxy.keys import KeyProblem
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

# --- on_key_problem --------------------------------------------------------------------------

MISSING = KeyProblem("missing", "send the Idempotency-Key header")
INVALID = KeyProblem("invalid", "the Idempotency-Key header is empty")


@pytest.mark.parametrize(
    ("route", "problem", "expected"),
    [
        (ROUTE, MISSING, None),  # optional key: forwarded unprotected
        (REQUIRED, MISSING, Refusal("idempotency_key_missing", Outcome.MISSING_KEY)),
        (ROUTE, INVALID, Refusal("idempotency_key_invalid", Outcome.INVALID_KEY)),
        (REQUIRED, INVALID, Refusal("idempotency_key_invalid", Outcome.INVALID_KEY)),
    ],
    ids=["missing-optional", "missing-required", "invalid-optional", "invalid-required"],
)
def test_on_key_problem(route: RoutePolicy, problem: KeyProblem, expected: Refusal | None) -> None:
    assert engine.on_key_problem(route, problem) == expected


@pytest.mark.parametrize("route", [ROUTE, REQUIRED])
def test_key_refusals_are_400_problems(route: RoutePolicy) -> None:
    for problem in (MISSING, INVALID):
        refusal = engine.on_key_problem(route, problem)
        if refusal is not None:
            assert PROBLEMS[refusal.code][0] == 400
            assert engine.OUTCOME_OF_PROBLEM[refusal.code] == refusal.outcome


# --- classify --------------------------------------------------------------------------------

FP = "fp-same"
OTHER = "fp-other"
RESPONSE = StoredResponse(201, [("Location", "/orders/1")], b"{}")


def record(state: str, fingerprint: str = FP, response: StoredResponse | None = None) -> Record:
    return Record(state, fingerprint, "holder-token", 1_700_000_000.0, response)


@pytest.mark.parametrize(
    ("existing", "fingerprint", "expected"),
    [
        (record(COMPLETED, response=RESPONSE), FP, Existing.REPLAY),
        (record(IN_FLIGHT), FP, Existing.IN_PROGRESS),
        (record(UNREPLAYABLE), FP, Existing.NOT_REPLAYABLE),
        # completed but no response handed over: nothing to replay
        (record(COMPLETED), FP, Existing.NOT_REPLAYABLE),
        # a different request under the same key is a reuse, whatever state the first is in
        (record(COMPLETED, response=RESPONSE), OTHER, Existing.MISMATCH),
        (record(COMPLETED), OTHER, Existing.MISMATCH),
        (record(IN_FLIGHT), OTHER, Existing.MISMATCH),
        (record(UNREPLAYABLE), OTHER, Existing.MISMATCH),
    ],
    ids=[
        "completed-replay",
        "in-flight",
        "unreplayable",
        "completed-without-response",
        "mismatch-completed",
        "mismatch-completed-without-response",
        "mismatch-in-flight",
        "mismatch-unreplayable",
    ],
)
def test_classify(existing: Record, fingerprint: str, expected: Existing) -> None:
    assert engine.classify(existing, fingerprint) is expected


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
    route: RoutePolicy, kind: engine.UpstreamFailureKind, expected: tuple[str, str]
) -> None:
    assert engine.after_failure(route, kind) == expected


@pytest.mark.parametrize("kind", ["connect", "timeout", "broken"])
def test_after_failure_codes_are_gateway_problems(kind: engine.UpstreamFailureKind) -> None:
    code, _ = engine.after_failure(ROUTE, kind)
    assert PROBLEMS[code][0] in (502, 504)
    assert engine.OUTCOME_OF_PROBLEM[code] is Outcome.UPSTREAM_ERROR


# --- the outcome table -----------------------------------------------------------------------

REQUEST_PROBLEMS = [
    code for code in PROBLEMS if code not in ("unauthorized", "key_not_found", "keys_api_disabled")
]


@pytest.mark.parametrize("code", REQUEST_PROBLEMS)
def test_every_request_problem_counts_as_an_outcome(code: str) -> None:
    assert code in engine.OUTCOME_OF_PROBLEM


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
    ("code", "outcome"),
    [
        ("idempotency_key_missing", Outcome.MISSING_KEY),
        ("idempotency_key_invalid", Outcome.INVALID_KEY),
        ("request_too_large", Outcome.TOO_LARGE),
        ("request_in_progress", Outcome.CONFLICT),
        ("response_not_replayable", Outcome.CONFLICT),
        ("idempotency_key_reused", Outcome.MISMATCH),
        ("store_unavailable", Outcome.STORE_ERROR),
        ("upstream_unavailable", Outcome.UPSTREAM_ERROR),
        ("upstream_timeout", Outcome.UPSTREAM_ERROR),
    ],
)
def test_outcome_of_problem(code: str, outcome: Outcome) -> None:
    assert engine.OUTCOME_OF_PROBLEM[code] is outcome


def test_default_release_statuses_are_the_spec_ones() -> None:
    """The routes of this file use the built-in defaults, which must be SPEC section 3's."""
    assert set(BUILTIN_DEFAULTS.release_statuses or []) == DEFAULT_RELEASE
    assert BUILTIN_DEFAULTS.ambiguous == "store"
