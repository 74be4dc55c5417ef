"""Route matching: patterns are compiled once at load; matching is pure and allocation-light.

Pattern language: literal segments, ``{name}`` for exactly one segment, ``**`` as the last
segment for zero or more segments. Empty and dot segments are resolved on both sides, so
``/orders/``, ``//orders`` and ``/x/../orders`` match ``/orders``: a stray slash or a dot
segment must not slip past a keyed route.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import unquote


class Route(Protocol):
    """What matching needs of a route; ``config.RoutePolicy`` is one (policy imports no config,
    so that config can validate patterns with ``check_pattern``)."""

    @property
    def path(self) -> str: ...

    @property
    def methods(self) -> frozenset[str]: ...


R = TypeVar("R", bound=Route)

_PARAM = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_]*\}$")


def check_pattern(pattern: str) -> str | None:
    """Return what is wrong with a path pattern, or None when it is valid."""
    if not pattern.startswith("/"):
        return f"path pattern {pattern!r} must start with /"
    segments = _segments(pattern)
    names: set[str] = set()
    for i, segment in enumerate(segments):
        if segment == "**":
            if i != len(segments) - 1:
                return f"in {pattern!r}: ** is only allowed as the last segment"
            continue
        if "{" in segment or "}" in segment:
            if not _PARAM.match(segment):
                return f"in {pattern!r}: {segment!r} is not a {{name}} placeholder (whole segment)"
            if segment in names:
                return f"in {pattern!r}: placeholder {segment} appears twice"
            names.add(segment)
        elif "*" in segment:
            return f"in {pattern!r}: * is only allowed as a whole ** last segment"
    return None


def _segments(path: str) -> list[str]:
    """Path segments with empty and ``.`` segments dropped and ``..`` applied (RFC 3986 5.2.4),
    so ``/x/../orders`` matches what an upstream that resolves dot segments will run."""
    return _resolved(path.split("/"))


def _encoded_slash_reading(raw_path: str) -> list[str] | None:
    """The segments of a raw request target that has an encoded slash, ``%2F`` kept inside its
    segment (RFC 3986: one segment), or None when only its query has one (both readings agree
    then)."""
    path = raw_path.partition("?")[0]
    if "%2F" not in path and "%2f" not in path:
        return None
    return _resolved([unquote(segment) for segment in path.split("/")])


def _resolved(parts: list[str]) -> list[str]:
    """``parts`` (a path split at "/") as ``_segments`` reads them."""
    segments: list[str] = []
    for segment in parts:
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    return segments


@dataclass(frozen=True, slots=True)
class _CompiledRoute(Generic[R]):
    route: R
    # None stands for a {name} placeholder
    segments: tuple[str | None, ...]
    open_ended: bool

    def matches(self, segments: list[str]) -> bool:
        fixed = self.segments
        if len(segments) < len(fixed) or (not self.open_ended and len(segments) != len(fixed)):
            return False
        # A loop, not all() over a generator: this runs for every route tried on every request.
        for want, got in zip(fixed, segments, strict=False):
            if want is not None and want != got:
                return False
        return True


class Policy(Generic[R]):
    """The ordered routes of one config; the first route that matches wins."""

    def __init__(self, routes: tuple[R, ...]) -> None:
        compiled = []
        for route in routes:
            segments = _segments(route.path)
            open_ended = bool(segments) and segments[-1] == "**"
            if open_ended:
                segments = segments[:-1]
            fixed = tuple(None if s.startswith("{") else s for s in segments)
            compiled.append(_CompiledRoute(route, fixed, open_ended))
        self._routes = tuple(compiled)

    def match(self, method: str, path: str, raw_path: str = "") -> R | None:
        """The first route that matches ``path`` (percent-decoded) or, when the raw target
        ``raw_path`` has a ``%2F``, its other reading: upstreams that split the path before
        decoding see ``/payments/a%2Fb/capture`` as ``{id}`` = ``a/b``, those that decode
        first as four segments, and neither must slip past a keyed route."""
        segments = _resolved(path.split("/"))  # _segments, one call less per request
        # Checked here first: the usual target has no %2F, and then no call is made for it.
        has_encoded_slash = "%2F" in raw_path or "%2f" in raw_path
        other = _encoded_slash_reading(raw_path) if has_encoded_slash else None
        for compiled in self._routes:
            if method in compiled.route.methods and (
                compiled.matches(segments) or (other is not None and compiled.matches(other))
            ):
                return compiled.route
        return None
