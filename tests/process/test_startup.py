"""Starting ``idemproxy run`` as a real process: the store probed at start, store URLs that
``check`` and ``run`` judge alike, and failures at start as JSON lines, never a bare traceback."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.cli_process import CliProcess, wait_status
from tests.conftest import HOST, RedisProcess, free_port, run_cli

PASSWORD = "right-horse-battery-0451"
WRONG = "wrong-staple-0452"
RELOAD_SKIPPED = "reload skipped: idemproxy runs without a policy file"
STORE_DOWN = (
    "the store does not answer: /readyz answers 503 until it does, and keyed requests get 503"
)


@pytest.fixture
async def started() -> AsyncIterator[list[CliProcess]]:
    processes: list[CliProcess] = []
    yield processes
    for proc in processes:
        await proc.stop()


@pytest.fixture
def redis_with_password() -> Iterator[RedisProcess]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisProcess(free_port(), workdir, extra=["--requirepass", PASSWORD])
        server.start()
        yield server
        server.stop()


def run_args(store: str, admin: int, workers: int = 1) -> list[str]:
    return [
        "run",
        "--upstream",
        "http://127.0.0.1:1",
        "--store",
        store,
        "--listen",
        f"{HOST}:{free_port()}",
        "--admin",
        f"{HOST}:{admin}",
        "--workers",
        str(workers),
    ]


def is_start(event: dict[str, object]) -> bool:
    """The supervisor's or the single process's start line, not a worker's."""
    message = str(event["message"])
    return "started" in message and "worker" not in message


def started_line(proc: CliProcess) -> bool:
    return any(is_start(e) for e in proc.events())


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_wrong_redis_password_is_a_warning_at_start_and_readyz_503(
    redis_with_password: RedisProcess,
    http: aiohttp.ClientSession,
    started: list[CliProcess],
    workers: int,
) -> None:
    """Before, "idemproxy started" and nothing else: the first keyed request found out."""
    admin = free_port()
    store = f"redis://:{WRONG}@{HOST}:{redis_with_password.port}/0"
    proc = await CliProcess(*run_args(store, admin, workers)).start()
    started.append(proc)
    await proc.wait_for(lambda: started_line(proc), "the started line")

    (warning,) = proc.messages(STORE_DOWN)
    assert warning["level"] == "warning"
    assert warning["store"] == f"redis://:***@{HOST}:{redis_with_password.port}/0"
    assert "WRONGPASS" in warning["error"] or "invalid password" in warning["error"]
    (start,) = [e for e in proc.events() if is_start(e)]
    assert start["store_ready"] is False
    await wait_status(http, proc, f"http://{HOST}:{admin}/healthz", 200)
    await wait_status(http, proc, f"http://{HOST}:{admin}/readyz", 503, seconds=5)
    await proc.stop()
    assert WRONG not in proc.stderr
    assert PASSWORD not in proc.stderr


async def test_a_password_in_the_store_urls_query_is_not_logged(
    redis_with_password: RedisProcess, started: list[CliProcess]
) -> None:
    """redis-py takes ``?password=`` as well as the userinfo. Found by hand: the start line and
    the store warning logged such a URL whole, the password in clear."""
    base = f"redis://{HOST}:{redis_with_password.port}/0"
    proc = await CliProcess(*run_args(f"{base}?password={WRONG}", free_port())).start()
    started.append(proc)
    await proc.wait_for(lambda: started_line(proc), "the started line")
    (warning,) = proc.messages(STORE_DOWN)
    (start,) = [e for e in proc.events() if is_start(e)]
    assert warning["store"] == start["store"] == f"{base}?password=***"
    await proc.stop()
    assert WRONG not in proc.stderr


async def test_an_unreachable_redis_is_a_warning_at_start_and_readyz_follows_it_up(
    http: aiohttp.ClientSession, started: list[CliProcess], tmp_path: Path
) -> None:
    admin = free_port()
    redis = RedisProcess(free_port(), str(tmp_path))
    proc = await CliProcess(*run_args(redis.url, admin)).start()
    started.append(proc)
    await proc.wait_for(lambda: started_line(proc), "the started line")
    (warning,) = proc.messages(STORE_DOWN)
    assert warning["store"] == redis.url
    await wait_status(http, proc, f"http://{HOST}:{admin}/readyz", 503, seconds=5)

    redis.start()
    try:
        await wait_status(http, proc, f"http://{HOST}:{admin}/readyz", 200)
    finally:
        redis.stop()


