"""Fixtures of the operator's tests: the reconciler on the session's real Redis."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from services.core.quotas import QuotaStore
from services.core.settings import Settings, load_settings
from services.core.tenant_sockets import TenantSockets
from services.core.usage import UsageCounter
from services.operator.claims import TenantClaims
from services.operator.reconcile import QuotaReconciler, ResourceRef

NOW = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)
CONTENDER_TTL = 180.0


class Clock:
    """A settable clock for both kinds the operator reads: datetimes and epoch seconds."""

    def __init__(self, moment: datetime = NOW) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment

    def epoch(self) -> float:
        return self.moment.timestamp()


def tier_quota(tenant_id: str = "acme", tier: str = "pro", **fields: Any) -> dict[str, Any]:
    """A `TierQuota` spec as kopf hands it to the handlers."""
    return {"tenantId": tenant_id, "tier": tier, **fields}


def make_reconciler(
    redis: Redis,
    *,
    settings: Settings | None = None,
    clock: Clock | None = None,
    watched_namespaces: Collection[str] | None = None,
) -> QuotaReconciler:
    settings = settings or load_settings(tiers=None, tiers_file=None, default_tier="free")
    clock = clock or Clock()
    return QuotaReconciler(
        QuotaStore(redis, settings),
        TenantClaims(redis, contender_ttl=CONTENDER_TTL, clock=clock.epoch),
        UsageCounter(redis, clock=clock),
        TenantSockets(redis, settings.connection_ttl_seconds),
        watched_namespaces=watched_namespaces,
        clock=clock,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reconciler(redis: Redis, clock: Clock) -> QuotaReconciler:
    return make_reconciler(redis, clock=clock)


@pytest.fixture
def ref() -> ResourceRef:
    return ResourceRef("tenants", "acme")
