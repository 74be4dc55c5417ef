"""``idemproxy keys get|delete KEY``: a small client of the admin keys API.

The admin token is read from ``$IDEMPROXY_ADMIN_TOKEN`` (never a flag: flags show in ``ps``).
``--admin`` is a URL or, as ``run --admin`` takes it, HOST:PORT.
Exit codes: 0 done, 1 no such key, 2 anything else (no token, refused, unreachable).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from idemproxy.policy_values import parse_host_port

TOKEN_ENV = "IDEMPROXY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret


def keys_command(
    action: str, key: str, scopes: list[str] | None, admin: str, with_body: bool
) -> int:
    if "://" not in admin:
        try:
            host, port = parse_host_port(admin)
        except ValueError as exc:
            print(f"idemproxy keys: --admin: {exc}", file=sys.stderr)
            return 2
        admin = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if urllib.parse.urlsplit(admin).scheme not in ("http", "https"):
        print(
            f"idemproxy keys: --admin must be an http(s) URL or HOST:PORT, got {admin!r}",
            file=sys.stderr,
        )
        return 2
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"idemproxy keys: set {TOKEN_ENV} to the admin token", file=sys.stderr)
        return 2
    query = [("scope", scope) for scope in scopes or []]
    if with_body:
        query.append(("body", "1"))
    url = f"{admin.rstrip('/')}/keys/{urllib.parse.quote(key, safe='')}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(  # noqa: S310 - the scheme was checked above
        url,
        method="GET" if action == "get" else "DELETE",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - checked
            body = response.read()
    except urllib.error.HTTPError as exc:
        code, detail = _problem(exc.read())
        print(f"idemproxy keys: {exc.code}: {detail}", file=sys.stderr)
        # 1 only for the admin API's own "no such key": any other 404 (the keys API off, a
        # wrong --admin reaching some other server) says nothing about the key.
        return 1 if (exc.code, code) == (404, "key_not_found") else 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"idemproxy keys: cannot reach {admin}: {exc}", file=sys.stderr)
        return 2
    if action == "get":
        try:
            described = json.loads(body)
        except ValueError:  # some other server: the exit code says "anything else", no traceback
            print(f"idemproxy keys: {admin} answered, but not as the admin API", file=sys.stderr)
            return 2
        print(json.dumps(described, indent=2))
    else:
        print("deleted")
    return 0


def _problem(body: bytes) -> tuple[str, str]:
    """The ``code`` and ``detail`` of a problem+json answer; for anything else, no code and
    the start of the body."""
    try:
        problem = json.loads(body)
        return str(problem.get("code", "")), str(problem.get("detail", ""))
    except (ValueError, AttributeError):
        return "", body.decode("utf-8", "replace")[:200]
