"""The tier table: DESIGN §5 defaults, configuration overrides and `--limit KEY=VALUE`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.settings import ConfigError, load_settings
from services.core.tiers import (
    DEFAULT_TIERS,
    LIMIT_KEYS,
    TierLimits,
    load_tiers,
    merge_limits,
    parse_limit_overrides,
)

# DESIGN §5, row by row: free, pro, enterprise.
DESIGN_TABLE = {
    "requestsPerMinutePerSession": (10, 60, 600),
    "requestsPerMinutePerTenant": (30, 600, 6000),
    "maxConnections": (5, 200, 5000),
    "tokensPerDay": (20_000, 2_000_000, None),
    "maxMessageChars": (2_000, 8_000, 32_000),
    "streaming": (False, True, True),
    "priority": ("low", "normal", "high"),
    "taskTimeoutSeconds": (60, 120, 300),
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TIERS", "TIERS_FILE", "DEFAULT_TIER"):
        monkeypatch.delenv(f"ORCHESTRATOR_{name}", raising=False)


def test_default_tiers_match_the_design_table() -> None:
    assert list(DEFAULT_TIERS) == ["free", "pro", "enterprise"]
    for key, expected in DESIGN_TABLE.items():
        actual = tuple(DEFAULT_TIERS[tier].to_dict()[key] for tier in ("free", "pro", "enterprise"))
        assert actual == expected, key
    assert all(tier.allowed_agents == () for tier in DEFAULT_TIERS.values())


def test_limit_keys_are_the_crd_names_in_design_order() -> None:
    assert tuple(DESIGN_TABLE) == LIMIT_KEYS


def test_empty_allowed_agents_allow_every_agent_and_a_list_only_its_members() -> None:
    free = DEFAULT_TIERS["free"]
    assert free.allows_agent("anything")
    restricted = merge_limits(free, {"allowedAgents": ["support"]})
    assert restricted.allows_agent("support")
    assert not restricted.allows_agent("coder")


def test_without_configuration_the_table_is_the_builtin_defaults() -> None:
    assert load_tiers(load_settings()) == dict(DEFAULT_TIERS)


def test_inline_configuration_overrides_some_limits_and_adds_tiers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    custom = dict(DEFAULT_TIERS["pro"].to_dict(), maxConnections=1000, priority="high")
    monkeypatch.setenv(
        "ORCHESTRATOR_TIERS",
        json.dumps({"free": {"requestsPerMinutePerSession": 20}, "custom": custom}),
    )
    tiers = load_tiers(load_settings())
    assert tiers["free"].requests_per_minute_per_session == 20
    assert tiers["free"].requests_per_minute_per_tenant == 30  # untouched
    assert tiers["custom"].max_connections == 1000
    assert tiers["custom"].priority == "high"
    assert tiers["pro"] == DEFAULT_TIERS["pro"]


def test_inline_configuration_applies_over_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"free": {"maxConnections": 7, "maxMessageChars": 100}}))
    monkeypatch.setenv("ORCHESTRATOR_TIERS_FILE", str(path))
    monkeypatch.setenv("ORCHESTRATOR_TIERS", '{"free": {"maxConnections": 9}}')
    free = load_tiers(load_settings())["free"]
    assert (free.max_connections, free.max_message_chars) == (9, 100)


def test_null_tokens_per_day_means_unlimited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_TIERS", '{"pro": {"tokensPerDay": null}}')
    assert load_tiers(load_settings())["pro"].tokens_per_day is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"free": {"requestsPerMinutePerSession": 0}}', "requestsPerMinutePerSession must be"),
        (
            '{"free": {"tokensPerDay": 0}}',
            "tokensPerDay must be an integer from 1 to 1000000000000000 or unlimited",
        ),
        ('{"free": {"streaming": "yes"}}', "streaming must be true or false"),
        ('{"free": {"priority": "urgent"}}', "priority must be one of"),
        ('{"free": {"burst": 3}}', "burst is not a limit"),
        ('{"custom": {"maxConnections": 3}}', "missing required field"),
        ('{"bad tier": {}}', "tier name 'bad tier'"),
        ('{"free": 3}', "expected an object of limits"),
        ("[]", "expected a JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_inline_configuration_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, config: str, message: str
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_TIERS", config)
    with pytest.raises(ConfigError) as caught:
        load_tiers(load_settings())
    text = str(caught.value)
    assert text.startswith("ORCHESTRATOR_TIERS: ")
    assert message in text
    assert "\n" not in text


def test_unreadable_tiers_file_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_TIERS_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_TIERS_FILE: cannot read it"):
        load_tiers(load_settings())


def test_bad_tiers_file_content_names_the_file_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "tiers.json"
    path.write_text('{"pro": {"maxMessageChars": -1}}')
    monkeypatch.setenv("ORCHESTRATOR_TIERS_FILE", str(path))
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_TIERS_FILE: tier 'pro': maxMessage"):
        load_tiers(load_settings())


def test_a_default_tier_missing_from_the_table_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_DEFAULT_TIER", "gold")
    with pytest.raises(ConfigError, match=r"^ORCHESTRATOR_DEFAULT_TIER: unknown tier 'gold'"):
        load_tiers(load_settings())
    monkeypatch.setenv("ORCHESTRATOR_TIERS", json.dumps({"gold": DEFAULT_TIERS["pro"].to_dict()}))
    assert "gold" in load_tiers(load_settings())


def test_limit_words_parse_into_typed_values() -> None:
    parsed = parse_limit_overrides(
        [
            "requestsPerMinutePerTenant=100",
            "tokensPerDay=unlimited",
            "streaming=yes",
            "priority=high",
            "taskTimeoutSeconds= 90",
        ]
    )
    assert parsed == {
        "requestsPerMinutePerTenant": 100,
        "tokensPerDay": None,
        "streaming": True,
        "priority": "high",
        "taskTimeoutSeconds": 90,
    }
    assert parse_limit_overrides(["streaming=false"]) == {"streaming": False}
    assert parse_limit_overrides([]) == {}


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("requestsPerMinute=5", "requestsPerMinute is not a limit (known: requestsPerMinutePer"),
        ("allowedAgents=a", "allowedAgents is not a limit"),
        ("maxConnections", "expected KEY=VALUE"),
        ("maxConnections=", "expected KEY=VALUE"),
        ("=5", "expected KEY=VALUE"),
        ("maxConnections=many", "maxConnections must be an integer from 1 to 10000000"),
        ("maxConnections=0", "maxConnections must be an integer from 1 to 10000000"),
        ("maxMessageChars=2.5", "maxMessageChars must be an integer from 1 to 10000000"),
        ("streaming=1", "streaming must be true or false"),
        ("priority=urgent", "priority must be one of high, low, normal"),
        (
            "tokensPerDay=0",
            "tokensPerDay must be an integer from 1 to 1000000000000000 or unlimited",
        ),
        # Beyond these the limiter's replies overflowed, or every send of the tenant was a 500.
        ("requestsPerMinutePerTenant=9223372036854775807", "from 1 to 60000000"),
        (
            "taskTimeoutSeconds=1000000000000",
            "taskTimeoutSeconds must be an integer from 1 to 604800",
        ),
    ],
)
def test_bad_limit_words_are_refused_naming_the_option_and_word(word: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_limit_overrides([word])
    assert str(caught.value).startswith("--limit ")
    assert word.split("=")[0] in str(caught.value)
    assert message in str(caught.value)


def test_a_limit_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="given twice"):
        parse_limit_overrides(["maxConnections=1", "maxConnections=2"])


def test_limits_round_trip_through_their_camel_case_form() -> None:
    for tier in DEFAULT_TIERS.values():
        assert merge_limits(tier, tier.to_dict()) == tier
    assert isinstance(merge_limits(DEFAULT_TIERS["pro"], {}), TierLimits)


def test_a_new_tier_without_a_session_limit_gets_max_requests_per_session() -> None:
    """`ORCHESTRATOR_MAX_REQUESTS_PER_SESSION` is the session limit of a tier the installation
    adds without one; it was documented so but the tier was refused at start."""
    team = {
        "requestsPerMinutePerTenant": 100,
        "maxConnections": 10,
        "tokensPerDay": 1000,
        "maxMessageChars": 1000,
        "streaming": True,
        "priority": "normal",
        "taskTimeoutSeconds": 60,
    }
    tiers = load_tiers(load_settings(tiers=json.dumps({"team": team}), max_requests_per_session=7))
    assert tiers["team"].requests_per_minute_per_session == 7
    assert tiers["free"] == DEFAULT_TIERS["free"]  # the built-in tiers keep their own
    own = load_tiers(
        load_settings(
            tiers=json.dumps({"team": {**team, "requestsPerMinutePerSession": 3}}),
            max_requests_per_session=7,
        )
    )
    assert own["team"].requests_per_minute_per_session == 3
