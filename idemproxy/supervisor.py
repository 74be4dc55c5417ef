"""``idemproxy run --workers N``: N worker processes share the listen port (SO_REUSEPORT).

Each worker has its own event loop, store pool and upstream pool. The supervisor (this process)
starts them, restarts one that dies, forwards SIGHUP (reload) to each, stops them all on
SIGTERM / SIGINT, and serves the admin listener itself: health and readiness (every worker
serving, the store answering), the keys API, and metrics summed over all workers
(prometheus-client's multiprocess mode, through a directory of its own).

Each worker holds one end of a socket pair to the supervisor: it writes "serving" there once it
listens, then "alive" every ``HEARTBEAT_INTERVAL`` from its event loop, and it stops gracefully
when the pair ends, so no worker outlives a supervisor that was killed (gunicorn's workers watch
their parent pid; uvicorn's answer pings on a pipe). A worker whose process lives but whose loop
is stuck (an endless loop, a blocking call, SIGSTOP) is not counted as serving once unheard for
``HUNG_AFTER`` seconds (``/readyz`` says 503), and after ``KILL_HUNG_AFTER`` it is killed and
restarted like a dead one (gunicorn's worker timeout): the kernel keeps handing it connections
from the shared port, which would hang until then.

A worker that dies is restarted after a delay that doubles with each death in a row within
``EARLY_DEATH`` seconds of its start (``RESTART_DELAY`` up to ``RESTART_DELAY_MAX``); after
``GIVE_UP_AFTER`` such deaths in a row the supervisor stops and exits 1, so an orchestrator sees
a failure it can act on instead of a process that restarts forever (a port held by another
process, a store URL the workers cannot use, a crash at start).

Workers are started with the ``spawn`` method, so each imports prometheus-client after the
multiprocess directory is set and nothing of the supervisor's state leaks into them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from aiohttp import web

from idemproxy.admin import AdminContext, create_admin_app, probe_store
from idemproxy.app import HEARTBEAT_INTERVAL, last_resort, reloaded, run_loop, serve
from idemproxy.config import Config, ConfigError, Overrides, load
from idemproxy.observability import LogFormat, event, setup_logging, workers_exposition
from idemproxy.store import open_store

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY = 0.5  # seconds before the first restart; doubles with each early death in a row
RESTART_DELAY_MAX = 2.0
EARLY_DEATH = 10.0  # a worker that dies sooner than this after its start died early
GIVE_UP_AFTER = 5  # early deaths in a row of one worker slot
HUNG_AFTER = 5 * HEARTBEAT_INTERVAL  # a serving worker unheard this long does not count as serving
KILL_HUNG_AFTER = 20 * HEARTBEAT_INTERVAL  # ... and this long: it is killed and restarted
_POLL = 0.1
# /dev/shm is a tmpfs that Docker (also with read_only: true) and Kubernetes (also with
# readOnlyRootFilesystem) mount writable; tried after $TMPDIR and the usual temporary dirs.
_SHM = "/dev/shm"  # noqa: S108 - a fresh private directory is made inside it


def _worker_main(
    config: Config, path: str | None, flags: Overrides, log_format: LogFormat, channel: Connection
) -> None:
    setup_logging(log_format, shared_stderr=True)  # whole-line writes: no interleaved lines
    raise SystemExit(last_resort(lambda: run_loop(serve(config, path, flags, channel))))


@dataclass
class _Slot:
    """One worker position: its current process and how its recent starts went."""

    index: int
    process: BaseProcess
    channel: Connection  # the supervisor's end of the socket pair
    started: float
    serving: bool = False
    last_heard: float = 0.0  # monotonic time of its last message
    hung: bool = False  # serving, alive and unheard for HUNG_AFTER
    early_deaths: int = 0  # in a row
    restart_at: float | None = None  # set while the slot waits to restart its dead worker
    # A SIGHUP came while the worker was still starting: sent once it serves (its handler is
    # in place then; Python's default action for SIGHUP before that would end it).
    reload_due: bool = False

    @property
    def up(self) -> bool:
        return self.serving and not self.hung and self.process.is_alive()

    def hear(self, now: float) -> None:
        """Take the worker's messages ("serving", then "alive"s); note one that went silent."""
        try:
            while self.channel.poll():
                self.serving |= self.channel.recv_bytes() == b"serving"
                self.last_heard, self.hung = now, False
        except EOFError:  # it is exiting; the next round sees it dead
            return
        silent = now - self.last_heard
        if not self.serving or silent < HUNG_AFTER:
            return
        fields = {"worker": self.index, "pid": self.process.pid, "silent_seconds": round(silent, 1)}
        if silent >= KILL_HUNG_AFTER:
            event("worker still stuck; killing it", logging.ERROR, **fields)
            self.process.kill()
        elif not self.hung:
            self.hung = True
            event("worker stopped answering; not counted as serving", logging.WARNING, **fields)


