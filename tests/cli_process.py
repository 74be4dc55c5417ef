"""``python -m idemproxy run ...`` as a child process whose stderr lines are read as they come."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

STEP = 0.05  # seconds between two looks at a condition


class CliProcess:
    """The CLI as a real process. ``prefix`` runs it through another command (``unshare``)."""

    def __init__(self, *args: str, prefix: Sequence[str] = (), env: dict[str, str] | None = None):
        self.args = [*prefix, sys.executable, "-m", "idemproxy", *args]
        self.env = {k: v for k, v in os.environ.items() if k != "IDEMPROXY_CONFIG"}
        self.env.update(env or {})
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> CliProcess:
        self.process = await asyncio.create_subprocess_exec(
            *self.args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read(), name="cli-stderr")
        return self

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        assert self.process is not None
        return self.process.returncode

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        """The stderr lines that are JSON objects (with ``--log-format json``: all of them)."""
        found = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
        return found

    def messages(self, message: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("message") == message]

    async def wait_for(self, condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
        """Poll ``condition`` until it holds; fail after ``seconds`` or if the process exits."""
        for _ in range(int(seconds / STEP)):
            if condition():
                return
            if self.returncode is not None:
                await self._drain()
                raise AssertionError(f"exited {self.returncode} before {what}:\n{self.stderr}")
            await asyncio.sleep(STEP)
        raise AssertionError(f"no {what} within {seconds} s:\n{self.stderr}")

    async def wait_exit(self, seconds: float = 30) -> int:
        assert self.process is not None
        code = await asyncio.wait_for(self.process.wait(), seconds)
        await self._drain()
        return code

    async def _drain(self) -> None:
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; by PID, and only if it still runs."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 20)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        await self._drain()


async def status(http: aiohttp.ClientSession, url: str) -> int | None:
    """The status ``url`` answers, or None when nothing answers."""
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def wait_status(
    http: aiohttp.ClientSession, proc: CliProcess, url: str, expected: int, seconds: float = 30
) -> None:
    """Poll ``url`` until it answers ``expected``."""
    answer = None
    for _ in range(int(seconds / STEP)):
        answer = await status(http, url)
        if answer == expected:
            return
        if proc.returncode is not None:
            message = f"exited {proc.returncode}; {url} never answered {expected}"
            raise AssertionError(f"{message}:\n{proc.stderr}")
        await asyncio.sleep(STEP)
    raise AssertionError(f"{url} answered {answer}, not {expected}, for {seconds} s")
