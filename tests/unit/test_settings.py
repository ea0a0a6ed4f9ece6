"""Configuration errors stop the process with one line naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.core.settings import ConfigError, RedisMode, load_settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORCHESTRATOR_REDIS_PORT", "not-a-port"),
        ("ORCHESTRATOR_REDIS_PORT", "70000"),
        ("ORCHESTRATOR_WORKER_SLEEP_SECONDS", "-1"),
        ("ORCHESTRATOR_REDIS_MODE", "galaxy"),
        ("ORCHESTRATOR_LOG_LEVEL", "LOUD"),
        ("ORCHESTRATOR_JWT_ALGORITHM", "none"),
        ("ORCHESTRATOR_MAX_WEBSOCKET_CONNECTIONS", "0"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    message = str(error.value)
    assert message.startswith(f"{variable}:")
    assert "\n" not in message


def test_lists_are_comma_separated_and_url_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("ORCHESTRATOR_REDIS_URL", "redis://cache:6380/2")
    monkeypatch.setenv("ORCHESTRATOR_REDIS_HOST", "ignored")
    settings = load_settings()
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert settings.redis_address == "redis://cache:6380/2"
    assert settings.redis_mode is RedisMode.standalone


def test_defaults_match_the_design() -> None:
    settings = load_settings()
    assert settings.websocket_ping_interval == 30
    assert settings.websocket_ping_timeout == 10
    assert settings.max_websocket_connections == 1000
    assert settings.worker_sleep_seconds == 1.0
    assert settings.max_requests_per_session == 100
    assert settings.default_tier == "free"
    assert settings.history_retention_days == 30
    assert settings.validation_cache_ttl == 300
    assert settings.websocket_compression is False


def test_the_command_prints_one_line_and_exits_2_on_bad_config() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "worker"],
        env={"ORCHESTRATOR_WORKER_BATCH_SIZE": "lots", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "ORCHESTRATOR_WORKER_BATCH_SIZE" in lines[0]


def test_the_api_refuses_to_start_without_a_jwt_key() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "api", "--port", "1"],
        env={"PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "orchestrator: configuration error: ORCHESTRATOR_JWT_SECRET: must be set for HS256 tokens"
    ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # `inf` passed every lower bound; then int(inf) failed in the middle of a start.
        ("ORCHESTRATOR_DRAIN_SECONDS", "inf"),
        ("ORCHESTRATOR_CONNECTION_TTL_SECONDS", "inf"),
        ("ORCHESTRATOR_PARTITION_LEASE_SECONDS", "inf"),
        ("ORCHESTRATOR_EXECUTOR_RECLAIM_IDLE_SECONDS", "nan"),
        # Beyond the calendar: `prune` failed with "date value out of range".
        ("ORCHESTRATOR_HISTORY_RETENTION_DAYS", "1000000"),
        # Beyond what Redis accepts: the api started, then every send was a 500.
        ("ORCHESTRATOR_TASK_TTL_SECONDS", "10000000000000000"),
        ("ORCHESTRATOR_SESSION_LOG_TTL_SECONDS", "10000000000000000"),
        # Beyond the rate limiter's bound: the error blamed ORCHESTRATOR_TIERS.
        ("ORCHESTRATOR_MAX_REQUESTS_PER_SESSION", "1000000000000"),
        # Checked in every process at start, not in the api's lifespan (a traceback).
        ("ORCHESTRATOR_DATABASE_URL", "mysql://user:secret@127.0.0.1:3306/chat"),
        # Met by the writer only: every record dead-lettered as the record's own fault.
        ("ORCHESTRATOR_DATABASE_URL", "postgresql://u:secret@127.0.0.1:notaport/db"),
        ("ORCHESTRATOR_DATABASE_URL", "postgresql://u:secret@[::1/db"),  # a traceback
        ("ORCHESTRATOR_REDIS_URL", "redis://:secret@127.0.0.1:99999/0"),
        # Every send without an agent names it: each was accepted (202), then dead-lettered.
        ("ORCHESTRATOR_DEFAULT_AGENT", "bad agent!"),
        # Beyond what Redis takes: every record's XADD failed; the executor's first read died.
        ("ORCHESTRATOR_PERSIST_STREAM_MAXLEN", "10000000000000000000"),
        ("ORCHESTRATOR_EXECUTOR_CONCURRENCY", "10000000000000000000"),
        # The old default: 32 000 escaped emoji (`\\ud83d\\ude00`, 12 bytes each) did not fit.
        ("ORCHESTRATOR_MAX_FRAME_BYTES", "262144"),
        ("ORCHESTRATOR_MAX_BODY_BYTES", "262144"),
        # A browser's Origin has no path: these matched no page, silently.
        ("ORCHESTRATOR_ALLOWED_ORIGINS", "https://app.example/"),
        ("ORCHESTRATOR_ALLOWED_ORIGINS", "https://a.example,app.example"),
    ],
)
def test_a_value_no_process_could_use_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable) as refused:
        load_settings()
    assert "secret" not in str(refused.value)  # a URL's password is never echoed
