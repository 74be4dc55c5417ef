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
        detail = _detail(exc.read())
        print(f"idemproxy keys: {exc.code}: {detail}", file=sys.stderr)
        return 1 if exc.code == 404 else 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"idemproxy keys: cannot reach {admin}: {exc}", file=sys.stderr)
        return 2
    if action == "get":
        print(json.dumps(json.loads(body), indent=2))
    else:
        print("deleted")
    return 0


def _detail(body: bytes) -> str:
    try:
        return str(json.loads(body).get("detail", ""))
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:200]
