"""The policy loader (SPEC section 3): the shipped examples, ${VAR} expansion, defaults,
route matching and the newer fields. Error reports are in test_config_errors.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from idemproxy.config import (
    ConfigError,
    Overrides,
    load,
    load_text,
)
from idemproxy.policy import Policy
from tests.conftest import run_cli
from tests.policy_text import config, only_problem, route, yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
EXAMPLES = sorted(CONFIG_DIR.glob("*.yaml"))


# --- the example policies ----------------------------------------------------------------


def test_there_are_example_policies() -> None:
    assert len(EXAMPLES) >= 3, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policy_passes_check(path: Path) -> None:
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: "), result.stdout
    # And without any environment variables set: every ${VAR} in an example has a default.
    assert load(str(path), environ={}).routes


def test_payments_example_does_what_its_comments_say() -> None:
    cfg = load(str(CONFIG_DIR / "payments.yaml"), environ={})
    assert cfg.store.url == "redis://127.0.0.1:6379/0"
    assert route(cfg, "capture-payment").ttl == 7 * 86400
    assert route(cfg, "create-payment").ttl == 24 * 3600
    assert route(cfg, "create-refund").concurrency == "wait"
    payout = route(cfg, "create-payout")
    assert payout.ambiguous == "release"
    assert 409 in payout.release_statuses
    assert route(cfg, "create-customer").key.source == "body"
    assert route(cfg, "create-customer").key.pointer == "/client_reference_id"
    assert route(cfg, "processor-webhook").key.source == "query"
    assert route(cfg, "processor-webhook").key.query_name == "event_id"
    assert route(cfg, "internal").keyed is False
    redis = load(str(CONFIG_DIR / "payments.yaml"), environ={"REDIS_URL": "redis://r:6380/2"})
    assert redis.store.url == "redis://r:6380/2"


# --- ${VAR} expansion ----------------------------------------------------------------------


def test_env_var_is_expanded() -> None:
    cfg = config(
        """
        upstream:
          url: ${UPSTREAM}
        store:
          key_prefix: "${PREFIX}:idem:"
        """,
        {"UPSTREAM": "http://api.internal:9000", "PREFIX": "shop"},
    )
    assert cfg.upstream.url == "http://api.internal:9000"
    assert cfg.store.key_prefix == "shop:idem:"


def test_env_var_default_is_used_when_unset_and_ignored_when_set() -> None:
    text = """
        upstream:
          url: "http://${HOST:-127.0.0.1}:${PORT:-8000}"
        """
    assert config(text).upstream.url == "http://127.0.0.1:8000"
    assert config(text, {"HOST": "api", "PORT": "81"}).upstream.url == "http://api:81"


def test_unset_env_var_without_default_is_an_error_with_the_path() -> None:
    problem = only_problem(
        """
        version: 1
        upstream:
          url: ${MISSING_UPSTREAM}
        """
    )
    assert problem.path == "upstream.url"
    assert problem.line == 3
    assert "MISSING_UPSTREAM" in problem.message


def test_plain_scalar_expansion_is_typed_by_yaml() -> None:
    text = """
        upstream:
          max_connections: ${N:-5}
        """
    assert config(text).upstream.max_connections == 5
    assert config(text, {"N": "7"}).upstream.max_connections == 7
    problem = only_problem(text, {"N": "lots"})
    assert problem.path == "upstream.max_connections"


@pytest.mark.parametrize("text", ["${TOKEN-}", "${ TOKEN }", "${TOKEN:=x}", "a${TOKEN", "${}"])
def test_a_malformed_reference_is_an_error_not_text(text: str) -> None:
    """Only ${NAME} and ${NAME:-default} are references (SPEC 3). Another ${ was kept as text:
    `token: ${TOKEN-}` set the literal token "${TOKEN-}", known to anyone who reads the file."""
    problem = only_problem(f'admin:\n  token: "{text}"\n', {"TOKEN": "secret"})
    assert problem.path == "admin.token"
    assert problem.line == 2
    assert "${NAME:-default}" in problem.message


@pytest.mark.parametrize("value", ["12345", "0x1F", "yes", "null", "1_000", ""])
def test_plain_scalar_expansion_fills_a_string_field_with_the_text_as_expanded(
    value: str,
) -> None:
    """SPEC 3's own `token: ${IDEMPROXY_ADMIN_TOKEN:-}`: a token of digits was refused
    ("expected a string, got 12345", the secret echoed), `null` silently turned the keys API
    off, and an empty `${PREFIX}` became the default prefix instead of ""."""
    cfg = config(
        """
        admin:
          token: ${TOKEN:-}
        store:
          key_prefix: ${PREFIX}
        routes:
          - name: ${TOKEN}
            match: {path: /a}
        """,
        {"TOKEN": value or "x", "PREFIX": value},
    )
    assert cfg.admin_token == (value or "x")
    assert cfg.store.key_prefix == value
    assert cfg.routes[0].label == (value or "x")


def test_quoted_expansion_stays_a_string() -> None:
    problem = only_problem(
        """
        upstream:
          max_connections: "${N:-5}"
        """
    )
    assert problem.path == "upstream.max_connections"


# --- idempotency: off ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["off", "false", "Off", "no"])
def test_idempotency_off_disables_the_route(value: str) -> None:
    cfg = config(
        f"""
        routes:
          - match: {{path: "/internal/**"}}
            idempotency: {value}
          - match: {{path: /orders}}
        """
    )
    assert [r.keyed for r in cfg.routes] == [False, True]


def test_idempotency_on_keeps_the_route_keyed() -> None:
    cfg = config(
        """
        routes:
          - match: {path: /orders}
            idempotency: on
        """
    )
    assert cfg.routes[0].keyed is True


# --- defaults inheritance ------------------------------------------------------------------


def test_route_inherits_and_overrides_defaults() -> None:
    cfg = config(
        """
        defaults:
          ttl: 1h
          concurrency: wait
          release_statuses: [503]
        routes:
          - name: inherits
            match: {path: /a}
          - name: overrides
            match: {path: /b}
            ttl: 7d
            concurrency: reject
            release_statuses: [429, 503]
        """
    )
    inherits, overrides = route(cfg, "inherits"), route(cfg, "overrides")
    assert inherits.ttl == 3600
    assert inherits.concurrency == "wait"
    assert inherits.release_statuses == frozenset({503})
    assert overrides.ttl == 7 * 86400
    assert overrides.concurrency == "reject"
    assert overrides.release_statuses == frozenset({429, 503})
    # Fields neither side writes come from the built-in defaults.
    assert inherits.lock_ttl == 30
    assert inherits.max_request_body == 1024 * 1024


def test_route_key_merges_field_wise_into_defaults_key() -> None:
    cfg = config(
        """
        defaults:
          key:
            header: X-Request-Id
            required: false
        routes:
          - name: strict
            match: {path: /a}
            key: {required: true}
          - name: lenient
            match: {path: /b}
        """
    )
    strict, lenient = route(cfg, "strict"), route(cfg, "lenient")
    assert strict.key.required is True
    assert strict.key.header == "X-Request-Id"
    assert strict.key.source == "header"
    assert lenient.key.required is False
    assert lenient.key.header == "X-Request-Id"


def test_route_fingerprint_merges_field_wise_into_defaults() -> None:
    cfg = config(
        """
        defaults:
          fingerprint: {include: [method, body], headers: [X-Tenant]}
        routes:
          - match: {path: /a}
            fingerprint: {json_canonical: false}
        """
    )
    fingerprint = cfg.routes[0].fingerprint
    assert fingerprint.include == frozenset({"method", "body"})
    assert fingerprint.headers == ("x-tenant",)
    assert fingerprint.json_canonical is False


def test_no_routes_keys_post_and_patch_on_every_path_but_not_get() -> None:
    policy = Policy(config("upstream: {url: http://127.0.0.1:8000}").routes)
    for method in ("POST", "PATCH"):
        for path in ("/", "/orders", "/a/b/c/d"):
            matched = policy.match(method, path)
            assert matched is not None, (method, path)
            assert matched.keyed
    for method in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS"):
        assert policy.match(method, "/orders") is None, method


def test_methods_default_to_post_and_patch() -> None:
    cfg = config(
        """
        routes:
          - match: {path: /a}
          - match: {path: /b, methods: [put, DELETE]}
        """
    )
    assert cfg.routes[0].methods == frozenset({"POST", "PATCH"})
    assert cfg.routes[1].methods == frozenset({"PUT", "DELETE"})


def test_flags_override_the_file() -> None:
    cfg = load_text(
        yaml(
            """
            listen: 0.0.0.0:80
            upstream: {url: http://file:1}
            store: {url: "redis://file:6379/0"}
            """
        ),
        "policy.yaml",
        Overrides(listen="127.0.0.1:0", upstream="http://flag:2", store="memory://"),
        {},
    )
    assert cfg.listen == ("127.0.0.1", 0)
    assert cfg.upstream.url == "http://flag:2"
    assert cfg.store.url == "memory://"


def test_a_bad_flag_is_reported_without_a_file_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_text("version: 1\n", "policy.yaml", Overrides(listen="nowhere"), {})
    (problem,) = caught.value.problems
    assert problem.path == "--listen"
    assert problem.line is None  # the flag is not in the file; line 1 would mislead
    assert problem.render("policy.yaml").startswith("policy.yaml: --listen: ")


# --- known bugs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [
        pytest.param(
            """
            defaults:
              release_statuses: [503, 700]
            routes:
              - match: {path: /a}
              - match: {path: /b}
            """,
            "defaults.release_statuses[1]",
            2,
            id="release-status",
        ),
        pytest.param(
            """
            defaults:
              scope: [cookie:session]
            """,
            "defaults.scope[0]",
            2,
            id="scope",
        ),
        pytest.param(
            """
            defaults:
              key: {from: body}
            """,
            "defaults.key.pointer",
            2,
            id="key-pointer",
        ),
    ],
)
def test_error_in_defaults_is_reported_once_at_its_defaults_path(
    text: str, path: str, line: int
) -> None:
    problem = only_problem(text)
    assert problem.path == path
    assert problem.line == line


@pytest.mark.parametrize(
    ("text", "source"),
    [
        pytest.param(
            """
            defaults:
              key: {from: query, name: rid}
            routes:
              - match: {path: /a}
                key: {from: header}
            """,
            "header",
            id="query-defaults-header-route",
        ),
        pytest.param(
            """
            defaults:
              key: {from: body, pointer: /client_id}
            routes:
              - match: {path: /a}
                key: {from: query, name: rid}
            """,
            "query",
            id="body-defaults-query-route",
        ),
    ],
)
def test_route_may_switch_the_key_source_of_defaults(text: str, source: str) -> None:
    assert config(text).routes[0].key.source == source


# --- route matching ------------------------------------------------------------------------

MATCHING_POLICY = """
    routes:
      - name: orders
        match: {methods: [POST], path: /orders}
      - name: capture
        match: {methods: [POST], path: "/payments/{id}/capture"}
      - name: internal
        match: {path: "/internal/**"}
        idempotency: off
      - name: internal-special
        match: {methods: [POST, PUT], path: /internal/special}
      - name: orders-put
        match: {methods: [PUT], path: /orders}
      - name: item
        match: {methods: [PATCH], path: "/orders/{order}/items/{item}"}
    """


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/orders", "orders"),
        ("POST", "/orders/", "orders"),
        ("POST", "//orders", "orders"),
        ("POST", "/orders//", "orders"),
        ("POST", "/orders/1", None),
        ("POST", "/order", None),
        ("POST", "/ordersx", None),
        ("GET", "/orders", None),
        ("PATCH", "/orders", None),
        ("PUT", "/orders", "orders-put"),
        ("POST", "/payments/pay_123/capture", "capture"),
        ("POST", "/payments//pay_123/capture/", "capture"),
        ("POST", "/payments/capture", None),
        ("POST", "/payments//capture", None),
        ("POST", "/payments/a/b/capture", None),
        ("POST", "/payments/pay_123/capture/extra", None),
        ("PATCH", "/orders/1/items/2", "item"),
        ("PATCH", "/orders/1/items", None),
        ("POST", "/internal", "internal"),
        ("POST", "/internal/", "internal"),
        ("PATCH", "/internal/a/b/c", "internal"),
        ("POST", "/internalx", None),
        ("GET", "/internal/a", None),
        ("POST", "/internal/special", "internal"),
        ("PUT", "/internal/special", "internal-special"),
        ("DELETE", "/internal/special", None),
    ],
)
def test_route_matching(method: str, path: str, expected: str | None) -> None:
    policy = Policy(config(MATCHING_POLICY).routes)
    matched = policy.match(method, path)
    assert (matched.label if matched is not None else None) == expected


def test_route_label_defaults_to_methods_and_pattern() -> None:
    cfg = config(
        """
        routes:
          - match: {methods: [PATCH, POST], path: "/a/{id}"}
        """
    )
    assert cfg.routes[0].label == "PATCH|POST /a/{id}"


def test_root_double_star_matches_root() -> None:
    policy = Policy(config('routes: [{match: {path: "/**"}}]').routes)
    assert policy.match("POST", "/") is not None
    assert policy.match("POST", "") is not None


# --- release_statuses: codes and classes (SPEC section 3) -----------------------------------


def test_release_status_classes_stand_for_every_code_of_the_class() -> None:
    cfg = config(
        """
        defaults:
          release_statuses: [4xx, 503]
        routes:
          - match: {path: /a}
          - match: {path: /b}
            release_statuses: [5xx]
        """
    )
    inherits, overrides = cfg.routes
    assert inherits.release_statuses == frozenset([*range(400, 500), 503])
    assert overrides.release_statuses == frozenset(range(500, 600))


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        pytest.param("6xx", "not an HTTP status class (1xx to 5xx)", id="6xx"),
        pytest.param("0xx", "not an HTTP status class (1xx to 5xx)", id="0xx"),
        pytest.param("4XX", "write the status class '4XX' as 4xx", id="upper-case"),
        pytest.param("4xxx", "expected a status code like 503 or a class like 5xx", id="4xxx"),
        pytest.param("'404'", "expected a status code like 503 or a class like 5xx", id="quoted"),
        pytest.param("99", "99 is not an HTTP status (100 to 599)", id="99"),
        pytest.param("true", "expected a status code", id="boolean"),
    ],
)
def test_release_status_entries_are_codes_or_classes(entry: str, fragment: str) -> None:
    problem = only_problem(
        f"""
        routes:
          - match: {{path: /a}}
            release_statuses:
              - 503
              - {entry}
        """
    )
    assert problem.path == "routes[0].release_statuses[1]"
    assert problem.line == 5
    assert fragment in problem.message


# --- fingerprint.ignore (SPEC section 3) ----------------------------------------------------


def test_fingerprint_ignore_is_resolved_into_reference_tokens() -> None:
    cfg = config(
        """
        defaults:
          fingerprint:
            ignore: [/sent_at, /meta/nonce, "/a~1b/~0c", /items/0]
        routes:
          - match: {path: /a}
          - match: {path: /b}
            fingerprint: {ignore: []}
          - match: {path: /c}
            fingerprint: {headers: [X-Tenant]}
        """
    )
    inherits, cleared, merged = cfg.routes
    expected = (("sent_at",), ("meta", "nonce"), ("a/b", "~c"), ("items", "0"))
    assert inherits.fingerprint.ignore == expected
    assert cleared.fingerprint.ignore == ()
    assert merged.fingerprint.ignore == expected  # the block merges field by field
    assert merged.fingerprint.headers == ("x-tenant",)


@pytest.mark.parametrize(
    ("pointer", "fragment"),
    [
        pytest.param("sent_at", "is not a JSON pointer (RFC 6901)", id="no-leading-slash"),
        pytest.param("/a~2", "is not a JSON pointer (RFC 6901)", id="bad-escape"),
        pytest.param("/a~", "is not a JSON pointer (RFC 6901)", id="dangling-tilde"),
        pytest.param("''", "the empty pointer is the whole body", id="whole-body"),
        pytest.param("5", "expected a JSON pointer like /sent_at, got 5", id="number"),
    ],
)
def test_fingerprint_ignore_entries_must_be_json_pointers(pointer: str, fragment: str) -> None:
    problem = only_problem(
        f"""
        defaults:
          fingerprint:
            ignore:
              - /sent_at
              - {pointer}
        """
    )
    assert problem.path == "defaults.fingerprint.ignore[1]"
    assert problem.line == 5
    assert fragment in problem.message


@pytest.mark.parametrize(
    ("fingerprint", "fragment"),
    [
        pytest.param(
            "{ignore: [/sent_at], json_canonical: false}", "json_canonical: true", id="raw"
        ),
        pytest.param("{ignore: [/sent_at], include: [method, path]}", "body in", id="no-body"),
    ],
)
def test_fingerprint_ignore_that_would_do_nothing_is_an_error(
    fingerprint: str, fragment: str
) -> None:
    problem = only_problem(
        f"""
        routes:
          - match: {{path: /a}}
            fingerprint: {fingerprint}
        """
    )
    assert problem.path == "routes[0].fingerprint.ignore"
    assert problem.line == 3
    assert fragment in problem.message
