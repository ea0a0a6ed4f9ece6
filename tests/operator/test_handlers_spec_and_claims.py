"""The TierQuota operator's kopf handlers, called as kopf calls them, on a real Redis."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import pytest
from redis.asyncio import Redis

from services.operator.handlers import INDEX, TierQuotaHandlers
from services.operator.reconcile import QuotaReconciler
from tests.operator.conftest import Clock, make_reconciler, tier_quota

LOGGER = logging.getLogger("tests.operator.handlers_spec")


@pytest.fixture
def reconciler(redis: Redis) -> QuotaReconciler:
    return make_reconciler(redis, clock=Clock())


@pytest.fixture
def handlers(reconciler: QuotaReconciler) -> TierQuotaHandlers:
    return TierQuotaHandlers(reconciler, refresh_seconds=30.0, clock=Clock())


async def call(
    handler: Any, spec: dict[str, Any], *, name: str = "acme", generation: int = 1, **extra: Any
) -> kopf.Patch:
    patch = kopf.Patch()
    await handler(
        namespace="tenants", name=name, spec=spec, meta={"generation": generation},
        status={}, patch=patch, retry=0, logger=LOGGER, **extra,
    )  # fmt: skip
    return patch


def ready(patch: kopf.Patch) -> dict[str, Any]:
    (condition,) = [c for c in patch["status"]["conditions"] if c["type"] == "Ready"]
    return dict(condition)


async def test_a_session_rate_above_the_tenant_rate_is_an_invalid_spec(
    handlers: TierQuotaHandlers, reconciler: QuotaReconciler
) -> None:
    """docs/operator.md: "a session's rate may not exceed its tenant's"; spec.py says the
    operator "stays the authority" because a cluster may validate with an older CRD. The
    operator applies {session: 1000, tenant: 10} (Ready=True, Applied) and
    `status.effective` shows 1000 per session, while the api can only ever admit 10 a minute
    from the tenant."""
    spec = tier_quota(
        limits={"requestsPerMinutePerSession": 1000, "requestsPerMinutePerTenant": 10}
    )
    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError, match="requestsPerMinutePerSession"):
        await handlers.apply(
            namespace="tenants", name="acme", spec=spec, meta={"generation": 1}, status={},
            patch=patch, retry=0, logger=LOGGER,
        )  # fmt: skip
    assert ready(patch)["reason"] == "InvalidSpec"
    assert await reconciler.store.get("acme") is None


async def test_an_invalid_update_reports_the_new_generation_and_keeps_the_old_limits(
    handlers: TierQuotaHandlers, reconciler: QuotaReconciler
) -> None:
    """Guard: generation 1 applies maxConnections=7; generation 2 with a bad limit is
    `InvalidSpec` with observedGeneration 2 (status and condition), and status.effective and
    the record keep maxConnections=7."""
    await call(handlers.apply, tier_quota(limits={"maxConnections": 7}))
    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError):
        await handlers.change(
            old={"spec": tier_quota(limits={"maxConnections": 7})},
            new={"spec": tier_quota(limits={"maxConnections": 0})},
            namespace="tenants", name="acme", spec=tier_quota(limits={"maxConnections": 0}),
            meta={"generation": 2}, status={}, patch=patch, retry=0, logger=LOGGER,
        )  # fmt: skip
    condition = ready(patch)
    assert (condition["reason"], condition["observedGeneration"]) == ("InvalidSpec", 2)
    assert patch["status"]["observedGeneration"] == 2
    assert "maxConnections" in condition["message"]
    assert patch["status"]["effective"]["maxConnections"] == 7
    record = await reconciler.store.get("acme")
    assert record is not None
    assert record.limits == {"maxConnections": 7}


async def test_two_resources_then_deleting_both_leaves_no_record_and_no_claim(
    handlers: TierQuotaHandlers, reconciler: QuotaReconciler, redis: Redis
) -> None:
    """Guard: owner and contender both report Conflict (the owner with effective, the
    contender without); deleting the contender returns the owner to Applied on its next tick;
    deleting the owner removes the record and the claim, so the CLI may manage the tenant."""
    index = {INDEX: {"acme": ["tenants/a", "tenants/b"]}}
    await call(handlers.apply, tier_quota(tier="enterprise"), name="a", **index)
    contender = await call(handlers.apply, tier_quota(tier="free"), name="b", **index)
    owner = await call(handlers.refresh, tier_quota(tier="enterprise"), name="a", **index)
    assert ready(contender)["reason"] == ready(owner)["reason"] == "Conflict"
    assert contender["status"]["effective"] is None
    assert owner["status"]["effective"]["tier"] == "enterprise"
    assert "tenants/b" in ready(owner)["message"]
    await handlers.release(namespace="tenants", name="b", spec=tier_quota(tier="free"), retry=0)
    owner = await call(handlers.refresh, tier_quota(tier="enterprise"), name="a")
    assert ready(owner)["reason"] == "Applied"
    assert owner["status"]["usage"]["connections"] == 0
    await handlers.release(namespace="tenants", name="a", spec=tier_quota(), retry=0)
    assert await redis.keys("*quota*") == []