class Supervisor:
    def __init__(
        self,
        config: Config,
        path: str | None,
        flags: Overrides,
        workers: int,
        log_format: LogFormat,
    ) -> None:
        self.config = config
        self.path = path
        self.flags = flags
        self.count = workers
        self.log_format = log_format
        self.slots: list[_Slot] = []
        self.gave_up = False
        self._stop = asyncio.Event()
        self._context = multiprocessing.get_context("spawn")

    def _spawn(self, index: int) -> tuple[BaseProcess, Connection]:
        mine, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(self.config, self.path, self.flags, self.log_format, theirs),
            name=f"idemproxy-worker-{index}",
            daemon=False,
        )
        process.start()
        theirs.close()  # the worker has its own copy; ours would only leak
        event("worker started", worker=index, pid=process.pid)
        return process, mine

    def _start(self, index: int) -> _Slot:
        process, channel = self._spawn(index)
        return _Slot(index, process, channel, time.monotonic())

    def _restart(self, slot: _Slot) -> None:
        slot.process, slot.channel = self._spawn(slot.index)
        slot.started, slot.restart_at = time.monotonic(), None
        slot.serving = slot.hung = False
        slot.reload_due = False  # spawned with the newest policy

    def serving(self) -> tuple[int, int]:
        return sum(1 for slot in self.slots if slot.up), self.count

    def _signal_all(self, signum: int) -> None:
        for slot in self.slots:
            self._signal(slot, signum)

    @staticmethod
    def _signal(slot: _Slot, signum: int) -> None:
        if slot.process.pid is not None and slot.process.is_alive():
            os.kill(slot.process.pid, signum)

    def _reload(self) -> None:
        """Forward SIGHUP to the workers, and keep the policy they reload: a worker restarted
        later starts with it, not with the policy of the supervisor's start."""
        if self.path is not None:
            # An invalid file: every worker logs its problems and keeps its policy; so does this.
            with contextlib.suppress(ConfigError):
                self.config = reloaded(self.config, load(self.path, self.flags))
        for slot in self.slots:
            if slot.serving:
                self._signal(slot, signal.SIGHUP)
            else:
                slot.reload_due = True

    def _join_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))

    def _check(self, slot: _Slot, now: float) -> None:
        """Hear a live worker; restart or give up on one that died."""
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                self._restart(slot)
            return
        if slot.process.is_alive():
            slot.hear(now)
            if slot.reload_due and slot.serving:
                slot.reload_due = False
                self._signal(slot, signal.SIGHUP)
            return
        from prometheus_client import multiprocess

        slot.channel.close()
        if slot.process.pid is not None:
            multiprocess.mark_process_dead(slot.process.pid)  # type: ignore[no-untyped-call]
        uptime = now - slot.started
        slot.early_deaths = slot.early_deaths + 1 if uptime < EARLY_DEATH else 0
        died = {
            "worker": slot.index,
            "pid": slot.process.pid,
            "exitcode": slot.process.exitcode,
            "uptime_seconds": round(uptime, 3),
            "early_deaths_in_a_row": slot.early_deaths,
        }
        if slot.early_deaths >= GIVE_UP_AFTER:
            event(
                "worker keeps dying at start; giving up: idemproxy stops and exits 1",
                logging.ERROR,
                **died,
            )
            self.gave_up = True
            self._stop.set()
            return
        delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2 ** max(0, slot.early_deaths - 1))
        event("worker died; restarting it", logging.WARNING, restart_in_seconds=delay, **died)
        slot.restart_at = now + delay

    async def _watch(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for slot in self.slots:
                if self._stop.is_set():  # gave up: one verdict, not one per slot
                    return
                self._check(slot, now)
            await asyncio.sleep(_POLL)

    def _processes(self) -> list[tuple[str, int]]:
        """The processes whose ``process_*`` metrics /metrics shows: this one and live workers."""
        alive = [(s.index, s.process.pid) for s in self.slots if s.process.is_alive()]
        return [("supervisor", os.getpid())] + [(f"worker-{i}", pid) for i, pid in alive if pid]

    async def run(self) -> int:
        # First: a signal that comes while the admin listener opens must not end the process.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        store = open_store(self.config.store)
        admin = AdminContext(
            store,
            workers_exposition(self._processes),
            self.config.store.key_prefix,
            self.config.admin_token,
            self.serving,
            self._stop.is_set,
        )
        runner = web.AppRunner(create_admin_app(admin), access_log=None)
        await runner.setup()
        host, port = self.config.admin_listen
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            await store.close()
            event("idemproxy cannot listen", logging.ERROR, admin=f"{host}:{port}", error=str(exc))
            return 1

        self.slots = [self._start(i) for i in range(self.count)]
        watcher = asyncio.create_task(self._watch(), name="worker-watch")
        event(
            "idemproxy supervisor started",
            workers=self.count,
            admin=f"{host}:{port}",
            store_ready=await probe_store(store, self.config.store),
        )
        await self._stop.wait()

        watcher.cancel()
        event("idemproxy shutting down", workers=self.count)
        self._signal_all(signal.SIGTERM)
        await asyncio.to_thread(self._join_all, self.config.shutdown_timeout + 5)
        for slot in self.slots:
            if slot.process.is_alive():
                slot.process.kill()
            slot.process.join(1)
            slot.channel.close()
        await runner.cleanup()
        await store.close()
        codes = [slot.process.exitcode for slot in self.slots]
        event("idemproxy stopped", worker_exit_codes=codes)
        failed = any(code not in (0, -signal.SIGTERM) for code in codes)
        return 1 if self.gave_up or failed else 0


def _metrics_directory() -> str | None:
    """A fresh directory for the workers' metric files, or None when nowhere is writable."""
    for parent in (None, _SHM):  # None: $TMPDIR, /tmp, /var/tmp, /usr/tmp, the working dir
        try:
            return tempfile.mkdtemp(prefix="idemproxy-metrics-", dir=parent)
        except OSError:  # FileNotFoundError "No usable temporary directory", read-only, ...
            continue
    return None


def run_workers(
    config: Config, path: str | None, flags: Overrides, workers: int, log_format: LogFormat
) -> int:
    directory = _metrics_directory()
    if directory is None:
        event(
            "--workers needs a writable directory for the workers' shared metrics and found "
            f"none ($TMPDIR, /tmp, /var/tmp, /usr/tmp, the working directory, {_SHM}): mount "
            "a tmpfs (an emptyDir in Kubernetes) and point TMPDIR at it, or run one worker",
            logging.ERROR,
        )
        return 1
    os.environ[MULTIPROC_ENV] = directory  # inherited by the spawned workers
    try:
        return run_loop(Supervisor(config, path, flags, workers, log_format).run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
