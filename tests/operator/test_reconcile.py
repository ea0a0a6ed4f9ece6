"""The operator's decisions against a real Redis, without Kubernetes: the handlers' bodies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.core.quotas import QuotaCache
from services.core.settings import load_settings
from services.core.tiers import DEFAULT_TIERS
from services.operator.claims import quota_owner_key
from services.operator.reconcile import QuotaReconciler, ResourceRef
from services.operator.status import Reason

from .conftest import Clock, make_reconciler, tier_quota

OTHER = ResourceRef("team-b", "acme-too")


async def eventually(condition: Callable[[], Awaitable[bool]], within: float) -> float:
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_create_writes_the_tenants_quota_through_the_quota_store(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    spec = tier_quota(limits={"requestsPerMinutePerTenant": 900, "streaming": False})
    outcome = await reconciler.reconcile(ref, spec)

    assert (outcome.ready, outcome.reason) == (True, Reason.APPLIED)
    assert outcome.message == "tenant acme: tier pro with 2 limit overrides in force"
    quota = await reconciler.store.effective("acme")
    assert quota is not None
    assert (quota.tier, quota.known) == ("pro", True)
    assert quota.limits == msgspec.structs.replace(
        DEFAULT_TIERS["pro"], requests_per_minute_per_tenant=900, streaming=False
    )
    assert outcome.effective is not None
    assert outcome.effective["requestsPerMinutePerTenant"] == 900
    assert outcome.effective["maxConnections"] == DEFAULT_TIERS["pro"].max_connections


async def test_a_change_is_visible_to_a_running_api_within_two_seconds(
    redis_url: str, redis: Redis, reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    api_redis = Redis.from_url(redis_url)  # the api pod's own client and cache, as in the api
    cache = QuotaCache(make_reconciler(api_redis).store, ttl=300.0)
    await cache.start()
    try:
        before = await cache.effective("acme")
        assert before is not None
        assert before.tier == "free"  # cached for 300 s unless the change is announced

        await reconciler.reconcile(ref, tier_quota(tier="enterprise"))

        async def api_sees_enterprise() -> bool:
            quota = await cache.effective("acme")
            return quota is not None and quota.tier == "enterprise"

        assert await eventually(api_sees_enterprise, within=2.0) < 2.0
    finally:
        await cache.stop()
        await api_redis.aclose()


async def test_update_replaces_the_record_and_an_unchanged_spec_writes_nothing(
    reconciler: QuotaReconciler, ref: ResourceRef, redis: Redis
) -> None:
    await reconciler.reconcile(ref, tier_quota(limits={"maxConnections": 10}))
    await reconciler.reconcile(ref, tier_quota(tier="free", allowedAgents=["support"]))
    record = await reconciler.store.get("acme")
    assert record is not None
    assert (record.tier, record.limits, record.allowed_agents) == ("free", {}, ("support",))

    pubsub = redis.pubsub()
    await pubsub.subscribe("{quota}:changes")
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    outcome = await reconciler.reconcile(ref, tier_quota(tier="free", allowedAgents=["support"]))
    assert outcome.ready
    assert await reconciler.store.get("acme") == record  # same updatedAt: not rewritten
    assert await pubsub.get_message(timeout=0.2) is None  # and not announced
    await pubsub.aclose()


async def test_delete_removes_the_overrides_and_frees_the_tenant(
    reconciler: QuotaReconciler, ref: ResourceRef, redis: Redis
) -> None:
    spec = tier_quota(limits={"tokensPerDay": 5})
    await reconciler.reconcile(ref, spec)

    assert await reconciler.release(ref, spec) is True
    assert await reconciler.store.get("acme") is None
    quota = await reconciler.store.effective("acme")
    assert quota is not None
    assert (quota.tier, quota.known) == ("free", False)  # the default tier again
    assert await redis.exists(quota_owner_key("acme")) == 0
    assert await reconciler.release(ref, spec) is False  # a retried finalizer is harmless


async def test_a_timer_tick_racing_with_the_deletion_does_not_claim_the_tenant_again(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    await reconciler.reconcile(ref, tier_quota())
    tick = asyncio.create_task(reconciler.refresh(ref, tier_quota()))
    await reconciler.release(ref, tier_quota())
    assert await tick is None  # it waited for the release, then stood down
    assert await reconciler.refresh(ref, tier_quota()) is None  # a tick after the release

    assert await reconciler.store.get("acme") is None
    assert await reconciler.claims.holder("acme") is None
    recreated = await reconciler.reconcile(ref, tier_quota())  # the same name, created again
    assert recreated.ready


async def test_two_resources_for_one_tenant_both_report_the_conflict(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    first = await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
    second = await reconciler.reconcile(OTHER, tier_quota(tier="free"))
    first_again = await reconciler.reconcile(ref, tier_quota(tier="enterprise"))

    assert first.ready
    assert (second.ready, second.reason) == (False, Reason.CONFLICT)
    assert "owned by TierQuota tenants/acme" in second.message
    assert "not applied" in second.message
    assert second.effective is None
    assert (first_again.ready, first_again.reason) == (False, Reason.CONFLICT)
    assert "also named by TierQuota team-b/acme-too" in first_again.message
    record = await reconciler.store.get("acme")
    assert record is not None
    assert record.tier == "enterprise"  # first come, first served: no last-writer-wins


async def test_the_contender_takes_over_once_the_owner_is_deleted(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
    await reconciler.reconcile(OTHER, tier_quota(tier="free"))

    await reconciler.release(ref, tier_quota(tier="enterprise"))
    outcome = await reconciler.reconcile(OTHER, tier_quota(tier="free"))  # its next timer tick

    assert (outcome.ready, outcome.reason) == (True, Reason.APPLIED)
    record = await reconciler.store.get("acme")
    assert record is not None
    assert record.tier == "free"


async def test_deleting_the_contender_clears_the_owners_conflict_and_keeps_its_quota(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
    await reconciler.reconcile(OTHER, tier_quota(tier="free"))

    assert await reconciler.release(OTHER, tier_quota(tier="free")) is False
    outcome = await reconciler.reconcile(ref, tier_quota(tier="enterprise"))

    assert outcome.ready
    record = await reconciler.store.get("acme")
    assert record is not None
    assert record.tier == "enterprise"


async def test_a_contender_that_stops_renewing_is_forgotten(
    reconciler: QuotaReconciler, ref: ResourceRef, clock: Clock
) -> None:
    await reconciler.reconcile(ref, tier_quota())
    await reconciler.reconcile(OTHER, tier_quota())
    clock.moment = clock.moment.replace(minute=clock.moment.minute + 4)  # past the 180 s TTL

    outcome = await reconciler.reconcile(ref, tier_quota())

    assert outcome.ready


async def test_a_claim_left_by_a_vanished_resource_is_taken_over_only_when_provably_stale(
    redis: Redis, clock: Clock, ref: ResourceRef
) -> None:
    reconciler = make_reconciler(redis, clock=clock, watched_namespaces=["tenants", "team-b"])
    await redis.set(quota_owner_key("acme"), "tenants/ghost")  # its finalizer never ran

    unknown = await reconciler.reconcile(ref, tier_quota(), live_resources=None)
    assert unknown.reason is Reason.CONFLICT  # no index to judge by: never steal

    taken = await reconciler.reconcile(ref, tier_quota(), live_resources=["tenants/acme"])
    assert taken.ready
    assert await redis.get(quota_owner_key("acme")) == b"tenants/acme"

    await redis.set(quota_owner_key("acme"), "elsewhere/owner")  # a namespace not watched
    kept = await reconciler.reconcile(ref, tier_quota(), live_resources=["tenants/acme"])
    assert kept.reason is Reason.CONFLICT


async def test_a_record_edited_behind_the_operators_back_is_put_back(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
    await reconciler.store.set("acme", "free")  # `orchestrator tenants set acme --tier free`

    await reconciler.reconcile(ref, tier_quota(tier="enterprise"))  # the next timer tick

    record = await reconciler.store.get("acme")
    assert record is not None
    assert record.tier == "enterprise"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (tier_quota(tenant_id="bad tenant!"), "spec.tenantId 'bad tenant!' must match"),
        (tier_quota(tier="platinum"), "spec.tier 'platinum' is not a configured tier"),
        (
            tier_quota(limits={"maxConnections": -1}),
            "spec.limits.maxConnections must be an integer from 1 to 10000000",
        ),
        (
            tier_quota(limits={"priority": "urgent"}),
            "spec.limits.priority must be one of ",
        ),
        (tier_quota(limits={"tokensPerDay": 0}), "spec.limits.tokensPerDay must be an integer"),
        (tier_quota(limits={"burst": 3}), "spec.limits.burst is not a limit"),
        (tier_quota(allowedAgents=["ok", "not ok"]), "spec.allowedAgents: 'not ok' must match"),
    ],
)
async def test_an_invalid_spec_is_a_permanent_error_that_writes_and_claims_nothing(
    reconciler: QuotaReconciler,
    ref: ResourceRef,
    redis: Redis,
    spec: dict[str, object],
    message: str,
) -> None:
    outcome = await reconciler.reconcile(ref, spec)

    assert (outcome.ready, outcome.permanent, outcome.reason) == (False, True, Reason.INVALID_SPEC)
    assert message in outcome.message
    assert await redis.keys("*") == []


async def test_an_invalid_update_keeps_the_limits_applied_before(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
    outcome = await reconciler.reconcile(ref, tier_quota(tier="platinum"))

    assert outcome.permanent
    assert "configured: free, pro, enterprise" in outcome.message
    assert "nothing was written; in force: tier enterprise" in outcome.message
    assert outcome.effective is not None
    assert outcome.effective["tier"] == "enterprise"
    record = await reconciler.store.get("acme")
    assert record is not None
    assert record.tier == "enterprise"


async def test_a_custom_tier_of_the_deployment_is_accepted(redis: Redis, ref: ResourceRef) -> None:
    gold = msgspec.json.encode({"gold": DEFAULT_TIERS["enterprise"].to_dict()}).decode()
    reconciler = make_reconciler(redis, settings=load_settings(tiers=gold, tiers_file=None))

    outcome = await reconciler.reconcile(ref, tier_quota(tier="gold"))

    assert outcome.ready
    quota = await reconciler.store.effective("acme")
    assert quota is not None
    assert quota.tier == "gold"


async def test_unlimited_tokens_are_stored_as_no_budget(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    outcome = await reconciler.reconcile(ref, tier_quota(limits={"tokensPerDay": "unlimited"}))

    quota = await reconciler.store.effective("acme")
    assert quota is not None
    assert quota.limits.tokens_per_day is None
    assert outcome.effective is not None
    assert outcome.effective["tokensPerDay"] == "unlimited"


async def test_the_timer_reports_todays_tokens_requests_and_live_sockets(
    reconciler: QuotaReconciler, ref: ResourceRef
) -> None:
    await reconciler.usage_counter.add("acme", "task1", input_tokens=120, output_tokens=30)
    await reconciler.usage_counter.record_request("acme")
    await reconciler.usage_counter.record_request("acme")
    for socket_id in ("s1", "s2", "s3"):
        assert (await reconciler.sockets.acquire("acme", socket_id, limit=10))[0]

    outcome = await reconciler.refresh(ref, tier_quota())

    assert outcome is not None
    assert outcome.usage == {
        "day": "2025-03-14",
        "tokensToday": 150,
        "requestsToday": 2,
        "connections": 3,
        "updatedAt": "2025-03-14T12:00:00Z",
    }


@pytest.fixture
async def private_redis() -> AsyncIterator[object]:
    from services.cli.embedded import RedisServer

    server = RedisServer().start()
    yield server
    server.cleanup()


async def test_redis_down_is_a_temporary_error_then_the_retry_succeeds(
    private_redis: object, ref: ResourceRef
) -> None:
    from services.cli.embedded import RedisServer
    from services.core.redis_client import create_redis
    from services.operator.reconcile import StoreUnavailable

    assert isinstance(private_redis, RedisServer)
    settings = load_settings(redis_url=private_redis.url, tiers=None, tiers_file=None)
    client = create_redis(settings)  # the operator's client, with its retries
    reconciler = make_reconciler(client, settings=settings)
    try:
        private_redis.stop()

        down = await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
        assert (down.ready, down.temporary, down.reason) == (False, True, Reason.REDIS_UNAVAILABLE)
        assert down.message.startswith("cannot reach Redis")
        with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
            await reconciler.release(ref, tier_quota())

        private_redis.start()  # the same port
        back = await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
        assert back.ready
        record = await reconciler.store.get("acme")
        assert record is not None
        assert record.tier == "enterprise"
    finally:
        await client.aclose()


async def test_a_write_whose_announcement_failed_is_announced_by_the_retry(
    reconciler: QuotaReconciler, ref: ResourceRef, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is written, then the connection drops before the PUBLISH: the outcome is
    "Redis unavailable" and kopf retries. The retry finds the record as the spec wants it;
    it must announce it all the same, or the api pods keep the old limits for 300 s."""
    await reconciler.reconcile(ref, tier_quota(tier="free"))
    pubsub = redis.pubsub()
    await pubsub.subscribe("{quota}:changes")
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    announce = reconciler.store.announce

    async def lost(tenant_id: str) -> None:
        raise RedisConnectionError("connection lost before the PUBLISH")

    monkeypatch.setattr(reconciler.store, "announce", lost)
    failed = await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
    assert failed.reason is Reason.REDIS_UNAVAILABLE
    record = await reconciler.store.get("acme")
    assert record is not None
    assert record.tier == "enterprise"  # written, not announced
    assert await pubsub.get_message(timeout=0.2) is None

    monkeypatch.setattr(reconciler.store, "announce", announce)
    retried = await reconciler.reconcile(ref, tier_quota(tier="enterprise"))
    assert retried.ready
    message = await pubsub.get_message(timeout=2.0)
    assert message is not None
    assert message["data"] == b"acme"
    again = await reconciler.reconcile(ref, tier_quota(tier="enterprise"))  # announced once
    assert again.ready
    assert await pubsub.get_message(timeout=0.2) is None
    await pubsub.aclose()


