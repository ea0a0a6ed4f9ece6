"""A platform engineer configures the processes from README "Configuration" and DESIGN §6:
"A bad value stops the process with one line naming the variable (exit code 2)."

Each test here starts a real `orchestrator` process (a real Valkey from
`services.cli.embedded.RedisServer`) with one misconfiguration that the process accepts
silently today, and says what the engineer expected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import SECRET
from tests.integration.start_checks import (
    ROOT,
    assert_refused_at_start,
    base_env,
    run_role,
)


def _port_of(server: RedisServer) -> str:
    return server.url.rsplit(":", 1)[1].split("/", 1)[0]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _assert_one_line_refusal(result: subprocess.CompletedProcess[str], variable: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (
        f"expected exit 2 naming {variable}, got rc={result.returncode}; "
        f"stdout={result.stdout[-300:]!r} stderr={result.stderr[-600:]!r}"
    )
    assert len(lines) == 1, result.stderr[-600:]
    assert variable in lines[0], result.stderr[-600:]


def test_an_empty_redis_host_stops_the_process(redis_server: RedisServer, tmp_path: Path) -> None:
    """`ORCHESTRATOR_REDIS_HOST=""` (a Helm value left empty, an unset shell variable
    expanded into a manifest). Expected: exit 2 naming ORCHESTRATOR_REDIS_HOST, as for an empty
    DEFAULT_AGENT. Instead it is accepted and the process quietly connects to `localhost`
    (redis-py's default for `redis://:6379/0`): on a pod, a Redis nobody configured or
    none at all."""
    env = base_env(None, redis_host="", redis_port=_port_of(redis_server))
    outcome, _ = run_role("api", env, tmp_path / "api.log", timeout=15)
    assert_refused_at_start(outcome, "ORCHESTRATOR_REDIS_HOST")


@pytest.mark.parametrize("url_form", ["redis://:{port}/0", "redis://"])
def test_a_redis_url_without_a_host_stops_the_command(
    redis_server: RedisServer, url_form: str
) -> None:
    """README: a bad `REDIS_URL` stops the process with one line (the validator checks the
    scheme and the port). Expected: a URL with no host (`redis://`, `redis://:6379/0`) is
    refused with exit 2 naming ORCHESTRATOR_REDIS_URL. Instead it is accepted and means
    `localhost:6379`; here `tenants list` silently read the Redis on localhost."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_REDIS_URL"] = url_form.format(port=_port_of(redis_server))
    result = _cli(["tenants", "list"], env)
    _assert_one_line_refusal(result, "ORCHESTRATOR_REDIS_URL")


def test_a_jwks_url_without_a_host_stops_the_api(redis_server: RedisServer, tmp_path: Path) -> None:
    """`ORCHESTRATOR_JWT_JWKS_URL=https://` (the host part of a templated value empty).
    Expected: exit 2 naming ORCHESTRATOR_JWT_JWKS_URL, as for a URL without a scheme. Instead
    the api starts, is never ready, and logs `URLError: <urlopen error no host given>` every
    5 s for ever: a rollout that hangs rather than a pod that says what to fix."""
    env = base_env(redis_server.url, jwt_algorithm="RS256", jwt_jwks_url="https://")
    env.pop("ORCHESTRATOR_JWT_SECRET")
    outcome, _ = run_role("api", env, tmp_path / "api.log", timeout=8)
    assert_refused_at_start(outcome, "ORCHESTRATOR_JWT_JWKS_URL")


