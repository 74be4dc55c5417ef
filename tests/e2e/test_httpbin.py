"""idemproxy in front of an upstream nobody here wrote: httpbin under gunicorn (issue 14).

Every case sends the same request bytes to httpbin directly and through the proxy (a real
``idemproxy run`` process) and compares status line (reason phrase included), end-to-end
response headers (order, letter case and duplicates kept) and body bytes. Keyed routes also
compare the first answer through the proxy with its replay, byte for byte.

What is normalised, and why (nothing else is):

- ``Date`` and ``Server`` are left out of header comparisons (two answers are two moments), and
  so are hop-by-hop headers (RFC 9110 7.6.1): ``Connection``, ``Keep-Alive``,
  ``Transfer-Encoding``, ``TE``, ``Trailer``, ``Upgrade``, ``Proxy-*``. ``Content-Length`` is
  checked on its own: it must match the body, and the proxied one may exceed direct's only by
  the bytes the normalisation below removes (for a HEAD answer: the one echo line, or nothing).
- Every request sends the same ``Host`` both ways (the proxy keeps it, SPEC 5), so httpbin's
  ``url`` and ``Host`` echoes agree without help. ``origin`` agrees too: httpbin takes it from
  ``X-Forwarded-For``, which the proxy sets to the client's address, 127.0.0.1 like direct.
- httpbin echoes request headers in its bodies and hides ``X-Forwarded-For`` / ``-Proto`` /
  ``-Port`` there, but not ``X-Forwarded-Host``, which the proxy adds (SPEC 5). That one echoed
  member, ``"X-Forwarded-Host": "api.example"``, is removed from the proxied body (decoded first
  when gzip / deflate / br) before comparing; every other byte must agree. Requests carry
  ``X-Probe``, which httpbin's sorted, pretty-printed echoes list after ``X-Forwarded-Host``, so
  there the removed member is never the last of its object; in ``/stream``'s one-line JSON
  (request order) it is the last one.
- Request framing the proxy legitimately changes, as httpbin echoes it (``NO_LENGTH``,
  ``CHUNKED_TO_LENGTH``, on the cases that send it): one header line removed from each side.
- Real clients (httpx, requests) send ``Connection: keep-alive``, a hop-by-hop header the proxy
  removes: their JSON answers are compared parsed, without the ``Connection`` and
  ``X-Forwarded-Host`` echoes. schemathesis' cases compare status codes and failed checks.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import brotlicffi
import httpx
import hypothesis
import pytest
import requests
import schemathesis
from schemathesis.core.result import Ok

from tests.conftest import HOST, RedisProcess
from tests.httpbin_upstream import (
    VIRTUAL_HOST,
    Answer,
    HttpbinProcess,
    ProxyProcess,
    exchange,
    private_workdir,
    remove_workdir,
    request,
)

PROBE = ("X-Probe", "idemproxy")
KEYED_METHODS = "[POST, PUT, PATCH, DELETE]"
POLICY = f"""
shutdown_timeout: 2s
limits: {{max_request_line: 16KiB}}  # a 9 KB header for /response-headers to answer with
store: {{key_prefix: "httpbin-{uuid.uuid4().hex[:8]}:"}}
routes:
  - match: {{methods: [POST], path: /post}}
  - match: {{methods: [PUT], path: /put}}
  - match: {{methods: [PATCH], path: /patch}}
  - match: {{methods: [DELETE], path: /delete}}
  - match: {{methods: {KEYED_METHODS}, path: "/status/{{codes}}"}}
  - match: {{methods: [POST], path: /response-headers}}
  - match: {{methods: {KEYED_METHODS}, path: "/anything/keyed/**"}}
  - match: {{methods: [PUT], path: /anything/required}}
    key: {{required: true}}
