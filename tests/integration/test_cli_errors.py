"""`orchestrator` with bad configuration or an unreachable backend: one clear line on stderr,
a non-zero exit, never a Python traceback (README "Configuration": a bad value stops the
process with one line naming the variable, exit code 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository
ORCHESTRATOR = [sys.executable, "-m", "services.cli.main"]


def run(
    args: list[str], tmp_path: Path, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    base["HOME"] = str(tmp_path)  # no dev secret of this machine
    base["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    return subprocess.run(
        [*ORCHESTRATOR, *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean_failure(
    result: subprocess.CompletedProcess[str],
    *,
    code: int | None = None,
    names: str | None = None,
    secret: str | None = None,
) -> None:
    assert result.returncode != 0, result
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr[-600:])
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-600:]
    if names is not None:
        assert names in lines[0], lines[0]
    if secret is not None:
        assert secret not in result.stderr + result.stdout


def test_migrate_with_unreachable_database_is_one_line(tmp_path: Path) -> None:
    result = run(
        ["migrate"],
        tmp_path,
        ORCHESTRATOR_DATABASE_URL="postgresql://bob:hunter2pw@127.0.0.1:1/db",
        ORCHESTRATOR_DATABASE_CONNECT_TIMEOUT_SECONDS="2",
    )
    assert_clean_failure(result, secret="hunter2pw")


def test_prune_with_unreachable_database_is_one_line(tmp_path: Path) -> None:
    result = run(
        ["prune"],
        tmp_path,
        ORCHESTRATOR_DATABASE_URL="postgresql://bob:hunter2pw@127.0.0.1:1/db",
        ORCHESTRATOR_DATABASE_CONNECT_TIMEOUT_SECONDS="2",
    )
    assert_clean_failure(result, secret="hunter2pw")


def test_invalid_redis_url_names_the_variable(tmp_path: Path) -> None:
    result = run(["tenants", "list"], tmp_path, ORCHESTRATOR_REDIS_URL="notaurl")
    assert_clean_failure(result, code=2, names="ORCHESTRATOR_REDIS_URL")


def test_token_with_unusable_private_key_names_the_variable(tmp_path: Path) -> None:
    result = run(
        ["token", "--tenant", "acme", "--user", "alice"],
        tmp_path,
        ORCHESTRATOR_JWT_ALGORITHM="RS256",
        ORCHESTRATOR_JWT_PRIVATE_KEY=(
            "-----BEGIN PRIVATE KEY-----\nnot-a-key-hunter2\n-----END PRIVATE KEY-----"
        ),
    )
    assert_clean_failure(result, code=2, names="ORCHESTRATOR_JWT_PRIVATE_KEY", secret="hunter2")


def test_migrate_down_to_an_unknown_revision_is_one_line(tmp_path: Path) -> None:
    from services.cli.embedded_postgres import PostgresServer

    server = PostgresServer(durable=False).start()
    try:
        url = server.url()
        assert run(["migrate"], tmp_path, ORCHESTRATOR_DATABASE_URL=url).returncode == 0
        result = run(
            ["migrate", "--down", "no-such-revision"], tmp_path, ORCHESTRATOR_DATABASE_URL=url
        )
        assert_clean_failure(result, names="no-such-revision")
    finally:
        server.cleanup()


def test_schemas_into_an_unwritable_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run(["schemas", "--dir", str(blocker / "schemas")], tmp_path)
    assert_clean_failure(result)


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--user", ""], "--user"),
        (["--user", "   "], "--user"),
        (["--user", "u", "--ttl", "99999999999999999999"], "--ttl"),
        (["--user", "u", "--ttl", "0"], "--ttl"),
    ],
)
def test_token_refuses_a_blank_user_and_a_ttl_beyond_a_year(
    tmp_path: Path, flags: list[str], names: str
) -> None:
    result = run(["token", "--tenant", "acme", *flags], tmp_path, ORCHESTRATOR_JWT_SECRET="k" * 32)
    assert_clean_failure(result, code=2, names=names)
