"""The kopf wiring: handlers registered for TierQuota, and called as kopf calls them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core.redis_client import create_redis
from services.core.settings import load_settings
from services.operator.handlers import (
    GROUP,
    INDEX,
    PLURAL,
    VERSION,
    TierQuotaHandlers,
    retry_delay,
)
from services.operator.main import Scope, build_operator
from services.operator.reconcile import QuotaReconciler
from services.operator.settings import OperatorSettings

from .conftest import Clock, make_reconciler, tier_quota

LOGGER = logging.getLogger("tests.operator")


@pytest.fixture
def handlers(reconciler: QuotaReconciler) -> TierQuotaHandlers:
    return TierQuotaHandlers(reconciler, refresh_seconds=30.0, clock=Clock())


async def call(
    handler: Any,
    spec: dict[str, Any],
    *,
    status: dict[str, Any] | None = None,
    retry: int = 0,
    name: str = "acme",
    **extra: Any,
) -> kopf.Patch:
    """Invoke a handler with the keyword arguments kopf passes; return the patch it built."""
    patch = kopf.Patch()
    await handler(
        namespace="tenants",
        name=name,
        spec=spec,
        meta={"generation": 4},
        status=status or {},
        patch=patch,
        retry=retry,
        logger=LOGGER,
        **extra,
    )
    return patch


def ready_of(patch: kopf.Patch) -> dict[str, Any]:
    (condition,) = [c for c in patch["status"]["conditions"] if c["type"] == "Ready"]
    assert isinstance(condition, dict)
    return condition


def test_every_handler_is_registered_for_tierquotas() -> None:
    registry = build_operator(
        load_settings(tiers=None, tiers_file=None),
        OperatorSettings(refresh_seconds=45.0),
        Scope(("tenants",)),
    )
    changing = {
        (handler.id, handler.reason, handler.initial): handler
        for handler in registry._changing.get_all_handlers()
    }
    assert set(changing) == {
        ("apply", "create", None),
        ("apply", None, True),  # on.resume: existing resources when the operator starts
        ("change/spec", "update", None),
        ("release", "delete", None),
    }
    assert changing[("release", "delete", None)].requires_finalizer
    (timer,) = registry._spawning.get_all_handlers()
    (index,) = registry._indexing.get_all_handlers()
    assert (timer.id, getattr(timer, "interval", None), index.id) == ("refresh", 45.0, INDEX)
    for handler in [*changing.values(), timer, index]:
        assert handler.selector is not None
        assert (handler.selector.group, handler.selector.version) == (GROUP, VERSION)
        assert handler.selector.any_name == PLURAL
    activities = {handler.activity.value for handler in registry._activities.get_all_handlers()}
    assert activities == {"authentication", "cleanup"}


async def test_create_sets_ready_with_the_observed_generation(
    handlers: TierQuotaHandlers,
) -> None:
    patch = await call(handlers.apply, tier_quota(), **{INDEX: {"acme": ["tenants/acme"]}})

    assert ready_of(patch) == {
        "type": "Ready",
        "status": "True",
        "reason": "Applied",
        "message": "tenant acme: tier pro in force",
        "lastTransitionTime": "2025-03-14T12:00:00Z",
        "observedGeneration": 4,
    }
    assert patch["status"]["observedGeneration"] == 4
    assert patch["status"]["effective"]["tier"] == "pro"


async def test_an_invalid_spec_raises_a_permanent_error_after_setting_the_condition(
    handlers: TierQuotaHandlers,
) -> None:
    patch = kopf.Patch()
    with pytest.raises(kopf.PermanentError, match=r"spec\.tier 'gold' is not a configured tier"):
        await handlers.apply(
            namespace="tenants",
            name="acme",
            spec=tier_quota(tier="gold"),
            meta={"generation": 1},
            status={},
            patch=patch,
            retry=0,
            logger=LOGGER,
        )
    assert (ready_of(patch)["status"], ready_of(patch)["reason"]) == ("False", "InvalidSpec")


async def test_the_second_resource_for_a_tenant_reports_conflict_without_raising(
    handlers: TierQuotaHandlers,
) -> None:
    await call(handlers.apply, tier_quota())
    patch = await call(handlers.apply, tier_quota(tier="free"), name="acme-again")

    assert (ready_of(patch)["status"], ready_of(patch)["reason"]) == ("False", "Conflict")
    assert patch["status"]["effective"] is None


async def test_a_changed_tenant_id_releases_the_old_tenant(
    handlers: TierQuotaHandlers, reconciler: QuotaReconciler
) -> None:
    await call(handlers.apply, tier_quota(tenant_id="old"))

    patch = kopf.Patch()
    await handlers.change(
        old=tier_quota(tenant_id="old"),
        new=tier_quota(tenant_id="new"),
        namespace="tenants",
        name="acme",
        retry=0,
        spec=tier_quota(tenant_id="new"),
        meta={"generation": 2},
        status={},
        patch=patch,
        logger=LOGGER,
    )

    assert await reconciler.store.get("old") is None
    assert await reconciler.store.get("new") is not None


async def test_the_timer_copies_usage_into_the_status(
    handlers: TierQuotaHandlers, reconciler: QuotaReconciler
) -> None:
    await reconciler.usage_counter.add("acme", "t1", input_tokens=7, output_tokens=3)

    patch = await call(handlers.refresh, tier_quota())

    assert patch["status"]["usage"]["tokensToday"] == 10
    assert patch["status"]["usage"]["updatedAt"] == "2025-03-14T12:00:00Z"


async def test_the_timer_does_not_raise_again_for_an_invalid_spec(
    handlers: TierQuotaHandlers,
) -> None:
    patch = await call(handlers.refresh, tier_quota(tier="gold"))
    assert ready_of(patch)["reason"] == "InvalidSpec"


@pytest.fixture
async def stopped_redis() -> AsyncIterator[Redis]:
    server = RedisServer().start()
    client = create_redis(load_settings(redis_url=server.url))
    server.stop()
    yield client
    await client.aclose()
    server.cleanup()


@pytest.mark.parametrize("retry", [0, 3, 20])
async def test_redis_down_raises_a_temporary_error_with_growing_backoff(
    stopped_redis: Redis, retry: int
) -> None:
    handlers = TierQuotaHandlers(make_reconciler(stopped_redis), refresh_seconds=30.0)
    patch = kopf.Patch()

    with pytest.raises(kopf.TemporaryError, match="cannot reach Redis") as raised:
        await handlers.apply(
            namespace="tenants",
            name="acme",
            spec=tier_quota(),
            meta={"generation": 1},
            status={},
            patch=patch,
            retry=retry,
            logger=LOGGER,
        )
    assert raised.value.delay == retry_delay(retry) == min(60.0, 2.0**retry)
    assert ready_of(patch)["reason"] == "RedisUnavailable"
    with pytest.raises(kopf.TemporaryError, match="cannot reach Redis"):
        await handlers.release(namespace="tenants", name="acme", spec=tier_quota(), retry=retry)