"""
# Keys are optional on every route (the default), so the same routes without a key pass through.

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
}
NOT_COMPARED = {b"date", b"server", b"content-length", *HOP_BY_HOP}
PRETTY_ECHO = b'\n    "X-Forwarded-Host": "api.example",'
ECHOED_FORWARDED_HOST = re.compile(
    rb'\n *"X-Forwarded-Host": "api\.example",(?=\n)'  # pretty-printed, never last (X-Probe)
    rb'|, "X-Forwarded-Host": "api\.example"(?=})'  # /stream's one-line JSON, last member
)


# --- processes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = private_workdir()
    yield path
    remove_workdir(path)


@pytest.fixture(scope="module")
def httpbin(workdir: Path) -> Iterator[HttpbinProcess]:
    server = HttpbinProcess(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy(httpbin: HttpbinProcess, workdir: Path) -> Iterator[ProxyProcess]:
    server = ProxyProcess(POLICY, httpbin.url, "memory://", workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_proxy(
    httpbin: HttpbinProcess, redis_server: RedisProcess, workdir: Path
) -> Iterator[ProxyProcess]:
    server = ProxyProcess(POLICY, httpbin.url, redis_server.url, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- comparing answers -----------------------------------------------------------------------


def end_to_end(answer: Answer) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in answer.headers if name.lower() not in NOT_COMPARED]


def decoded(answer: Answer) -> bytes:
    encoding = b",".join(answer.values("Content-Encoding")).strip().lower()
    if encoding == b"gzip":
        return gzip.decompress(answer.body)
    if encoding == b"deflate":
        return zlib.decompress(answer.body)
    if encoding == b"br":
        return bytes(brotlicffi.decompress(answer.body))
    assert not encoding, encoding
    return answer.body


def removed_once(body: bytes, part: bytes) -> bytes:
    if not part:
        return body
    assert body.count(part) == 1, (part, body)
    return body.replace(part, b"")


def assert_same_answer(
    direct: Answer, proxied: Answer, framing: tuple[bytes, bytes] = (b"", b"")
) -> None:
    """Status line, end-to-end headers and body bytes agree, up to the normalisation above.

    ``framing``: the request-framing header httpbin echoes direct, and the one it echoes through
    the proxy instead (see ``Case.framing``); each removed once from its side before comparing.
    """
    assert not ECHOED_FORWARDED_HOST.search(decoded(direct))
    assert (proxied.status, proxied.reason) == (direct.status, direct.reason)
    assert end_to_end(proxied) == end_to_end(direct)
    proxied_decoded = decoded(proxied)
    proxied_body, echoes = ECHOED_FORWARDED_HOST.subn(b"", proxied_decoded)
    if echoes or framing != (b"", b""):  # an echo: compared decoded, normalised
        proxied_body = removed_once(proxied_body, framing[1])
        assert proxied_body == removed_once(decoded(direct), framing[0])
    else:  # the payload exactly as it was on the wire, encoded or not
        assert proxied.body == direct.body
    for answer in (direct, proxied):
        for length in answer.values("Content-Length"):
            if not (answer.chunked or answer.bodiless):
                assert int(length) == len(answer.body), answer.head
    direct_length = direct.values("Content-Length")
    proxied_length = proxied.values("Content-Length")
    encoded = proxied_decoded is not proxied.body
    if direct_length and proxied_length and not encoded:
        difference = int(proxied_length[0]) - int(direct_length[0])
        if proxied.method == "HEAD":  # the length of the GET answer, whose echo we cannot see
            assert difference in (0, len(PRETTY_ECHO))
        else:
            assert difference == len(proxied_decoded) - len(proxied_body) - len(framing[0])


def replayed_header_added(first: Answer) -> bytes:
    """``first`` as it would read with ``Idempotent-Replayed: true`` as its last header line."""
    assert first.head.endswith(b"\r\n\r\n")
    return first.head[:-2] + b"Idempotent-Replayed: true\r\n\r\n" + first.wire_body


def assert_exact_replay(first: Answer, replay: Answer) -> None:
    """The replay is the first answer byte for byte, plus ``Idempotent-Replayed: true``."""
    assert first.values("Idempotent-Replayed") == []
    assert replay.values("Idempotent-Replayed") == [b"true"]
    assert replay.raw == replayed_header_added(first)


# --- the matrix ------------------------------------------------------------------------------


@dataclass
class Case:
    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    id: str = ""
    # Request framing that reaches httpbin differently through the proxy, so that its echo of
    # the request headers differs: (echoed direct, echoed through the proxy). See NO_LENGTH.
    framing: tuple[bytes, bytes] = (b"", b"")
    raw_body: bytes = b""  # sent as is after the head (a chunked body), no Content-Length

    def bytes(self, *extra: tuple[str, str]) -> bytes:
        head = request(self.method, self.target, [*self.headers, *extra, PROBE], self.body)
        return head + self.raw_body


def case(
    method: str,
    target: str,
    *headers: tuple[str, str],
    body: bytes | None = None,
    raw_body: bytes = b"",
) -> Case:
    name = f"{method} {target}" + (" chunked" if raw_body else "")
    return Case(method, target, list(headers), body, name, raw_body=raw_body)


JSON = ("Content-Type", "application/json")
FORM = ("Content-Type", "application/x-www-form-urlencoded")
BOUNDARY = "issue14-boundary-7f3c"
MULTIPART_TYPE = ("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
MULTIPART = (
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="sku"\r\n\r\n'
    "tea\r\n"
    f"--{BOUNDARY}\r\n"
    'Content-Disposition: form-data; name="file"; filename="a.txt"\r\n'
    "Content-Type: text/plain\r\n\r\n"
    "hello, upstream\r\n"
    f"--{BOUNDARY}--\r\n"
).encode()
JSON_BODY = b'{"sku": "tea", "qty": 1}'
# Request framing is per connection (RFC 9112 6.3), and the proxy reframes two requests without
# changing what they mean: a GET or DELETE with "Content-Length: 0" reaches httpbin without that
# header (no content either way, RFC 9110 8.6; a POST keeps it), and a chunked request body on a
# keyed route, which the proxy reads whole to fingerprint it, reaches httpbin with a
# Content-Length. httpbin echoes those framing headers; only they are left out of the comparison.
NO_LENGTH = (b'\n    "Content-Length": "0",', b"")
CHUNKED = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
CHUNKED_TO_LENGTH = (b'\n    "Transfer-Encoding": "chunked",', b'\n    "Content-Length": "11",')
FORM_BODY = b"sku=tea&qty=1&qty=2"

PASSTHROUGH = [
    case("GET", "/get?a=1&a=2&b=%20x"),
    case("POST", "/post", JSON, body=JSON_BODY),
    case("POST", "/post", FORM, body=FORM_BODY),
    case("POST", "/post", MULTIPART_TYPE, body=MULTIPART),
    case("PUT", "/put", JSON, body=JSON_BODY),
    case("PATCH", "/patch", FORM, body=FORM_BODY),
    case("DELETE", "/delete"),
    *(case("GET", f"/status/{code}") for code in (200, 201, 204, 304, 400, 404, 418, 500, 502)),
    case("GET", "/headers", ("Accept", "text/plain"), ("X-Two", "a"), ("X-Two", "b")),
    case("GET", "/response-headers?X-A=1&X-A=2"),
    case("GET", "/cookies/set?a=1&b=2&c=3"),
    case("GET", "/gzip", ("Accept-Encoding", "gzip")),
    case("GET", "/deflate", ("Accept-Encoding", "deflate")),
    case("GET", "/brotli", ("Accept-Encoding", "br")),
    case("GET", "/stream/20"),
    case("GET", "/stream-bytes/50000?chunk_size=1000&seed=14"),
    case("GET", "/range/1024", ("Range", "bytes=10-99")),
    case("GET", "/range/1024", ("Range", "bytes=2000-")),
    case("GET", "/redirect/2"),
    case("GET", "/etag/abc", ("If-None-Match", '"abc"')),
    case("GET", "/etag/abc", ("If-Match", '"abc"')),
    case("GET", "/etag/abc", ("If-Match", '"xyz"')),
    case("GET", "/bytes/100000?seed=14"),
    case("GET", "/drip?duration=0.5&numbytes=10&code=200&delay=0"),
    case("TRACE", "/anything/t"),
    case("PROPFIND", "/anything/p"),
    case("DELETE", "/anything/d", JSON, body=JSON_BODY),
    *(
        Case(method, f"/anything/{method}", [], b"", f"{method} empty body", NO_LENGTH)
        for method in ("GET", "DELETE")
    ),
    case("POST", "/anything/post-empty", body=b""),
    case("POST", "/anything/chunked", ("Transfer-Encoding", "chunked"), raw_body=CHUNKED),
    case("HEAD", "/get"),
    case("OPTIONS", "/get"),
    case("OPTIONS", "/post"),
    case("GET", "/xml"),
    case("GET", "/image/png", ("Accept", "image/png")),
    case("GET", "/encoding/utf8"),
    case("GET", "/base64/aWRlbXByb3h5"),
    case("GET", "/cache/60"),
    case("GET", "/basic-auth/u/p", ("Authorization", "Basic dTpw")),
    case("GET", "/basic-auth/u/p"),
    case("GET", "/deny"),
]


@pytest.mark.parametrize("c", PASSTHROUGH, ids=lambda c: c.id)
def test_passthrough_answers_as_httpbin_does(
    c: Case, httpbin: HttpbinProcess, proxy: ProxyProcess
) -> None:
    direct = exchange(httpbin.port, c.bytes())
    proxied = exchange(proxy.port, c.bytes())
    assert_same_answer(direct, proxied, c.framing)
    assert proxied.values("Idempotent-Replayed") == []
    assert proxied.chunked == direct.chunked  # streamed answers stay chunked (SPEC 5)


KEYED = [
    case("POST", "/post", JSON, body=JSON_BODY),
    case("POST", "/post", FORM, body=FORM_BODY),
    case("POST", "/post", MULTIPART_TYPE, body=MULTIPART),
    case("PUT", "/put", JSON, body=JSON_BODY),
    case("PATCH", "/patch", FORM, body=FORM_BODY),
    case("DELETE", "/delete"),
    case("POST", "/status/200"),
    # httpbin's reason phrases are its own ('201 CREATED'): kept, first answer and replay
    *(case("POST", f"/status/{code}") for code in (201, 204, 400, 404, 418, 500)),
    case("POST", "/response-headers?X-A=1&X-A=2&Set-Cookie=a%3D1&Set-Cookie=b%3D2"),
    case("POST", "/anything/keyed/odd", ("Accept-Encoding", "gzip"), JSON, body=JSON_BODY),
    case("PATCH", "/anything/keyed/odd", body=b"\x00\xff binary \r\n\r\n"),
    Case(
        "POST",
        "/post",
        [("Transfer-Encoding", "chunked")],
        None,
        "POST /post chunked",
        CHUNKED_TO_LENGTH,
        CHUNKED,
    ),
]


@pytest.mark.parametrize("c", KEYED, ids=lambda c: c.id)
def test_keyed_first_answer_as_httpbin_and_replay_byte_for_byte(
    c: Case, httpbin: HttpbinProcess, proxy: ProxyProcess
) -> None:
    key = ("Idempotency-Key", f"httpbin-{uuid.uuid4().hex}")
    direct = exchange(httpbin.port, c.bytes(key))
    first = exchange(proxy.port, c.bytes(key))
    replay = exchange(proxy.port, c.bytes(key))
    assert_exact_replay(first, replay)
    assert_same_answer(direct, first, c.framing)


def test_an_upstream_idempotent_replayed_header_passes_on_a_first_answer(
    httpbin: HttpbinProcess, proxy: ProxyProcess
) -> None:
    c = case("POST", "/response-headers?Idempotent-Replayed=false")
    key = ("Idempotency-Key", f"httpbin-{uuid.uuid4().hex}")
    direct = exchange(httpbin.port, c.bytes(key))
    first = exchange(proxy.port, c.bytes(key))
    assert_same_answer(direct, first)
    assert first.values("Idempotent-Replayed") == [b"false"]


def test_a_replay_has_one_idempotent_replayed_header_ours(proxy: ProxyProcess) -> None:
    c = case("POST", "/response-headers?Idempotent-Replayed=false")
    key = ("Idempotency-Key", f"httpbin-{uuid.uuid4().hex}")
    first = exchange(proxy.port, c.bytes(key))
    replay = exchange(proxy.port, c.bytes(key))
    assert first.values("Idempotent-Replayed") == [b"false"]
    assert replay.values("Idempotent-Replayed") == [b"true"]
    assert replay.body == first.body


# --- Expect: 100-continue, with curl ---------------------------------------------------------

CURL = shutil.which("curl")
BIG = 2_500_000  # over max_request_body (1MiB): a keyed route refuses it at once
SMALL = 500_000


@dataclass
class Upload:
    target: str
    size: int
    key: bool
    status: int
    continued: bool  # a 100 Continue before the final answer
    id: str


UPLOADS = [
    Upload("/anything/up", BIG, False, 200, True, "direct"),
    Upload("/anything/up", BIG, False, 200, True, "unmatched"),
    Upload("/put", BIG, False, 200, True, "keyed route, no key"),
    Upload("/put", SMALL, True, 200, True, "keyed"),
    Upload("/put", BIG, True, 413, False, "keyed, too large: 413 at once"),
    Upload("/anything/required", SMALL, False, 400, False, "key required, none: 400 at once"),
]


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("upload", UPLOADS, ids=lambda u: u.id if isinstance(u, Upload) else str(u))
def test_curl_upload_with_expect_100_continue_never_waits_for_its_fallback_timer(
    upload: Upload, httpbin: HttpbinProcess, proxy: ProxyProcess, workdir: Path
) -> None:
    """SPEC 5, the HTTP edge: 100 Continue when ready for the body, or the final answer at once.

    Asserted on curl's own account of the exchange (``-v``), not on elapsed time: curl says
    ``Done waiting for 100-continue`` when its fallback timer sent the body unasked.
    """
    assert CURL is not None
    port = httpbin.port if upload.id == "direct" else proxy.port
    payload = workdir / f"upload-{upload.size}.bin"
    if not payload.exists():
        payload.write_bytes(bytes(range(256)) * (upload.size // 256) + b"x" * (upload.size % 256))
    headers = ["-H", "Expect: 100-continue", "-H", f"Host: {VIRTUAL_HOST}"]
    if upload.key:
        headers += ["-H", f"Idempotency-Key: httpbin-{uuid.uuid4().hex}"]
    result = subprocess.run(
        [
            CURL,
            "--silent",
            "--show-error",
            "--verbose",
            "--max-time",
            "20",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
            *headers,
            "--upload-file",
            str(payload),
            f"http://{HOST}:{port}{upload.target}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == str(upload.status)
    assert "> Expect: 100-continue" in result.stderr
    assert "Done waiting for 100-continue" not in result.stderr
    assert ("< HTTP/1.1 100 Continue" in result.stderr) == upload.continued


# --- the same on the Redis store -------------------------------------------------------------

REDIS_KEYED = [KEYED[0], KEYED[2], KEYED[6]]


@pytest.mark.parametrize("c", REDIS_KEYED, ids=lambda c: c.id)
def test_keyed_on_redis_first_answer_as_httpbin_and_replay_byte_for_byte(
    c: Case, httpbin: HttpbinProcess, redis_proxy: ProxyProcess
) -> None:
    key = ("Idempotency-Key", f"httpbin-{uuid.uuid4().hex}")
    direct = exchange(httpbin.port, c.bytes(key))
    first = exchange(redis_proxy.port, c.bytes(key))
    replay = exchange(redis_proxy.port, c.bytes(key))
    assert_exact_replay(first, replay)
    assert_same_answer(direct, first, c.framing)


# --- real clients: httpx and requests --------------------------------------------------------

# What these clients send and the proxy legitimately changes, as httpbin echoes it: the
# X-Forwarded-Host it adds, and Connection, a hop-by-hop header it removes (SPEC 5).
CLIENT_ECHO_IGNORED = ("X-Forwarded-Host", "Connection")
CLIENT_HEADERS_IGNORED = {"date", "server", "content-length", *(h.decode() for h in HOP_BY_HOP)}


def scrubbed(document: object) -> object:
    if isinstance(document, dict):
        echoed = document.get("headers")
        if isinstance(echoed, dict):
            document["headers"] = {k: v for k, v in echoed.items() if k not in CLIENT_ECHO_IGNORED}
    return document


def comparable(content: bytes) -> object:
    """A JSON answer (or JSON lines) with the echoes above removed; anything else as bytes."""
    try:
        return scrubbed(json.loads(content))
    except ValueError:
        pass
    try:
        return [scrubbed(json.loads(line)) for line in content.splitlines()]
    except ValueError:
        return content


def header_items(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in items if k.lower() not in CLIENT_HEADERS_IGNORED]


CLIENT_PATHS = [
    "/redirect/3",
    "/cookies/set?a=1&b=2",
    "/gzip",
    "/deflate",
    "/brotli",
    "/stream/5",
    "/response-headers?X-A=1&X-A=2",
    "/status/418",
    "/bytes/4096?seed=14",
    "/etag/v1",
]


def httpx_get(port: int, path: str) -> tuple[list[int], int, list[tuple[str, str]], object]:
    headers = {"Host": VIRTUAL_HOST, "X-Probe": "idemproxy"}
    with httpx.Client(
        base_url=f"http://{HOST}:{port}", headers=headers, follow_redirects=True, timeout=15
    ) as client:
        response = client.get(path)
        history = [r.status_code for r in response.history]
        items = header_items(response.headers.multi_items())
        return history, response.status_code, items, comparable(response.content)


def requests_get(port: int, path: str) -> tuple[list[int], int, list[tuple[str, str]], object]:
    with requests.Session() as session:
        session.headers.update({"Host": VIRTUAL_HOST, "X-Probe": "idemproxy"})
        response = session.get(f"http://{HOST}:{port}{path}", timeout=15)
        history = [r.status_code for r in response.history]
        items = header_items(response.raw.headers.items())
        return history, response.status_code, items, comparable(response.content)


@pytest.mark.parametrize("path", CLIENT_PATHS)
@pytest.mark.parametrize("get", [httpx_get, requests_get], ids=["httpx", "requests"])
def test_real_clients_see_the_same_answers_direct_and_through_the_proxy(
    get: object, path: str, httpbin: HttpbinProcess, proxy: ProxyProcess
) -> None:
    assert get is httpx_get or get is requests_get
    assert get(proxy.port, path) == get(httpbin.port, path)


def test_httpx_keyed_post_replays_what_it_first_answered(
    httpbin: HttpbinProcess, proxy: ProxyProcess
) -> None:
    headers = {"Host": VIRTUAL_HOST, "Idempotency-Key": f"httpx-{uuid.uuid4().hex}"}
    answers = []
    for port in (httpbin.port, proxy.port, proxy.port):
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=15) as client:
            answers.append(client.post("/post", json={"sku": "tea"}, headers=headers))
    direct, first, replay = answers
    assert first.status_code == replay.status_code == direct.status_code == 200
    assert replay.content == first.content
    assert comparable(first.content) == comparable(direct.content)
    assert "Idempotent-Replayed" not in first.headers
    assert replay.headers.get_list("Idempotent-Replayed") == ["true"]
    without_marker = [(k, v) for k, v in replay.headers.multi_items() if k != "idempotent-replayed"]
    assert without_marker == first.headers.multi_items()


def test_requests_multipart_retry_of_the_same_prepared_request_is_a_replay(
    httpbin: HttpbinProcess, proxy: ProxyProcess
) -> None:
    """A retry is the same bytes: requests draws a new multipart boundary per request, so a
    retry resends the prepared request (a fresh one would be another request, a 422)."""
    key = f"requests-{uuid.uuid4().hex}"

    def prepare(session: requests.Session, port: int) -> requests.PreparedRequest:
        return session.prepare_request(
            requests.Request(
                "POST",
                f"http://{HOST}:{port}/post",
                headers={"Host": VIRTUAL_HOST, "Idempotency-Key": key},
                data={"sku": "tea"},
                files={"file": ("a.txt", b"hello, upstream", "text/plain")},
            )
        )

    with requests.Session() as session:
        direct = session.send(prepare(session, httpbin.port), timeout=15)
        retried = prepare(session, proxy.port)
        answers = [direct, *(session.send(retried, timeout=15) for _ in range(2))]
    direct, first, replay = answers
    assert first.status_code == replay.status_code == direct.status_code == 200
    assert replay.content == first.content
    echoed = comparable(first.content)
    expected = comparable(direct.content)
    assert isinstance(echoed, dict)
    assert isinstance(expected, dict)
    assert echoed["files"] == expected["files"] == {"file": "hello, upstream"}
    assert echoed["form"] == expected["form"] == {"sku": "tea"}
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers


# --- big response heads (SPEC 5: up to 64 KiB and 256 fields, on every path) ----------------

BIG_HEADS = {
    "one 9 KB header": "X-Big=" + "b" * 9000,
    "200 headers": "&".join(f"X-H{i:03d}={i}" for i in range(200)),
}
BIG_HEAD_CASES = [
    pytest.param(name, method, body, keyed, id=f"{name}, {label}")
    for name in BIG_HEADS
    for method, body, keyed, label in (
        ("GET", None, False, "GET"),
        ("POST", b"", False, "POST, empty body, no key"),
        ("POST", b"x", False, "POST, body, no key"),
        ("POST", b"x", True, "POST, body, keyed"),
    )
]


@pytest.mark.parametrize(("name", "method", "body", "keyed"), BIG_HEAD_CASES)
def test_big_response_heads_are_relayed_on_every_path(
    name: str,
    method: str,
    body: bytes | None,
    keyed: bool,
    httpbin: HttpbinProcess,
    proxy: ProxyProcess,
) -> None:
    c = case(method, f"/response-headers?{BIG_HEADS[name]}", body=body)
    key = [("Idempotency-Key", f"httpbin-{uuid.uuid4().hex}")] if keyed else []
    direct = exchange(httpbin.port, c.bytes(*key))
    assert direct.status == 200
    assert len(direct.headers) > 200 or len(direct.head) > 9000
    assert_same_answer(direct, exchange(proxy.port, c.bytes(*key)))


# --- schemathesis over httpbin's own API description -----------------------------------------

# Not generated: /delay and /drip wait as long as the generated numbers say; /redirect-to sends
# the client to any URL it is given (redirects are not followed here either way).
SCHEMA_SKIPPED = ("/delay/", "/drip", "/redirect-to")


def schema_failures(case: schemathesis.Case[Any], response: schemathesis.Response) -> list[str]:
    """The names of schemathesis' default checks this response fails, sorted."""
    try:
        case.validate_response(response)
    except BaseException as error:  # a FailureGroup, or one failure
        failures = getattr(error, "exceptions", [error])
        return sorted({f"{type(f).__name__}: {getattr(f, 'title', f)}" for f in failures})
    return []


