"""Credentials out of what is logged or shown: a URL's password becomes ``***``."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit


def redact(url: str) -> str:
    """The URL without its password, fit for logs and error messages: the one in its userinfo
    and the value of any query option named like one (redis-py takes ``?password=``)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        url = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    base, question, rest = url.partition("?")
    if not question or "pass" not in unquote(rest).lower():
        return url
    query, hash_mark, fragment = rest.partition("#")
    options = []
    for option in query.split("&"):
        name, eq, _ = option.partition("=")
        options.append(f"{name}=***" if eq and "pass" in unquote(name).lower() else option)
    return f"{base}?{'&'.join(options)}{hash_mark}{fragment}"
