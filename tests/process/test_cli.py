"""The command line as a real process: ``python -m idemproxy run | check | version``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from idemproxy import __version__
from tests.cli_process import CliProcess, wait_status
from tests.conftest import HOST, ProxyFactory, Upstream, free_port, run_cli

GOOD = """\
version: 1
upstream:
  url: http://127.0.0.1:8000
routes:
  - match: {methods: [POST], path: /orders}
    key: {required: true}
  - match: {path: "/internal/**"}
    idempotency: off
"""

# Three errors on lines 2, 4 and 7.
BAD = """\
version: 1
upstrem:
  url: http://127.0.0.1:8000
shutdown_timeout: 30
routes:
  - match: {path: /orders}
  - match: {path: orders}
"""
BAD_PROBLEMS = [
    (2, "upstrem", "unknown field"),
    (4, "shutdown_timeout", "duration"),
    (7, "routes[1].match.path", "must start with /"),
]


@pytest.fixture(autouse=True)
def no_config_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_cli passes os.environ on; a stray $IDEMPROXY_CONFIG must not change the outcome."""
    monkeypatch.delenv("IDEMPROXY_CONFIG", raising=False)


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


def assert_no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


def test_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"idemproxy {__version__}"


def test_check_good_file_prints_a_one_line_summary(good: Path) -> None:
    result = run_cli("check", "-c", str(good))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert str(good) in lines[0]
    assert re.search(r"\b2 route", lines[0]), lines[0]
    assert re.search(r"\b1 keyed", lines[0]), lines[0]
    assert_no_traceback(result.stderr)


def test_check_bad_file_prints_every_error_with_file_line_and_path(bad: Path) -> None:
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 1
    assert result.stdout == ""
    assert_no_traceback(result.stderr)
    lines = sorted(result.stderr.splitlines())
    assert len(lines) == len(BAD_PROBLEMS), result.stderr
    for line, (number, path, fragment) in zip(lines, BAD_PROBLEMS, strict=True):
        assert line.startswith(f"{bad}:{number}: {path}: "), line
        assert fragment in line, line


def test_check_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("check", "-c", str(missing))
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert str(missing) in result.stderr
    assert "cannot read" in result.stderr


def test_check_without_a_file_says_how_to_name_one() -> None:
    result = run_cli("check")
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert "-c" in result.stderr


def test_check_reads_the_file_named_by_idemproxy_config(good: Path, bad: Path) -> None:
    result = run_cli("check", env={"IDEMPROXY_CONFIG": str(good)})
    assert result.returncode == 0, result.stderr
    assert str(good) in result.stdout
    result = run_cli("check", env={"IDEMPROXY_CONFIG": str(bad)})
    assert result.returncode == 1
    assert f"{bad}:2: upstrem: " in result.stderr


def test_check_flag_wins_over_idemproxy_config(good: Path, bad: Path) -> None:
    result = run_cli("check", "-c", str(good), env={"IDEMPROXY_CONFIG": str(bad)})
    assert result.returncode == 0, result.stderr
    assert str(good) in result.stdout


