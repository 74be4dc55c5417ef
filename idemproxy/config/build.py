"""Step 2 of loading: plain values -> the ``*File`` dataclasses of ``model``, checked field by
field; unknown fields are errors, so a typo can never silently disable protection."""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from idemproxy.errors import ConfigProblem
from idemproxy.policy_values import parse_duration, parse_host_port, parse_size


class Invalid:
    """Marks a value that failed validation (its problem is already recorded)."""


INVALID = Invalid()


_PARENT_STEP = re.compile(r"(\.?[^.\[\]]+|\[\d+\])$")


class Builder:
    def __init__(
        self,
        lines: dict[str, int],
        problems: list[ConfigProblem],
        expanded: dict[str, str] | None = None,
    ) -> None:
        self.lines = lines
        self.problems = problems
        # path -> text of an unquoted ${VAR} scalar: a string field takes it as expanded, so
        # `token: ${TOKEN}` stays "12345" or "null" instead of becoming a number or nothing.
        self.expanded = expanded or {}

    def problem(self, path: str, message: str) -> Invalid:
        """Record a problem at ``path``, with the line of the path or of its closest parent.

        A command-line flag (``--admin``) is not written in the file, so it gets no line.
        """
        line, parent = self.lines.get(path), path
        while line is None and parent and not path.startswith("--"):
            parent = _PARENT_STEP.sub("", parent)
            line = self.lines.get(parent)
        self.problems.append(ConfigProblem(path, message, line))
        return INVALID

    def build(self, hint: Any, value: object, path: str) -> Any:
        origin = get_origin(hint)
        if origin in (Union, types.UnionType):
            options = [arg for arg in get_args(hint) if arg is not type(None)]
            if value is None and not (options[0] is str and path in self.expanded):
                return None
            return self.build(options[0], value, path)
        if origin is Annotated:
            base, marker = get_args(hint)
            return self._annotated(base, marker, value, path)
        if origin is Literal:
            choices = get_args(hint)
            if value not in choices:
                allowed = ", ".join(str(c) for c in choices)
                return self.problem(path, f"must be one of {allowed}, got {value!r}")
            return value
        if origin is list:
            (item_hint,) = get_args(hint)
            if not isinstance(value, list):
                return self.problem(path, f"expected a list, got {kind_of(value)}")
            items = [self.build(item_hint, item, f"{path}[{i}]") for i, item in enumerate(value)]
            return [item for item in items if item is not INVALID]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            return self._dataclass(hint, value, path)
        if hint is bool:
            if not isinstance(value, bool):
                return self.problem(path, f"expected true or false, got {value!r}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return self.problem(path, f"expected a whole number, got {value!r}")
            return value
        if hint is str:
            if not isinstance(value, str) and path in self.expanded:
                return self.expanded[path]
            if not isinstance(value, str):
                return self.problem(path, f"expected a string, got {kind_of(value)}")
            return value
        raise TypeError(f"unsupported config type {hint!r}")  # pragma: no cover - a coding error

    def _annotated(self, base: Any, marker: str, value: object, path: str) -> Any:
        parser = {
            "duration": parse_duration,
            "size": parse_size,
            "host:port": parse_host_port,
            "status": parse_status,
            "json-pointer": parse_json_pointer,
            "ratio": parse_ratio,
        }
        try:
            parsed = parser[marker](value)
        except ValueError as exc:
            return self.problem(path, str(exc))
        return value if base is str else parsed

    def _dataclass(self, cls: type[Any], value: object, path: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            return self.problem(path, f"expected a mapping, got {kind_of(value)}")
        hints = get_type_hints(cls, include_extras=True)
        by_yaml_name = {f.metadata.get("yaml", f.name): f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, raw in value.items():
            shown = str(name) or "''"
            child = f"{path}.{shown}" if path else shown
            spec = by_yaml_name.get(name)
            if spec is None and not path and str(name).startswith("x-"):
                continue  # top-level x-* fields hold YAML anchors for reuse, as in Compose files
            if spec is None:
                known = ", ".join(sorted(by_yaml_name))
                self.problem(child, f"unknown field (known fields: {known})")
                continue
            built = self.build(hints[spec.name], raw, child)
            # An invalid field is left out (its problem is recorded) so that later checks
            # still run on the rest and every problem is reported in one go.
            if built is not INVALID:
                kwargs[spec.name] = built
        return cls(**kwargs)


_STATUS_CLASS = re.compile(r"[1-5]xx")


def parse_status(value: object) -> int | str:
    """A ``release_statuses`` entry: a status code (100 to 599) or a class, ``1xx`` to ``5xx``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 100 <= value <= 599:
            raise ValueError(f"{value} is not an HTTP status (100 to 599)")
        return value
    if isinstance(value, str) and _STATUS_CLASS.fullmatch(value):
        return value
    if isinstance(value, str) and _STATUS_CLASS.fullmatch(value.lower()):
        raise ValueError(f"write the status class {value!r} as {value.lower()}")
    if isinstance(value, str) and re.fullmatch(r"\dxx", value):
        raise ValueError(f"{value} is not an HTTP status class (1xx to 5xx)")
    raise ValueError(f"expected a status code like 503 or a class like 5xx, got {value!r}")


def parse_ratio(value: object) -> float:
    """A number from 0 to 1 (``tracing.sample_ratio``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number from 0 to 1, got {kind_of(value)}")
    if not 0 <= value <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {value!r}")
    return float(value)


_MEMBER_POINTER = re.compile(r"(/([^~/]|~[01])*)+")


def parse_json_pointer(value: object) -> str:
    """An ``fingerprint.ignore`` entry: an RFC 6901 JSON Pointer to a member, not the root."""
    if not isinstance(value, str):
        raise ValueError(f"expected a JSON pointer like /sent_at, got {kind_of(value)}")
    if value == "":
        raise ValueError(
            "the empty pointer is the whole body; to leave the body out of the fingerprint, "
            "remove body from fingerprint.include"
        )
    if not _MEMBER_POINTER.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a JSON pointer (RFC 6901): it starts with / and writes ~ as ~0, "
            "/ inside a name as ~1"
        )
    return value


def status_codes(entries: list[int | str]) -> frozenset[int]:
    """The codes ``release_statuses`` names: a class ``4xx`` stands for 400 to 499."""
    codes: set[int] = set()
    for entry in entries:
        if isinstance(entry, int):
            codes.add(entry)
        else:
            first = int(entry[0]) * 100
            codes.update(range(first, first + 100))
    return frozenset(codes)


def kind_of(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
