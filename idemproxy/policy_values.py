"""The small value languages of the policy file: durations, sizes, HOST:PORT addresses (and
whether one is loopback), RFC 9110 tokens."""

from __future__ import annotations

import ipaddress
import re

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB)?$")
_SIZE_FACTORS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def parse_duration(value: object) -> float:
    """'250ms', '30s', '5m', '24h', '7d' -> seconds. A bare number is refused: say the unit."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"expected a duration such as 250ms, 30s, 5m, 24h or 7d, got {value!r}")
    match = _DURATION.match(value.strip())
    if match is None:
        raise ValueError(f"invalid duration {value!r}: use a number with ms, s, m, h or d")
    seconds = float(match.group(1)) * _DURATION_FACTORS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be greater than zero")
    return seconds


def parse_size(value: object) -> int:
    """'512KiB', '1MiB', '2048' or 2048 -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 512KiB, 1MiB or a byte count, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value} must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 512KiB, 1MiB or a byte count, got {value!r}")
    match = _SIZE.match(value.strip())
    if match is None:
        raise ValueError(f"invalid size {value!r}: use bytes or a number with B, KiB, MiB or GiB")
    return int(match.group(1)) * _SIZE_FACTORS[match.group(2)]


def parse_host_port(value: object) -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:8080', ':8080' (all interfaces) -> (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid port in {value!r}")
    # An empty host means every interface, as the operator wrote ":8080".
    return host or "0.0.0.0", int(port_text)  # noqa: S104


def is_loopback(host: str) -> bool:
    """Whether ``host`` only reaches this machine: 127.0.0.0/8, ::1 (also as ::ffff:127.x) or
    ``localhost``. Any other name counts as reachable from elsewhere: it may resolve to anything."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_token(value: str) -> bool:
    """RFC 9110 token: header field names and method names."""
    return bool(_TOKEN.match(value))


def pointer_tokens(pointer: str) -> tuple[str, ...]:
    """An RFC 6901 JSON Pointer's reference tokens: ``/meta/a~1b`` -> ``("meta", "a/b")``
    (section 4: ~1 first, then ~0)."""
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:])
