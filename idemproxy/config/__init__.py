"""Policy file: YAML -> ${VAR} expansion -> validated, frozen settings.

Loading happens in three steps, each collecting every problem instead of stopping at the first:

1. ``reader`` turns the YAML node tree into plain values and remembers the line of each field
   path (``routes[2].ttl`` -> 14), expanding ``${VAR}`` / ``${VAR:-default}`` in every string.
2. ``build`` checks those values against the ``*File`` dataclasses of ``model``, which mirror
   the file one to one; unknown fields are errors, so a typo can never silently disable
   protection. ``model`` also holds the built-in defaults, and the JSON Schema is generated
   from it.
3. ``resolve`` merges ``defaults`` into every route and produces the ``settings.Config`` the
   proxy runs on.

The request path imports ``idemproxy.settings`` only; this package is for start and reload.
The settings are re-exported here for callers that load and then read them.
"""

from idemproxy.config.build import parse_json_pointer, parse_status
from idemproxy.config.model import BUILTIN_DEFAULTS, Overrides, PolicyDocument
from idemproxy.config.resolve import load, load_text
from idemproxy.errors import ConfigError
from idemproxy.settings import (
    Config,
    FingerprintPolicy,
    KeyPolicy,
    KeySource,
    Limits,
    RoutePolicy,
    StoreConfig,
    UpstreamConfig,
)

__all__ = [
    "BUILTIN_DEFAULTS",
    "Config",
    "ConfigError",
    "FingerprintPolicy",
    "KeyPolicy",
    "KeySource",
    "Limits",
    "Overrides",
    "PolicyDocument",
    "RoutePolicy",
    "StoreConfig",
    "UpstreamConfig",
    "load",
    "load_text",
    "parse_json_pointer",
    "parse_status",
]