# -- found by the second review: what the status says is what the api applies --------------


async def test_status_effective_max_message_chars_is_capped_like_the_store(redis: Redis) -> None:
    """README: "the effective limits the CLI and the operator's status show are capped by
    ORCHESTRATOR_MAX_MESSAGE_CHARS". The api refuses longer messages whatever the tier says."""
    settings = load_settings(
        tiers=None, tiers_file=None, default_tier="free", max_message_chars=4000
    )
    reconciler = make_reconciler(redis, settings=settings)
    outcome = await reconciler.reconcile(
        ResourceRef("tenants", "acme"), tier_quota("acme", "enterprise")
    )
    assert outcome.reason is Reason.APPLIED
    in_force = await reconciler.store.effective("acme")
    assert in_force is not None
    assert in_force.limits.max_message_chars == 4000
    assert outcome.effective is not None
    assert outcome.effective["maxMessageChars"] == in_force.limits.max_message_chars


async def test_redis_refusing_writes_is_an_outcome_not_an_exception(redis: Redis) -> None:
    """Redis at maxmemory under noeviction answers every write with OOM (the api answers 503
    like an outage, `REDIS_REFUSING`). The reconciler promises to never raise for a Redis
    outage but to return an outcome the status shows; instead the OOM error escapes, so kopf
    retries with its generic backoff and the TierQuota's Ready condition is never updated."""
    reconciler = make_reconciler(redis)
    policy = str((await redis.config_get("maxmemory-policy"))["maxmemory-policy"])
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)
    try:
        try:
            outcome = await reconciler.reconcile(
                ResourceRef("tenants", "acme"), tier_quota("acme", "pro")
            )
        except Exception as exc:  # the defect: it escapes
            raise AssertionError(
                f"reconcile raised {exc!r} instead of returning an outcome"
            ) from exc
        assert not outcome.ready
        assert outcome.temporary  # retried with backoff, and the status says why
    finally:
        await redis.config_set("maxmemory", 0)
        await redis.config_set("maxmemory-policy", policy)