async def test_signals_while_the_store_probe_at_start_waits_reload_then_stop_with_exit_0(
    http: aiohttp.ClientSession, started: list[CliProcess]
) -> None:
    """SPEC 2 and 7: SIGHUP reloads (or keeps the old policy), SIGTERM exits 0. Before, the
    handlers came after the store probe: with a store that does not answer, /healthz said 200
    for up to 2 s during which SIGHUP killed the process (exit -1) and SIGTERM gave -15."""
    admin = free_port()
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind((HOST, 0))
        silent.listen()
        store = f"redis://{HOST}:{silent.getsockname()[1]}/0"
        proc = await CliProcess(*run_args(store, admin)).start()
        started.append(proc)
        await wait_status(http, proc, f"http://{HOST}:{admin}/healthz", 200)
        os.kill(proc.pid, signal.SIGHUP)
        await proc.wait_for(lambda: started_line(proc), "the started line")
        await proc.wait_for(lambda: bool(proc.messages(RELOAD_SKIPPED)), "the reload line")
        os.kill(proc.pid, signal.SIGTERM)
        assert await proc.wait_exit() == 0, proc.stderr


# --- store URLs: check and run judge them alike ---------------------------------------------

BAD_STORE_URLS = [
    "redis://127.0.0.1:6390/x",
    "redis://127.0.0.1:6390/?db=x",
    "redis://user:hunter2@127.0.0.1:6390/0?socket_timeout=abc",
    "redis://127.0.0.1:6390/0?password=hunter2&no_such_option=1",
    "unix://",
]


@pytest.mark.parametrize("url", BAD_STORE_URLS)
def test_check_refuses_a_store_url_that_run_cannot_use_and_run_says_the_same(
    tmp_path: Path, url: str
) -> None:
    """Before, ``check`` passed ``redis://host:6390/x`` and ``run`` died with a traceback."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"upstream: {{url: 'http://127.0.0.1:1'}}\nstore: {{url: '{url}'}}\n")
    checked = run_cli("check", "-c", str(policy))
    assert checked.returncode == 1, checked.stdout
    assert checked.stderr.startswith(f"{policy}:2: store.url: "), checked.stderr
    listen, admin = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
    ran = run_cli("run", "-c", str(policy), "--listen", listen, "--admin", admin)
    assert ran.returncode == 1
    assert ran.stderr == checked.stderr
    assert "hunter2" not in checked.stderr


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6390/3", "redis://127.0.0.1:6390/0?db=2"])
def test_check_refuses_a_database_other_than_0_in_cluster_mode_and_run_says_the_same(
    tmp_path: Path, url: str
) -> None:
    """Before, ``check`` passed it and ``run`` died with redis-py's traceback ("Argument 'db'
    must be 0 or None in cluster mode"): a Cluster has database 0 only."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"upstream: {{url: 'http://127.0.0.1:1'}}\nstore: {{url: '{url}', mode: cluster}}\n"
    )
    checked = run_cli("check", "-c", str(policy))
    assert checked.returncode == 1, checked.stdout
    assert checked.stderr.startswith(f"{policy}:2: store.url: "), checked.stderr
    assert "database 0" in checked.stderr
    listen, admin = f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"
    ran = run_cli("run", "-c", str(policy), "--listen", listen, "--admin", admin)
    assert ran.returncode == 1
    assert ran.stderr == checked.stderr


# --- failures at start are log lines ---------------------------------------------------------


async def test_a_port_in_use_is_one_json_error_line_and_exit_1(started: list[CliProcess]) -> None:
    """Before, a bare "idemproxy: cannot listen: ..." text line among JSON lines."""
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = ["run", "--upstream", "http://127.0.0.1:1", "--listen", f"{HOST}:{port}"]
        proc = await CliProcess(*args, "--admin", f"{HOST}:{free_port()}").start()
        started.append(proc)
        assert await proc.wait_exit() == 1
    assert len(proc.events()) == len(proc.lines), proc.stderr
    (error,) = proc.messages("idemproxy cannot listen")
    assert error["listen"] == f"{HOST}:{port}"
    assert "address already in use" in error["error"].lower()


async def test_an_unexpected_crash_is_one_json_line_and_exit_1(started: list[CliProcess]) -> None:
    """Nothing expects a listen host with a 64-character label: getaddrinfo's IDNA encoding
    raises UnicodeError, not OSError. Before, a multi-line Python traceback on stderr."""
    host = "a" * 64
    args = ["run", "--upstream", "http://127.0.0.1:1", "--listen", f"{host}:{free_port()}"]
    proc = await CliProcess(*args, "--admin", f"{HOST}:{free_port()}").start()
    started.append(proc)
    assert await proc.wait_exit() == 1
    assert len(proc.events()) == len(proc.lines), proc.stderr
    (crash,) = proc.messages("idemproxy crashed")
    assert crash["level"] == "critical"
    assert "UnicodeError" in crash["error"]
    assert "Traceback" in crash["error"]  # the whole traceback, inside the one line
