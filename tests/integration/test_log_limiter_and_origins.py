"""Today's changes, cheap checks on real parts (Redis, logging, Litestar's origin rule)."""

from __future__ import annotations

import json
import logging

import pytest
from redis.asyncio import Redis

from services.api.sockets import _cors_rule
from services.core.logs import configure_logging
from services.core.settings import ConfigError, load_settings
from services.operator.reconcile import ResourceRef
from tests.operator.conftest import make_reconciler, tier_quota

TENANTS = 30  # an operator (re)started on a cluster with 30 TierQuotas


async def test_every_tenants_quota_application_is_logged(
    redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator writes one `tier quota applied` line per tenant (its audit trail: which
    limits were put in force, when). The RepeatLimiter keys on the message template, so after
    20 tenants in a minute the others' lines are dropped, and since no later line of that
    template comes, nothing ever says that some were left out."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("INFO", "operator")
    try:
        reconciler = make_reconciler(redis)
        for i in range(TENANTS):
            outcome = await reconciler.reconcile(
                ResourceRef("tenants", f"t{i}"), tier_quota(f"t{i}")
            )
            assert outcome.ready, outcome
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    applied = {line["tenant_id"] for line in lines if line["msg"] == "tier quota applied"}
    suppressed = [line for line in lines if "suppressed" in line]
    assert applied == {f"t{i}" for i in range(TENANTS)} or suppressed, (
        f"{TENANTS - len(applied)} tenants' quota applications never logged, "
        f"and no line says so (logged: {len(applied)})"
    )


@pytest.mark.parametrize(
    ("entry", "browser_origin"),
    [
        ("https://app.example.com:443", "https://app.example.com"),
        ("https://App.Example.com", "https://app.example.com"),
    ],
)
def test_an_allowed_origin_no_browser_sends_is_refused_or_matched(
    entry: str, browser_origin: str
) -> None:
    """README: each ALLOWED_ORIGINS entry is `scheme://host[:port]` *as a browser sends it*,
    and an entry no browser Origin can match is refused at start (commit e2d984e). A browser
    never sends the default port nor an upper-case host: such an entry loads, and every
    socket and CORS request of the intended site is then refused with nothing saying why."""
    try:
        settings = load_settings(allowed_origins=entry)
    except ValueError:
        return  # refused at start: what the check promises
    rule = _cors_rule(tuple(settings.allowed_origins))
    assert rule.is_origin_allowed(browser_origin), (
        f"ALLOWED_ORIGINS={entry!r} accepted at start, yet the browser's Origin "
        f"{browser_origin!r} is refused"
    )


@pytest.mark.parametrize(
    "entry", ["https://app example.com", "https://app.example.com:abc", "https://u@app.example.com"]
)
def test_an_origin_with_a_space_credentials_or_a_port_that_is_no_number_is_refused(
    entry: str,
) -> None:
    """They loaded, and matched no page a browser opens: refused at start, the entry named."""
    with pytest.raises(ConfigError, match=r"ORCHESTRATOR_ALLOWED_ORIGINS: .* is not an origin"):
        load_settings(allowed_origins=entry)
    for fine in ("https://*.example.com", "http://127.0.0.1:5173", "http://[::1]:8000", "*"):
        assert load_settings(allowed_origins=fine).allowed_origins == [fine]
