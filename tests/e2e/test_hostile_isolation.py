"""Hostile and broken input: tenant isolation, and nothing secret in logs.

Harness: hostile_harness."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from idemproxy.config import ConfigError, load_text
from idemproxy.observability import JsonFormatter
from tests.conftest import HOST, free_port, run_cli
from tests.hostile_harness import (
    BOUND,
    FORBIDDEN_IN_FIELDS,
    FUZZ,
    KEY_REQUIRED,
    NON_ASCII,
    VISIBLE,
    Harness,
    Proxy,
    assert_sane,
    build,
    exchange,
)
from tests.raw_reply import Reply

# --- 5. tenant isolation -----------------------------------------------------------------------

CREDENTIALS = st.one_of(
    st.none(),  # no Authorization header at all
    st.text(VISIBLE, max_size=30).map(lambda s: b"Bearer " + s.encode()),
    st.text(st.one_of(VISIBLE, NON_ASCII, st.just(" ")), max_size=30).map(str.encode),
    st.binary(max_size=30).filter(lambda b: not FORBIDDEN_IN_FIELDS.intersection(b)),
)


def _credential(value: bytes | None) -> bytes:
    """What a credential is once HTTP has dropped the whitespace around it; absent = empty."""
    return (value or b"").strip(b" \t")


def _keyed_post(proxy: Proxy, key: bytes, auth: bytes | None, path: bytes = b"/orders") -> Reply:
    headers = [(b"Idempotency-Key", key)]
    if auth is not None:
        headers.append((b"Authorization", auth))
    request = build(b"POST", path, headers, b'{"amount": 100}')
    return assert_sane(exchange(proxy.port, request), request)


@FUZZ
@given(first=CREDENTIALS, second=CREDENTIALS)
@example(first=None, second=b"Bearer a")
@example(first=b"Bearer a", second=b"bearer a")
@example(first=b"Bearer a", second=b"Bearer  a")
@example(first=b"Bearer a", second=b"Bearer a, Bearer b")
@example(first=b"\xff", second=b"\xc3\xbf")
def _isolation_property(
    harness: Harness, proxy: Proxy, first: bytes | None, second: bytes | None
) -> None:
    if _credential(first) == _credential(second):
        return  # the same credential: a replay is right
    key = uuid.uuid4().hex.encode()
    a = _keyed_post(proxy, key, first)
    assert (a.status, a.from_upstream, a.header("Idempotent-Replayed")) == (201, True, None)
    b = _keyed_post(proxy, key, second)
    assert (b.status, b.from_upstream) == (201, True), b.body
    assert b.header("Idempotent-Replayed") is None, "replayed across credentials"
    assert b.header("X-Serial") != a.header("X-Serial")
    serial_a = json.loads(a.body)["secret"]
    assert serial_a.encode() not in b.body
    assert all(serial_a not in value for _, value in b.headers)
    # The control: under its own credential the key does replay.
    again = _keyed_post(proxy, key, first)
    assert again.header("Idempotent-Replayed") == "true"
    assert again.body == a.body


def test_same_key_under_two_credentials_never_replays_across(harness: Harness) -> None:
    proxy = harness.proxy(KEY_REQUIRED)
    _isolation_property(harness, proxy)


TWO_ROUTES = """
routes:
  - match: {methods: [POST], path: /orders}
  - match: {methods: [POST], path: /refunds}