def test_check_unknown_yaml_tag_is_reported_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "tagged.yaml"
    path.write_text("version: 1\nlisten: !hostport 127.0.0.1:8080\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert f"{path}:2: " in result.stderr


def test_run_with_bad_config_exits_1_without_traceback(bad: Path) -> None:
    result = run_cli("run", "-c", str(bad), "--upstream", "http://127.0.0.1:1")
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert f"{bad}:2: upstrem: " in result.stderr
    assert f"{bad}:7: routes[1].match.path: " in result.stderr


def test_run_without_upstream_exits_1() -> None:
    result = run_cli("run", "--listen", f"{HOST}:{free_port()}", "--admin", f"{HOST}:{free_port()}")
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert "upstream" in result.stderr


def test_run_with_bad_upstream_flag_exits_1() -> None:
    result = run_cli("run", "--upstream", "ftp://files.example")
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert "--upstream" in result.stderr


def test_run_with_several_workers_exits_1_and_says_what_to_do() -> None:
    result = run_cli(
        "run",
        "--upstream",
        "http://127.0.0.1:1",
        "--workers",
        "2",
        "--listen",
        f"{HOST}:{free_port()}",
        "--admin",
        f"{HOST}:{free_port()}",
    )
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert "--workers" in result.stderr
    assert "redis" in result.stderr.lower()


def test_run_with_unknown_store_scheme_exits_1() -> None:
    result = run_cli("run", "--upstream", "http://127.0.0.1:1", "--store", "mysql://x")
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    assert "--store" in result.stderr
    assert "mysql://" in result.stderr


# --- one real run ----------------------------------------------------------------------------


async def _wait_healthy(
    http: aiohttp.ClientSession, proc: asyncio.subprocess.Process, url: str
) -> None:
    """Poll ``url`` until it answers 200; fail if the process exits or 10 s pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline:
        if proc.returncode is not None:
            pytest.fail(f"idemproxy exited early with {proc.returncode}")
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    pytest.fail("idemproxy did not answer /healthz within 10 s")


async def test_run_serves_replays_and_exits_0_on_sigterm(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    listen, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "IDEMPROXY_CONFIG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "idemproxy",
        "run",
        "--upstream",
        upstream.url,
        "--listen",
        f"{HOST}:{listen}",
        "--admin",
        f"{HOST}:{admin}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        await _wait_healthy(http, proc, f"http://{HOST}:{admin}/healthz")

        url = f"http://{HOST}:{listen}/orders"
        headers = {"Idempotency-Key": "cli-run-1", "Content-Type": "application/json"}
        async with http.post(url, data=b'{"amount": 100}', headers=headers) as first:
            first_body = await first.read()
            assert first.status == 201
            assert "Idempotent-Replayed" not in first.headers
        async with http.post(url, data=b'{"amount": 100}', headers=headers) as second:
            second_body = await second.read()
            assert second.status == 201
            assert second.headers.get("Idempotent-Replayed") == "true"
        assert second_body == first_body
        assert upstream.count("/orders") == 1

        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=15)
        assert proc.returncode == 0, stderr.decode(errors="replace")
        assert_no_traceback(stderr.decode(errors="replace"))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


# --- one command line ------------------------------------------------------------------------


def test_dash_dash_version_prints_what_version_prints() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"idemproxy {__version__}"


def test_keys_help_names_the_token_variable_and_the_exit_codes() -> None:
    result = run_cli("keys", "--help")
    assert result.returncode == 0, result.stderr
    assert "IDEMPROXY_ADMIN_TOKEN" in result.stdout
    assert "0 done, 1 no such key, 2 " in result.stdout


async def test_keys_admin_takes_host_port_like_run_admin(make_proxy: ProxyFactory) -> None:
    """Before, ``keys --admin 127.0.0.1:9901`` was refused: it took only a URL."""
    proxy = await make_proxy("admin: {token: a-token-for-keys}\n")
    host, port = proxy.server.admin_address
    env = {"IDEMPROXY_ADMIN_TOKEN": "a-token-for-keys"}
    for admin in (f"{host}:{port}", proxy.admin_url):
        result = await asyncio.to_thread(run_cli, "keys", "get", "nope", "--admin", admin, env=env)
        assert result.returncode == 1, result.stderr  # reached it: 404, no such key
        assert "404" in result.stderr


async def test_run_admin_takes_a_url_like_keys_admin(
    upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """Before, ``run --admin http://127.0.0.1:9901`` was a config error."""
    admin = free_port()
    args = ["--upstream", upstream.url, "--listen", f"{HOST}:{free_port()}"]
    proc = await CliProcess("run", *args, "--admin", f"http://{HOST}:{admin}/").start()
    try:
        await wait_status(http, proc, f"http://{HOST}:{admin}/healthz", 200)
    finally:
        await proc.stop()
    assert proc.returncode == 0, proc.stderr


def test_check_warns_about_a_file_without_upstream_that_run_needs_a_flag_for(
    tmp_path: Path,
) -> None:
    """A policy may leave the upstream to ``run --upstream``: it passes, with a warning."""
    path = tmp_path / "no-upstream.yaml"
    path.write_text("routes:\n  - match: {path: /orders}\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")
    assert result.stderr.startswith(f"warning: {path}: upstream.url: "), result.stderr
    assert "--upstream" in result.stderr
    with_flag = run_cli("check", "-c", str(path), "--upstream", "http://127.0.0.1:8000")
    assert with_flag.returncode == 0, with_flag.stderr
    assert with_flag.stderr == ""


def test_check_with_runs_flags_refuses_what_run_refuses(good: Path) -> None:
    flags = ["-c", str(good), "--workers", "2"]
    checked = run_cli("check", *flags)
    assert checked.returncode == 1
    assert "--workers" in checked.stderr
    ran = run_cli("run", *flags)
    assert ran.returncode == 1
    assert checked.stderr.endswith(ran.stderr.removeprefix("idemproxy run: ")), checked.stderr
    assert run_cli("check", *flags, "--store", "redis://127.0.0.1:6379/0").returncode == 0


def test_check_takes_every_flag_of_run_log_format_included(good: Path) -> None:
    """README: check takes run's flags. A run command line with --log-format, handed to check,
    was refused with argparse's usage error, exit 2 (found by hand)."""
    result = run_cli("check", "-c", str(good), "--log-format", "text")
    assert result.returncode == 0, result.stderr
