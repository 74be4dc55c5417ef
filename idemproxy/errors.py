"""The exceptions idemproxy raises and the problem+json answers it makes.

::

    IdemproxyError
    ├── ConfigError          invalid policy file or flags; carries every problem found
    ├── StoreUnavailable     the store did not answer (connection refused, timeout)
    ├── UpstreamFailure      the upstream gave no answer (``kind``: may the request have run?)
    ├── AnswerCutShort       an answer under way broke off (upstream or client side)
    ├── ClientGone           the client went away before its request was complete
    └── ProblemError         a request the proxy answers itself with a problem+json (RFC 9457)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from idemproxy.problems import PROBLEMS, Outcome

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


class ClientGone(IdemproxyError):
    """The client went away (reset, or closed its end) before its request body was complete,
    or (``answered``) after its request was handled but before its answer could go out.

    Routine traffic, not a bug: no answer can reach the client, so the request ends with
    status 499 in the access line and no traceback. Before its body was complete nothing is
    forwarded on a keyed route (outcome ``client_gone``); an ``answered`` request keeps the
    outcome it had (``new``, ``passthrough`` ...): the upstream did run it.
    """

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class ProblemError(IdemproxyError):
    """A request the proxy answers itself: a ``code`` of the catalogue in ``problems``."""

    def __init__(self, code: str, detail: str, retry_after: int | None = None) -> None:
        self.code = code
        self.detail = detail
        self.retry_after = retry_after
        super().__init__(f"{code}: {detail}")

    @property
    def status(self) -> int:
        return PROBLEMS[self.code].status

    @property
    def outcome(self) -> Outcome | None:
        return PROBLEMS[self.code].outcome

    def body(self) -> bytes:
        kind = PROBLEMS[self.code]
        problem = {
            "type": PROBLEM_BASE_URI + self.code.replace("_", "-"),
            "title": kind.title,
            "status": kind.status,
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
