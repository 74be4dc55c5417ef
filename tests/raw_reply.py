"""One answer read off a raw socket, with the helpers the raw-socket tests share."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    head: bytes  # the final response's status line and header lines (no blank line)
    body: bytes  # the body: de-chunked, or the bytes as sent, as the reader says
    raw: bytes = b""  # everything read, interim responses included, when the reader keeps it

    @property
    def header_lines(self) -> list[bytes]:
        return self.head.split(b"\r\n")[1:]

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (any letter case), in order."""
        return [
            line.partition(b":")[2].strip()
            for line in self.header_lines
            if line.partition(b":")[0].lower() == name.lower()
        ]

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [
            (name.decode("latin-1").strip(), value.decode("latin-1").strip())
            for name, _, value in (line.partition(b":") for line in self.header_lines)
        ]

    def header(self, name: str) -> str | None:
        """The first value of header ``name``, else None."""
        found = self.values(name.encode("latin-1"))
        return found[0].decode("latin-1") if found else None

    @property
    def replayed(self) -> bool:
        return self.values(b"Idempotent-Replayed") == [b"true"]

    @property
    def from_upstream(self) -> bool:
        """Whether the test upstream made it (it marks every answer with X-Serial)."""
        return self.header("X-Serial") is not None

    @property
    def code(self) -> str | None:
        """The ``code`` of a problem+json the proxy made, else None."""
        if self.header("Content-Type") != "application/problem+json" or not self.body:
            return None  # not a problem, or the answer to a HEAD (read without its body)
        return str(json.loads(self.body)["code"])

    def problem(self) -> dict[str, object]:
        assert self.values(b"Content-Type") == [b"application/problem+json"], self.head
        doc = json.loads(self.body)
        assert isinstance(doc, dict)
        return doc
