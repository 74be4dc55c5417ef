"""``idemproxy run --workers N``: N worker processes share the listen port (SO_REUSEPORT).

Each worker has its own event loop, store pool and upstream pool. The supervisor (this process)
starts them, restarts one that dies, forwards SIGTERM / SIGINT / SIGHUP, and serves the admin
listener itself: health, readiness against the store, the keys API, and metrics summed over all
workers (prometheus-client's multiprocess mode, through a directory of its own).

Workers are started with the ``spawn`` method, so each imports prometheus-client after the
multiprocess directory is set and nothing of the supervisor's state leaks into them.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess

from aiohttp import web

from idemproxy.config import Config, Overrides
from idemproxy.observability import LogFormat, event, workers_exposition

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_RESTART_DELAY = 0.5
_POLL = 0.2


def _worker_main(config: Config, path: str | None, flags: Overrides, log_format: LogFormat) -> None:
    from idemproxy.app import serve
    from idemproxy.cli import run_loop
    from idemproxy.observability import setup_logging

    setup_logging(log_format)
    run_loop(serve(config, path, flags, worker=True))


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
        self.workers: list[BaseProcess] = []
        self.stopping = False
        self._context = multiprocessing.get_context("spawn")

    def _spawn(self, index: int) -> BaseProcess:
        process = self._context.Process(
            target=_worker_main,
            args=(self.config, self.path, self.flags, self.log_format),
            name=f"idemproxy-worker-{index}",
            daemon=False,
        )
        process.start()
        event("worker started", worker=index, pid=process.pid)
        return process

    def _signal_all(self, signum: int) -> None:
        for process in self.workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    def _join_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for process in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))

    async def _watch(self) -> None:
        """Restart a worker that died while we were not stopping."""
        from prometheus_client import multiprocess

        while not self.stopping:
            for index, process in enumerate(self.workers):
                if process.is_alive() or self.stopping:
                    continue
                event(
                    "worker died; restarting it",
                    logging.WARNING,
                    worker=index,
                    pid=process.pid,
                    exitcode=process.exitcode,
                )
                if process.pid is not None:
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                await asyncio.sleep(_RESTART_DELAY)
                if not self.stopping:
                    self.workers[index] = self._spawn(index)
            await asyncio.sleep(_POLL)

    def _processes(self) -> list[tuple[str, int]]:
        """The processes whose ``process_*`` metrics /metrics shows: this one and live workers."""
        alive = [(i, p.pid) for i, p in enumerate(self.workers) if p.is_alive()]
        return [("supervisor", os.getpid())] + [(f"worker-{i}", pid) for i, pid in alive if pid]

    async def run(self) -> int:
        from idemproxy.admin import AdminContext, create_admin_app
        from idemproxy.store import open_store

        store = open_store(self.config.store)
        admin = AdminContext(
            store,
            workers_exposition(self._processes),
            self.config.store.key_prefix,
            self.config.admin_token,
        )
        runner = web.AppRunner(create_admin_app(admin), access_log=None)
        await runner.setup()
        host, port = self.config.admin_listen
        await web.TCPSite(runner, host, port).start()

        self.workers = [self._spawn(i) for i in range(self.count)]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        watcher = asyncio.create_task(self._watch(), name="worker-watch")
        event("idemproxy supervisor started", workers=self.count, admin=f"{host}:{port}")
        await stop.wait()

        self.stopping = True
        watcher.cancel()
        event("idemproxy shutting down", workers=self.count)
        self._signal_all(signal.SIGTERM)
        await asyncio.to_thread(self._join_all, self.config.shutdown_timeout + 5)
        for process in self.workers:
            if process.is_alive():
                process.kill()
            process.join(1)
        await runner.cleanup()
        await store.close()
        failed = [p.exitcode for p in self.workers if p.exitcode not in (0, -signal.SIGTERM)]
        event("idemproxy stopped", worker_exit_codes=[p.exitcode for p in self.workers])
        return 1 if failed else 0


def run_workers(
    config: Config, path: str | None, flags: Overrides, workers: int, log_format: LogFormat
) -> int:
    from idemproxy.cli import run_loop

    directory = tempfile.mkdtemp(prefix="idemproxy-metrics-")
    os.environ[MULTIPROC_ENV] = directory  # inherited by the spawned workers
    supervisor = Supervisor(config, path, flags, workers, log_format)
    try:
        exit_code = 0

        async def main() -> None:
            nonlocal exit_code
            exit_code = await supervisor.run()

        run_loop(main())
        return exit_code
    finally:
        shutil.rmtree(directory, ignore_errors=True)