"""


def _reveals_nothing_of(reply: Reply, first: Reply) -> None:
    secret = json.loads(first.body)["secret"]
    hex_part = secret.rsplit("-", 2)[-2]
    everything = reply.body + b"\n".join(f"{k}: {v}".encode() for k, v in reply.headers)
    for start in range(len(hex_part) - 7):
        assert hex_part[start : start + 8].encode() not in everything, everything
    assert b'"serial"' not in reply.body
    for name in ("Set-Cookie", "Location", "X-Serial", "Idempotent-Replayed"):
        assert reply.header(name) is None, name


@pytest.mark.parametrize(
    ("second_path", "second_body"),
    [(b"/refunds", b'{"amount": 100}'), (b"/orders", b'{"amount": 999}')],
    ids=["other-route", "other-body"],
)
def test_a_reused_key_gets_422_that_reveals_nothing(
    harness: Harness, second_path: bytes, second_body: bytes
) -> None:
    proxy = harness.proxy(TWO_ROUTES)
    headers = [(b"Idempotency-Key", b"reused-1"), (b"Authorization", b"Bearer tenant-a")]
    first_request = build(b"POST", b"/orders", headers, b'{"amount": 100}')
    first = assert_sane(exchange(proxy.port, first_request), first_request)
    assert (first.status, first.from_upstream) == (201, True)
    request = build(b"POST", second_path, headers, second_body)
    reply = assert_sane(exchange(proxy.port, request), request)
    assert (reply.status, reply.code) == (422, "idempotency_key_reused"), reply.body
    _reveals_nothing_of(reply, first)
    assert len(harness.recorder.calls) == 1


def test_a_key_reused_while_in_flight_reveals_nothing(harness: Harness) -> None:
    proxy = harness.proxy(TWO_ROUTES)
    headers = [(b"Idempotency-Key", b"reused-2"), (b"X-Test-Delay", b"0.6")]
    first_request = build(b"POST", b"/orders", headers, b'{"amount": 100}')
    answers: list[Reply | None] = []
    worker = threading.Thread(target=lambda: answers.append(exchange(proxy.port, first_request)))
    worker.start()
    try:
        deadline = time.monotonic() + BOUND
        while not harness.recorder.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert harness.recorder.calls, "the first request never reached the upstream"
        request = build(b"POST", b"/refunds", headers[:1], b'{"amount": 100}')
        reply = assert_sane(exchange(proxy.port, request), request)
    finally:
        worker.join(BOUND)
    first = assert_sane(answers[0] if answers else None, first_request)
    assert first.status == 201
    assert (reply.status, reply.code) == (422, "idempotency_key_reused"), reply.body
    _reveals_nothing_of(reply, first)


ADMIN_TOKEN = "adm1n-T0ken-5ecret-value"
ADMIN_POLICY = f"""
admin:
  token: {ADMIN_TOKEN}
{KEY_REQUIRED}
"""
RECORD_FIELDS = [
    "key_hash", "state", "fingerprint", "created_at", "age_seconds", "expires_in_seconds",
    "headers", "body_base64", "completed", "in_flight",
]  # fmt: skip


def _admin(proxy: Proxy, method: bytes, key: str, authorization: bytes | None) -> Reply:
    headers = [] if authorization is None else [(b"Authorization", authorization)]
    target = f"/keys/{key}?scope=Bearer%20tenant-a&body=1".encode()
    request = build(method, target, headers)
    return assert_sane(exchange(proxy.admin_port, request), request)


WRONG_ADMIN_CREDENTIALS = [
    None,
    b"",
    b" ",
    b"Bearer",
    b"Bearer ",
    b"Bearer wrong",
    b"Bearer " + ADMIN_TOKEN[:-1].encode(),
    b"Bearer " + ADMIN_TOKEN.encode() + b"x",
    b"Bearer " + ADMIN_TOKEN.upper().encode(),
    b"Bearer " + ADMIN_TOKEN[:-1].encode() + b"F",
    b"Bearer" + ADMIN_TOKEN.encode(),
    b"Bearer " + ADMIN_TOKEN.encode() + "é".encode(),
    b"Basic " + ADMIN_TOKEN.encode(),
    ADMIN_TOKEN.encode(),
]


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
def test_the_keys_api_refuses_wrong_admin_tokens_and_reveals_nothing(
    harness: Harness, method: bytes
) -> None:
    proxy = harness.proxy(ADMIN_POLICY)
    first = _keyed_post(proxy, b"admin-1", b"Bearer tenant-a")
    assert first.status == 201
    secret = json.loads(first.body)["secret"].encode()
    unknown_key_answers = set()
    for credential in WRONG_ADMIN_CREDENTIALS:
        for key in ("admin-1", "no-such-key"):
            reply = _admin(proxy, method, key, credential)
            assert (reply.status, reply.code) == (401, "unauthorized"), (credential, reply.body)
            for name in RECORD_FIELDS:
                assert name.encode() not in reply.body, (credential, name, reply.body)
            assert secret not in reply.body
            assert ADMIN_TOKEN.encode() not in reply.body
            # No oracle either: a known and an unknown key get the same refusal.
            unknown_key_answers.add(reply.body)
    assert len(unknown_key_answers) == 1, unknown_key_answers
    # The control: the right token sees the record, which the refusals did not delete.
    reply = _admin(proxy, b"GET", "admin-1", b"Bearer " + ADMIN_TOKEN.encode())
    assert reply.status == 200, reply.body
    described = json.loads(reply.body)
    assert {"key_hash", "fingerprint", "body_base64"} <= described.keys()
    assert secret in base64.b64decode(described["body_base64"])


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
def test_the_keys_api_refuses_a_non_utf8_token(memory_harness: Harness, method: bytes) -> None:
    proxy = memory_harness.proxy(ADMIN_POLICY)
    reply = _admin(proxy, method, "admin-1", b"Bearer \xff" + ADMIN_TOKEN.encode())
    assert (reply.status, reply.code) == (401, "unauthorized"), reply.body


# --- 6. nothing secret in logs -----------------------------------------------------------------

LOGGERS = ("idemproxy", "idemproxy.access")


def test_no_secret_reaches_the_logs_or_metrics(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:10]
    secrets = {
        "key": f"KEYSECRET-{tag}",
        "key2": f"KEYTWOSECRET-{tag}",
        "body": f"BODYSECRET-{tag}",
        "authorization": f"AUTHSECRET-{tag}",
        "cookie": f"COOKIESECRET-{tag}",
        "query": f"QUERYSECRET-{tag}",
        "password": "hunter2",
    }
    for name in LOGGERS:
        caplog.set_level(logging.INFO, logger=name)
    proxy = harness.proxy(KEY_REQUIRED)
    base = [
        (b"Authorization", f"Bearer {secrets['authorization']}".encode()),
        (b"Cookie", f"sid={secrets['cookie']}; theme=dark".encode()),
        (b"Content-Type", b"application/json"),
    ]
    target = f"/orders?token={secrets['query']}".encode()
    body = json.dumps({"card": secrets["body"]}).encode()
    key = (b"Idempotency-Key", secrets["key"].encode())
    answers = []
    for headers, payload in [
        ([key, *base], body),  # new
        ([key, *base], body),  # replayed
        ([key, *base], body.replace(b"BODY", b"OTHER")),  # same key, other body: 422
        ([(b"Idempotency-Key", f"{secrets['key']} x".encode()), *base], body),  # invalid: 400
        ([(b"Idempotency-Key", secrets["key2"].encode()), (b"X-Test-Drop", b"1"), *base], body),
        (base, body),  # no key: 400
    ]:
        request = build(b"POST", target, headers, payload)
        answers.append(exchange(proxy.port, request))
    get = build(b"GET", target, base)
    answers.append(exchange(proxy.port, get))
    statuses = [reply.status if reply else None for reply in answers]
    assert statuses == [201, 201, 422, 400, 502, 400, 201]

    # A store that is down, behind a URL with a password: 503, and the password stays out.
    down = harness.proxy(KEY_REQUIRED, store=f"redis://user:hunter2@{HOST}:{free_port()}/0")
    request = build(b"POST", target, [key, *base], body)
    reply = exchange(down.port, request)
    assert reply is not None
    assert reply.status == 503
    metrics = exchange(proxy.admin_port, build(b"GET", b"/metrics"))
    assert metrics is not None
    assert metrics.status == 200

    records = [r for r in caplog.records if r.name in LOGGERS or r.name.startswith("idemproxy.")]
    access = [r for r in records if r.name == "idemproxy.access"]
    assert len(access) >= len(statuses) + 1, "the requests were not logged at all"
    lines = "\n".join(JsonFormatter().format(record) for record in records)
    assert '"key_hash"' in lines
    for name, secret in secrets.items():
        assert secret not in lines, f"the {name} reached the logs"
        assert secret.encode() not in metrics.body, f"the {name} reached the metrics"


STORE_URL_WITH_PASSWORD = "redis://user:hunter2@127.0.0.1:1/0"


@pytest.mark.parametrize(
    "policy",
    [
        f"store: {{url: '{STORE_URL_WITH_PASSWORD}', mode: sentinel}}",
        f"store: {{url: '{STORE_URL_WITH_PASSWORD}', mode: clustr, on_error: maybe}}",
        f"store: {{url: '{STORE_URL_WITH_PASSWORD}', sentinels: [a], service_name: m}}",
        "store: {url: 'redis+sentinel://user:hunter2@127.0.0.1:1/0'}",
        "store: {url: 'user:hunter2@127.0.0.1:1/0'}",
        pytest.param("store: {url: '//user:hunter2@127.0.0.1:1/0'}", id="store-url-without-scheme"),
        pytest.param(
            "upstream: {url: 'ftp://user:hunter2@127.0.0.1/'}", id="upstream-url-bad-scheme"
        ),
    ],
)
def test_config_errors_do_not_echo_a_password(tmp_path: Path, policy: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(policy, environ={})
    assert "hunter2" not in str(caught.value)
    path = tmp_path / "policy.yaml"
    path.write_text(policy + "\n", encoding="utf-8")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.strip(), "no error printed"
    assert "hunter2" not in result.stderr + result.stdout


def test_a_store_url_with_a_bad_port_is_a_config_error(tmp_path: Path) -> None:
    url = "redis://user:hunter2@127.0.0.1:notaport/0"
    path = tmp_path / "policy.yaml"
    path.write_text(f"store: {{url: '{url}'}}\n", encoding="utf-8")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1, result
    assert "store.url" in result.stderr, result.stderr
    listen, admin = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
    result = run_cli(
        "run",
        "-c",
        str(path),
        "--upstream",
        f"http://{HOST}:1",
        "--listen",
        listen,
        "--admin",
        admin,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert "hunter2" not in result.stderr
