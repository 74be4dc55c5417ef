"""Helpers for tests that load policy text: dedent it, load it, and read its problems."""

from __future__ import annotations

import textwrap

import pytest

from idemproxy.config import Config, ConfigError, RoutePolicy, load_text
from idemproxy.errors import ConfigProblem


def yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def config(text: str, environ: dict[str, str] | None = None) -> Config:
    return load_text(yaml(text), "policy.yaml", None, environ or {})


def problems(text: str, environ: dict[str, str] | None = None) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_text(yaml(text), "policy.yaml", None, environ or {})
    assert info.value.problems, "a ConfigError must carry at least one problem"
    return info.value.problems


def only_problem(text: str, environ: dict[str, str] | None = None) -> ConfigProblem:
    found = problems(text, environ)
    assert len(found) == 1, found
    return found[0]


def route(cfg: Config, label: str) -> RoutePolicy:
    by_label = {r.label: r for r in cfg.routes}
    return by_label[label]