def test_sentinel_addresses_without_the_sentinel_mode_are_not_ignored(
    redis_server: RedisServer,
) -> None:
    """An engineer sets `ORCHESTRATOR_REDIS_SENTINELS=host:26379,...` and
    `ORCHESTRATOR_REDIS_SENTINEL_MASTER`, and forgets `ORCHESTRATOR_REDIS_MODE=sentinel`.
    Expected (README: "a mode without its addresses" stops the process, and the reverse is as
    contradictory): exit 2 naming ORCHESTRATOR_REDIS_MODE, or at least a warning. Instead both
    are ignored without a word and the command talks to the standalone address
    (REDIS_URL or localhost:6379), which after a failover is the old primary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_REDIS_URL"] = redis_server.url
    env["ORCHESTRATOR_REDIS_SENTINELS"] = "127.0.0.1:26379,127.0.0.1:26380"
    env["ORCHESTRATOR_REDIS_SENTINEL_MASTER"] = "prod"
    result = _cli(["tenants", "list"], env)
    assert result.returncode == 2 or "REDIS_MODE" in result.stderr, (
        f"sentinel settings ignored silently: rc={result.returncode} "
        f"stdout={result.stdout[-200:]!r} stderr={result.stderr[-400:]!r}"
    )


def test_a_field_refusal_reads_without_pydantic_prefix(redis_server: RedisServer) -> None:
    """The one line should read `ORCHESTRATOR_REDIS_SENTINELS: 'db' is not host:port`.
    Instead it carries pydantic's internal prefix: `ORCHESTRATOR_REDIS_SENTINELS: Value error,
    'db' is not host:port` (load_settings strips "Value error, " only from model-level
    errors, not from a field's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_REDIS_URL"] = redis_server.url
    env["ORCHESTRATOR_REDIS_SENTINELS"] = "db"
    result = _cli(["tenants", "list"], env)
    _assert_one_line_refusal(result, "ORCHESTRATOR_REDIS_SENTINELS")
    assert "Value error" not in result.stderr, result.stderr


def test_token_refuses_a_user_that_is_not_text(tmp_path: Path) -> None:
    """`orchestrator token --user josé` typed in a Latin-1 terminal passes the byte 0xE9,
    which Python reads as the lone surrogate U+DCE9. README ("Client API"): a `sub` holding a
    lone UTF-16 surrogate is refused by the api (401). Expected: `token` refuses the user
    (exit 2 naming --user), as it refuses a blank one. Instead it prints a token
    (`"sub":"jos\\udce9"`) that every api then refuses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "c"), LC_ALL="C.UTF-8")
    env["ORCHESTRATOR_JWT_SECRET"] = SECRET
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "token",
            "--tenant",
            "demo",
            "--user",
            b"jos\xe9",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    stderr = result.stderr.decode(errors="replace")
    seen = f"rc={result.returncode}, stdout={result.stdout[:120]!r}, stderr={stderr[-300:]!r}"
    assert result.returncode == 2, seen
    assert "--user" in stderr, seen


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_redis_url_parameter_redis_cannot_read_is_one_line(
    redis_server: RedisServer, tmp_path: Path, role: str
) -> None:
    """`ORCHESTRATOR_REDIS_URL=redis://host:6379/0?socket_timeout=5s` (a unit where redis-py
    wants a number). Expected (README "Configuration", and as the DATABASE_URL parameter check
    already does): exit 2 and one line naming ORCHESTRATOR_REDIS_URL. Instead the process
    crashes with exit 1 and a CRITICAL log carrying a traceback: `api stopped: ValueError:
    Invalid value for 'socket_timeout' in connection URL.`, the variable never named."""
    url = f"redis://127.0.0.1:{_port_of(redis_server)}/0?socket_timeout=5s"
    outcome, _ = run_role(role, base_env(url), tmp_path / f"{role}.log", timeout=15)
    assert_refused_at_start(outcome, "ORCHESTRATOR_REDIS_URL")


@pytest.mark.parametrize("command", [["tenants", "list"], ["partitions"]], ids=" ".join)
def test_a_tls_requirement_redis_cannot_read_is_one_line(
    redis_server: RedisServer, command: list[str]
) -> None:
    """`?ssl_cert_reqs=bogus` on a `rediss://` URL: parse_url keeps it as text and redis-py
    reads it at the first TLS connection, so a command said `RedisError: Invalid SSL
    Certificate Requirements Flag: bogus` (exit 1, no variable named) and the api and the
    worker stopped with a 40-line traceback (the ops review). Exit 2, naming the variable,
    never the URL's password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    port = _port_of(redis_server)
    env["ORCHESTRATOR_REDIS_URL"] = f"rediss://:Pw-S3cret@127.0.0.1:{port}/0?ssl_cert_reqs=bogus"
    result = _cli(command, env)
    _assert_one_line_refusal(result, "ORCHESTRATOR_REDIS_URL")
    assert "Pw-S3cret" not in result.stdout + result.stderr


def test_a_redis_url_database_that_is_not_a_number_is_refused(redis_server: RedisServer) -> None:
    """`ORCHESTRATOR_REDIS_URL=redis://host:6379/orchestrator` (a name where the database
    index belongs). Expected: exit 2 naming ORCHESTRATOR_REDIS_URL, as a database index the
    server lacks (`/99`) already is. Instead it is accepted and database 0 is used silently,
    shared with whatever else lives there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_REDIS_URL"] = f"redis://127.0.0.1:{_port_of(redis_server)}/orchestrator"
    result = _cli(["tenants", "list"], env)
    _assert_one_line_refusal(result, "ORCHESTRATOR_REDIS_URL")


def _sentinel_env(sentinels: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_REDIS_MODE"] = "sentinel"
    env["ORCHESTRATOR_REDIS_SENTINELS"] = sentinels
    return env


def test_a_sentinel_address_with_credentials_is_refused_without_echoing_them() -> None:
    """An engineer used to URLs writes `ORCHESTRATOR_REDIS_SENTINELS=admin:s3cret@host:26379`
    (README: the sentinels' credentials belong in REDIS_SENTINEL_USERNAME/PASSWORD).
    Expected: exit 2, one line naming ORCHESTRATOR_REDIS_SENTINELS ("not host:port"), and
    never the password. Instead the address passes (`rpartition(":")` takes
    `admin:s3cret@host` as the host), and the command fails with exit 1 and a ~1 000-character
    line of redis-py's client repr that prints the password:
    `... host=admin:hunter2pw@127.0.0.1,port=1 ...`."""
    result = _cli(["tenants", "list"], _sentinel_env("admin:hunter2pw@127.0.0.1:1"))
    assert "hunter2pw" not in result.stderr + result.stdout, result.stderr[-600:]
    _assert_one_line_refusal(result, "ORCHESTRATOR_REDIS_SENTINELS")