@pytest.mark.slow
def test_schemathesis_finds_the_same_failures_direct_and_through_the_proxy(
    httpbin: HttpbinProcess, proxy: ProxyProcess
) -> None:
    """httpbin's Swagger document (/spec.json, served with flasgger) drives schemathesis: each
    generated request goes direct and through the proxy, with an Idempotency-Key on unsafe
    methods (keyed routes answer, then replay); status and failed checks must agree."""
    schema = schemathesis.openapi.from_url(f"{httpbin.url}/spec.json")
    proxy_url = f"http://{HOST}:{proxy.port}"
    generated, replays, unusable = [], [], []

    def compare(case: schemathesis.Case[Any]) -> None:
        headers = {"Host": VIRTUAL_HOST}
        if case.method.upper() in ("POST", "PUT", "PATCH", "DELETE"):
            headers["Idempotency-Key"] = f"schema-{uuid.uuid4().hex}"
        direct, proxied, again = (
            case.call(base_url=url, headers=headers, allow_redirects=False, timeout=15)
            for url in (httpbin.url, proxy_url, proxy_url)
        )
        label = f"{case.method} {case.formatted_path} {case.query}"
        generated.append(label)
        assert proxied.status_code == direct.status_code, label
        assert schema_failures(case, proxied) == schema_failures(case, direct), label
        if "idempotent-replayed" in again.headers:
            replays.append(label)
            assert (again.status_code, again.content) == (proxied.status_code, proxied.content)

    settings = hypothesis.settings(
        max_examples=3,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        if operation.path.startswith(SCHEMA_SKIPPED):
            continue
        test = settings(hypothesis.given(case=operation.as_strategy())(compare))
        try:
            test()
        except schemathesis.errors.InvalidSchema:
            unusable.append(f"{operation.method} {operation.path}")  # httpbin's "type": "int"
    assert len(generated) > 50
    assert replays
    assert len(unusable) < 10, unusable


def test_the_proxy_logged_nothing_but_info_lines_for_all_of_the_above(proxy: ProxyProcess) -> None:
    """Last in this file, so it reads the log of every case above (fewer when selected with -k):
    one JSON line each, none above INFO, no traceback."""
    lines = proxy.log.read_text().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert entry["level"] == "info", line
        assert "exc_info" not in entry
        assert "Traceback" not in line
