"""An upstream nobody here wrote, and a client that shows every byte (issue 14).

``HttpbinProcess`` is ``gunicorn httpbin:app`` (gthread worker) on a free loopback port, and
``ProxyProcess`` is ``python -m idemproxy run`` in front of it; both are child processes started
and stopped by PID, like ``RedisProcess`` in conftest. ``exchange`` sends one HTTP/1.1 request
over a raw socket and reads the answer by its own framing (RFC 9112 6.3), keeping the bytes
exactly as they came: status line with its reason phrase, header lines in order and letter case,
duplicates kept, interim 1xx heads, and the body both as sent on the wire and de-chunked.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import HOST, free_port, idemproxy_argv

# Every request carries the same Host, direct and through the proxy: the proxy keeps the
# original Host (SPEC 5), so httpbin's echoes of Host and of the URL it builds from it agree.
VIRTUAL_HOST = "api.example"


def stop_by_pid(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the child."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_until_answers(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``GET /get`` until the server on ``port`` answers 200 (bounded: 30 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if exchange(port, request("GET", "/get"), timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)  # a poll interval, not synchronisation: the loop checks a condition
    raise RuntimeError(f"did not answer within 30 s: {log.read_text()[-2000:]}")


@dataclass
class HttpbinProcess:
    """``gunicorn httpbin:app`` on 127.0.0.1 and a free port, stopped by PID."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "gunicorn.log"

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--bind",
                    f"{HOST}:{self.port}",
                    "--workers",
                    "1",
                    "--worker-class",
                    "gthread",
                    "--threads",
                    "4",
                    # Longer than the proxy's pool keeps a connection idle: a pooled connection
                    # gunicorn closed under the proxy would make a POST fail for no reason here.
                    "--keep-alive",
                    "120",
                    "--graceful-timeout",
                    "3",
                    # /response-headers takes the headers to answer from its query: a 9 KB one
                    # needs a request line longer than gunicorn's default 4094 bytes.
                    "--limit-request-line",
                    "0",
                    "httpbin:app",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                # gunicorn 27 opens a control socket under ~/.gunicorn: keep it in our workdir,
                # apart from any other gunicorn on this machine.
                env={**os.environ, "HOME": str(self.workdir)},
                cwd=self.workdir,
            )
        try:
            wait_until_answers(self.port, self.process, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_by_pid(self.process)
        self.process = None


@dataclass
class ProxyProcess:
    """``python -m idemproxy run`` in front of ``upstream``, on free loopback ports."""

    policy: str
    upstream: str
    store: str
    workdir: Path
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / f"idemproxy-{self.port}.log"

    def start(self) -> None:
        policy = self.workdir / f"policy-{self.port}.yaml"
        policy.write_text(self.policy)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                idemproxy_argv(
                    "run",
                    "-c",
                    str(policy),
                    "--upstream",
                    self.upstream,
                    "--store",
                    self.store,
                    "--listen",
                    f"{HOST}:{self.port}",
                    "--admin",
                    f"{HOST}:{self.admin_port}",
                    "--log-format",
                    "json",
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until_answers(self.port, self.process, self.log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            stop_by_pid(self.process)
        self.process = None


def private_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="idemproxy-httpbin-"))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- a client that shows every byte ---------------------------------------------------------


def request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
) -> bytes:
    """One HTTP/1.1 request: Host first, then ``headers`` as given, Content-Length for a body."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {VIRTUAL_HOST}"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


@dataclass
class Answer:
    method: str
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]  # as received: order, letter case, duplicates
    body: bytes  # the payload, de-chunked
    head: bytes  # status line and header lines, through the blank line
    wire_body: bytes  # the body as framed on the wire (chunk sizes included)
    interim: list[bytes] = field(default_factory=list)  # 1xx heads before the answer

    @property
    def raw(self) -> bytes:
        return self.head + self.wire_body

    def values(self, name: str) -> list[bytes]:
        wanted = name.lower().encode()
        return [value for key, value in self.headers if key.lower() == wanted]

    @property
    def bodiless(self) -> bool:
        """No body by definition (RFC 9112 6.3): a HEAD answer, 204, 304."""
        return self.method == "HEAD" or self.status in (204, 304)

    @property
    def chunked(self) -> bool:
        return any(b"chunked" in v.lower() for v in self.values("Transfer-Encoding"))


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buffer = b""
        self.eof = False

    def _fill(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("answer not complete in time")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
        self.buffer += data

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if self.eof:
                raise ConnectionError(f"closed before {marker!r}: {self.buffer[:200]!r}")
            self._fill()
        index = self.buffer.index(marker) + len(marker)
        taken, self.buffer = self.buffer[:index], self.buffer[index:]
        return taken

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if self.eof:
                raise ConnectionError(f"closed after {len(self.buffer)} of {size} bytes")
            self._fill()
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def rest(self) -> bytes:
        while not self.eof:
            self._fill()
        taken, self.buffer = self.buffer, b""
        return taken


def _parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    status_line, *lines = head[:-4].split(b"\r\n")
    version, status, *reason = status_line.split(b" ", 2)
    assert version in (b"HTTP/1.1", b"HTTP/1.0"), status_line
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip(b" \t")))
    return int(status), reason[0] if reason else b"", headers


def read_answer(reader: _Reader, method: str) -> Answer:
    interim = []
    while True:
        head = reader.until(b"\r\n\r\n")
        status, reason, headers = _parse_head(head)
        if 100 <= status < 200 and status != 101:
            interim.append(head)
            continue
        break
    answer = Answer(method, status, reason, headers, b"", head, b"", interim)
    if answer.bodiless:
        return answer
    if answer.chunked:
        wire, payload = [], []
        while True:
            size_line = reader.until(b"\r\n")
            wire.append(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (trailer := reader.until(b"\r\n")) != b"\r\n":
                    wire.append(trailer)
                wire.append(trailer)
                break
            chunk = reader.exactly(size + 2)
            wire.append(chunk)
            payload.append(chunk[:-2])
        answer.wire_body, answer.body = b"".join(wire), b"".join(payload)
    elif lengths := answer.values("Content-Length"):
        answer.body = answer.wire_body = reader.exactly(int(lengths[0]))
    else:
        answer.body = answer.wire_body = reader.rest()
    return answer


def exchange(port: int, data: bytes, *, method: str | None = None, timeout: float = 15) -> Answer:
    """Send ``data`` (one request) to 127.0.0.1:``port`` and read its answer by its framing."""
    method = method or data.split(b" ", 1)[0].decode()
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_answer(_Reader(sock, deadline), method)