GOLD = (
    '{"gold": {"requestsPerMinutePerSession": 100, "requestsPerMinutePerTenant": 1000,'
    ' "maxConnections": 300, "tokensPerDay": 5000000, "maxMessageChars": 9000,'
    ' "streaming": true, "priority": "high", "taskTimeoutSeconds": 200}}'
)


async def test_a_tier_removed_from_the_table_is_not_reported_as_still_in_force(
    redis: Redis,
) -> None:
    """A custom tier is dropped from ORCHESTRATOR_TIERS and the operator (and api) restarted.
    The TierQuota's status says "nothing was written (limits applied before, if any, stay in
    force)" and keeps `status.effective` at the gold limits, while every api pod serves the
    tenant the default tier (`QuotaStore.effective` falls back to it for an unknown tier)."""
    ref = ResourceRef("tenants", "acme")
    with_gold = load_settings(tiers=GOLD, tiers_file=None, default_tier="free")
    before = await make_reconciler(redis, settings=with_gold).reconcile(
        ref, tier_quota("acme", "gold")
    )
    assert before.reason is Reason.APPLIED

    without_gold = load_settings(tiers=None, tiers_file=None, default_tier="free")
    reconciler = make_reconciler(redis, settings=without_gold)
    after = await reconciler.reconcile(ref, tier_quota("acme", "gold"))
    served = await reconciler.store.effective("acme")  # what the api pods apply now
    assert served is not None
    assert served.tier == "free"
    assert after.reason is Reason.INVALID_SPEC
    # The status must not claim that the gold limits are still in force.
    assert "in force: tier free" in after.message, after.message
    assert after.effective is not None
    assert after.effective["tier"] == "free"
