"""A weak or misplaced JWT key stops `orchestrator api` (and `token`) at start: exit code 2,
one line naming the variable, no traceback, the key never printed (README "Configuration")."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from services.cli.embedded import free_port
from tests.integration.test_cli_errors import assert_clean_failure
from tests.integration.test_cli_errors import run as run_cli
from tests.unit.test_auth_keys import pems

START_TIMEOUT = 30  # a refusal comes in seconds; an api that starts instead would serve on


def rsa_pems(bits: int) -> tuple[str, str]:
    return pems(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`orchestrator ARGS` with only `env` of the ORCHESTRATOR_* settings, bounded in time."""
    try:
        return run_cli(args, tmp_path, START_TIMEOUT, **env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{args[0]}` ran for {START_TIMEOUT}s instead of refusing at start")


def run_api(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`orchestrator api` with `env`; the refusal comes before any backend is reached."""
    return run(["api", "--host", "127.0.0.1", "--port", str(free_port())], tmp_path, **env)


def test_the_api_refuses_a_one_character_secret(tmp_path: Path) -> None:
    result = run_api(tmp_path, ORCHESTRATOR_JWT_SECRET="a")
    assert_clean_failure(result, code=2, names="ORCHESTRATOR_JWT_SECRET: too short")


def test_the_api_refuses_a_private_key_as_its_public_key(tmp_path: Path) -> None:
    private, _ = rsa_pems(2048)
    result = run_api(
        tmp_path,
        ORCHESTRATOR_JWT_ALGORITHM="RS256",
        ORCHESTRATOR_JWT_PUBLIC_KEY=private,
    )
    assert_clean_failure(result, code=2, names="ORCHESTRATOR_JWT_PUBLIC_KEY: a private key")
    assert "PRIVATE KEY" not in result.stderr + result.stdout


def test_the_api_refuses_a_1024_bit_rsa_key(tmp_path: Path) -> None:
    _, public = rsa_pems(1024)
    result = run_api(
        tmp_path,
        ORCHESTRATOR_JWT_ALGORITHM="RS256",
        ORCHESTRATOR_JWT_PUBLIC_KEY=public,
    )
    assert_clean_failure(result, code=2, names="ORCHESTRATOR_JWT_PUBLIC_KEY: a 1024-bit RSA")


def test_token_refuses_a_public_key_as_its_private_key(tmp_path: Path) -> None:
    _, public = rsa_pems(2048)
    result = run(
        ["token", "--tenant", "acme", "--user", "alice"],
        tmp_path,
        ORCHESTRATOR_JWT_ALGORITHM="RS256",
        ORCHESTRATOR_JWT_PRIVATE_KEY=public,
    )
    assert_clean_failure(result, code=2, names="ORCHESTRATOR_JWT_PRIVATE_KEY: a public key")


def test_the_api_refuses_a_bundle_with_one_weak_key(tmp_path: Path) -> None:
    """Every key of a rotation's bundle is judged at start, not only the first."""
    _, good = rsa_pems(2048)
    _, weak = rsa_pems(1024)
    result = run_api(
        tmp_path, ORCHESTRATOR_JWT_ALGORITHM="RS256", ORCHESTRATOR_JWT_PUBLIC_KEY=good + weak
    )
    assert_clean_failure(
        result, code=2, names="ORCHESTRATOR_JWT_PUBLIC_KEY (key 2 of 2): a 1024-bit RSA key"
    )
