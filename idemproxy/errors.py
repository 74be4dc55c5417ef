"""The exceptions idemproxy raises and the problem+json answers it makes.

::

    IdemproxyError
    ├── ConfigError          invalid policy file or flags; carries every problem found
    ├── StoreUnavailable     the store did not answer (connection refused, timeout)
    └── ProblemError         a request the proxy answers itself with a problem+json (RFC 9457)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from idemproxy.aiohttp_internals import VerbatimResponse

PROBLEM_BASE_URI = "https://idemproxy.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a policy file: where (field path, line) and what."""

    path: str
    message: str
    line: int | None = None

    def render(self, source: str | None = None) -> str:
        where = source or "config"
        if self.line is not None:
            where = f"{where}:{self.line}"
        field = f"{self.path}: " if self.path else ""
        return f"{where}: {field}{self.message}"


class IdemproxyError(Exception):
    """Base of every error idemproxy raises on purpose."""


class ConfigError(IdemproxyError):
    def __init__(self, problems: list[ConfigProblem], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(p.render(source) for p in problems))


class StoreUnavailable(IdemproxyError):
    """The store could not be reached or did not answer in time.

    ``maybe_applied`` is False when the command surely never reached the store (the connection
    was refused), True when it may have run with its reply lost (timeout, dropped connection).
    """

    def __init__(self, message: str, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


# code -> (status, title). The codes are the stable contract of SPEC section 4.
PROBLEMS: dict[str, tuple[int, str]] = {
    "idempotency_key_missing": (400, "Idempotency key missing"),
    "idempotency_key_invalid": (400, "Idempotency key invalid"),
    "request_too_large": (413, "Request body too large"),
    "request_in_progress": (409, "Request in progress"),
    "idempotency_key_reused": (422, "Idempotency key reused"),
    "response_not_replayable": (409, "Response not replayable"),
    "upstream_unavailable": (502, "Upstream unavailable"),
    "upstream_timeout": (504, "Upstream timeout"),
    "store_unavailable": (503, "Store unavailable"),
    "precondition_required": (428, "Precondition required"),
    "precondition_failed": (412, "Precondition failed"),
    "request_timeout": (408, "Request too slow"),
    "invalid_request_target": (400, "Request target not supported"),
    "proxy_overloaded": (503, "Too many keyed requests in progress"),
    # the admin listener's own answers
    "unauthorized": (401, "Admin token missing or wrong"),
    "key_not_found": (404, "No record for this key"),
    "keys_api_disabled": (404, "The keys API is disabled"),
}


UpstreamFailureKind = Literal["connect", "timeout", "broken"]


class UpstreamFailure(IdemproxyError):
    """The upstream gave no answer. ``kind`` says whether the request may have run: not for
    ``connect`` (nothing was sent), maybe for ``timeout`` and ``broken``."""

    def __init__(self, kind: UpstreamFailureKind, detail: str) -> None:
        self.kind: UpstreamFailureKind = kind
        super().__init__(detail)


class AnswerCutShort(IdemproxyError):
    """An answer already under way to the client broke off (its status line was sent).

    ``side`` says whose end failed: the upstream stopped sending, or the client went away.
    Either is routine traffic, not a bug: logged as one event line, never a traceback.
    """

    def __init__(self, status: int, side: Literal["upstream", "client"], detail: str) -> None:
        self.status = status
        self.side = side
        super().__init__(detail)


class ProblemError(IdemproxyError):
    def __init__(self, code: str, detail: str, retry_after: int | None = None) -> None:
        self.code = code
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(f"{code}: {detail}")

    @property
    def status(self) -> int:
        return PROBLEMS[self.code][0]

    def body(self) -> bytes:
        status, title = PROBLEMS[self.code]
        problem = {
            "type": PROBLEM_BASE_URI + self.code.replace("_", "-"),
            "title": title,
            "status": status,
            "detail": self.detail,
            "code": self.code,
        }
        return json.dumps(problem).encode()

    def headers(self) -> list[tuple[str, str]]:
        headers = [("Content-Type", PROBLEM_CONTENT_TYPE)]
        if self.retry_after is not None:
            headers.append(("Retry-After", str(self.retry_after)))
        if self.code == "unauthorized":
            headers.append(("WWW-Authenticate", 'Bearer realm="idemproxy-admin"'))
        return headers

    def response(self) -> web.Response:
        # Verbatim, so that a stored problem replays with exactly the headers it first had.
        resp = VerbatimResponse(status=self.status, body=self.body())
        for name, value in self.headers():
            resp.headers[name] = value
        return resp
