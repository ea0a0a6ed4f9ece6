"""What a process cannot use stops it at start: exit 2 and one line naming the setting or
option, never a traceback and never a process that starts and then fails (README
"Configuration"). Each case was a traceback, or a server somewhere nobody asked for."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.embedded import RedisServer, free_port
from tests.integration.start_checks import (
    assert_refused_at_start,
    base_env,
    run_role,
    start,
    stop,
)


@pytest.fixture
def unix_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("sock") / "redis.sock"
    server = RedisServer(
        port=free_port(), extra_args=("--unixsocket", str(path), "--unixsocketperm", "700")
    ).start()
    yield path
    server.cleanup()


@pytest.fixture
def taken_port() -> Iterator[int]:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", port))
        holder.listen()
        yield port


def test_an_infinite_duration_stops_the_api_in_one_line(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = base_env(redis_server.url, drain_seconds="inf")
    outcome, _ = run_role("api", env, tmp_path / "api.log")
    assert_refused_at_start(outcome, "ORCHESTRATOR_DRAIN_SECONDS")


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_unix_socket_url_reaches_redis(unix_redis: Path, tmp_path: Path, role: str) -> None:
    """The settings accept `unix://`, but every process died with a TypeError (a TCP
    keepalive option passed to redis-py's unix socket connection)."""
    outcome, _ = run_role(role, base_env(f"unix://{unix_redis}"), tmp_path / f"{role}.log")
    assert outcome.state == ("ready" if role == "api" else "running"), outcome.describe()


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_database_index_the_server_lacks_is_one_line(
    redis_server: RedisServer, tmp_path: Path, role: str
) -> None:
    host = redis_server.url.split("//", 1)[1].split("/", 1)[0]
    outcome, _ = run_role(role, base_env(f"redis://{host}/99"), tmp_path / f"{role}.log")
    assert_refused_at_start(outcome, "ORCHESTRATOR_REDIS_URL")


@pytest.mark.parametrize("role", ["worker", "executor", "api"])
def test_a_taken_metrics_port_is_one_line(
    redis_server: RedisServer, tmp_path: Path, taken_port: int, role: str
) -> None:
    """9090, the default, is also Prometheus's own port."""
    env = base_env(redis_server.url, metrics_port=str(taken_port))
    outcome, _ = run_role(role, env, tmp_path / f"{role}.log")
    assert_refused_at_start(outcome, "ORCHESTRATOR_METRICS_PORT")


def test_a_host_that_does_not_resolve_is_one_line(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = base_env(redis_server.url, metrics_port=str(free_port()))
    log = tmp_path / "api.log"
    process = start(["api", "--host", "no-such-host.invalid", "--port", str(free_port())], env, log)
    try:
        assert process.wait(timeout=30) == 2, log.read_text()
        assert "Traceback" not in log.read_text()
        assert "--host" in log.read_text()
    finally:
        stop(process)


def test_a_port_out_of_range_is_refused_not_wrapped(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """argparse took any int, and uvloop served --port 99999 on 34463 (16 bits)."""
    log = tmp_path / "api.log"
    process = start(
        ["api", "--host", "127.0.0.1", "--port", "99999"], base_env(redis_server.url), log
    )
    try:
        returncode = process.wait(timeout=30)
    finally:
        stop(process)
    assert returncode == 2, log.read_text()
    assert "--port" in log.read_text()


def test_a_database_url_parameter_the_driver_cannot_honour_is_one_line(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Checked when the app is made, not in its lifespan (a traceback there)."""
    url = "postgresql://user:secret@127.0.0.1:5/chat?keepalives_idle=5"
    outcome, _ = run_role("api", base_env(redis_server.url, database_url=url), tmp_path / "a.log")
    assert_refused_at_start(outcome, "ORCHESTRATOR_DATABASE_URL")
    assert "secret" not in outcome.output
