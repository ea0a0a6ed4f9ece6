"""The quota store and the api pods' cache of it, on a real Redis with real pub/sub."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import pytest
from redis.asyncio import Redis

from services.core import keys
from services.core.quotas import (
    EffectiveQuota,
    InvalidQuota,
    QuotaCache,
    QuotaStore,
    UnreadableQuota,
)
from services.core.settings import ConfigError, Settings, load_settings
from services.core.tiers import DEFAULT_TIERS

POLL_SECONDS = 0.02


def make_store(redis: Redis, **overrides: object) -> QuotaStore:
    return QuotaStore(redis, load_settings(**overrides), tiers=DEFAULT_TIERS)


@pytest.fixture
def store(redis: Redis) -> QuotaStore:
    return make_store(redis)


@pytest.fixture
async def cache(store: QuotaStore) -> AsyncIterator[QuotaCache]:
    quota_cache = QuotaCache(store, ttl=300.0)
    await quota_cache.start()
    yield quota_cache
    await quota_cache.stop()


async def eventually(condition: Callable[[], Awaitable[bool]], within: float) -> float:
    """Poll every 20 ms until `condition` holds; return how long it took (fail after `within`)."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(POLL_SECONDS)
    return time.monotonic() - started


async def set_and_hear(cache: QuotaCache, store: QuotaStore, tenant_id: str, tier: str) -> None:
    """Write a record and wait until `cache` has heard its announcement, so that a lookup made
    next is cached (and not dropped by an announcement still in flight)."""
    heard = cache.announcements
    await store.set(tenant_id, tier)

    async def announced() -> bool:
        return cache.announcements > heard

    await eventually(announced, within=2.0)


async def tier_of(cache: QuotaCache, tenant_id: str) -> str | None:
    quota = await cache.effective(tenant_id)
    return None if quota is None else quota.tier


async def test_a_record_reads_back_as_it_was_set(store: QuotaStore) -> None:
    written = await store.set(
        "acme", "pro", {"maxConnections": 10, "tokensPerDay": None}, allowed_agents=["support"]
    )
    read = await store.get("acme")
    assert read == written
    assert read is not None
    assert (read.tier, read.limits, read.allowed_agents) == (
        "pro",
        {"maxConnections": 10, "tokensPerDay": None},
        ("support",),
    )


async def test_set_replaces_the_whole_record(store: QuotaStore) -> None:
    await store.set("acme", "pro", {"maxConnections": 10}, allowed_agents=["support"])
    await store.set("acme", "free")
    record = await store.get("acme")
    assert record is not None
    assert (record.tier, record.limits, record.allowed_agents) == ("free", {}, None)


async def test_records_are_stored_as_camel_case_json_on_the_tenant_slot(
    store: QuotaStore, redis: Redis
) -> None:
    await store.set("acme", "pro", {"requestsPerMinutePerTenant": 100})
    stored = msgspec.json.decode(await redis.get("{tn:acme}:quota"))
    assert stored["tenantId"] == "acme"
    assert stored["limits"] == {"requestsPerMinutePerTenant": 100}


async def test_list_returns_every_record_by_tenant_and_delete_removes_one(
    store: QuotaStore,
) -> None:
    assert await store.list() == []
    for tenant in ("zeta", "acme", "mid"):
        await store.set(tenant, "pro")
    assert [record.tenant_id for record in await store.list()] == ["acme", "mid", "zeta"]
    assert await store.delete("mid") is True
    assert await store.delete("mid") is False
    assert await store.get("mid") is None
    assert [record.tenant_id for record in await store.list()] == ["acme", "zeta"]


async def test_list_skips_index_entries_whose_record_is_gone(
    store: QuotaStore, redis: Redis
) -> None:
    await store.set("acme", "pro")
    await redis.sadd(keys.QUOTA_TENANTS, "ghost")
    assert [record.tenant_id for record in await store.list()] == ["acme"]


async def test_effective_limits_are_the_tier_with_the_overrides_on_top(store: QuotaStore) -> None:
    await store.set(
        "acme", "pro", {"requestsPerMinutePerTenant": 100, "streaming": False}, ["support"]
    )
    quota = await store.effective("acme")
    assert quota is not None
    assert (quota.tier, quota.known) == ("pro", True)
    expected = msgspec.structs.replace(
        DEFAULT_TIERS["pro"],
        requests_per_minute_per_tenant=100,
        streaming=False,
        allowed_agents=("support",),
    )
    assert quota.limits == expected


async def test_the_installation_message_cap_bounds_the_effective_limit(redis: Redis) -> None:
    """The api refuses any message beyond ORCHESTRATOR_MAX_MESSAGE_CHARS before it looks at the
    tier: an override above it was shown as effective (CLI, operator status) but never
    applied. The effective limit is capped by it, for known and unknown tenants alike."""
    store = make_store(redis, max_message_chars=5_000)
    await store.set("acme", "enterprise", {"maxMessageChars": 50_000})
    known = await store.effective("acme")
    assert known is not None
    assert known.limits.max_message_chars == 5_000
    unknown = await make_store(redis, max_message_chars=1_000).effective("nobody")
    assert unknown is not None
    assert unknown.limits.max_message_chars == 1_000
    below = await make_store(
        redis, max_message_chars=60_000, max_frame_bytes=1 << 20, max_body_bytes=1 << 20
    ).effective("acme")
    assert below is not None
    assert below.limits.max_message_chars == 50_000


async def test_an_unknown_tier_is_refused_and_nothing_is_written(store: QuotaStore) -> None:
    with pytest.raises(InvalidQuota, match="unknown tier 'gold'; known: free, pro, enterprise"):
        await store.set("acme", "gold")
    assert await store.get("acme") is None


@pytest.mark.parametrize(
    ("limits", "agents", "message"),
    [
        ({"maxConnections": 0}, None, "maxConnections must be an integer from 1 to 10000000"),
        ({"burst": 5}, None, "burst is not a limit"),
        ({"allowedAgents": ["a"]}, None, "allowedAgents is not a limit"),
        ({}, ["not an id"], "allowed agent 'not an id'"),
    ],
)
async def test_invalid_overrides_are_refused(
    store: QuotaStore, limits: dict[str, object], agents: list[str] | None, message: str
) -> None:
    with pytest.raises(InvalidQuota, match=message):
        await store.set("acme", "pro", limits, agents)


async def test_tenant_ids_that_cannot_be_keys_are_refused(store: QuotaStore) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("a:b"),
        lambda: store.set("a b", "pro"),
        lambda: store.delete(""),
        lambda: store.effective("{x}"),
    ]
    for call in calls:
        with pytest.raises(InvalidQuota, match="tenant id must match"):
            await call()


async def test_a_tenant_without_a_record_gets_the_configured_default_tier(redis: Redis) -> None:
    quota = await make_store(redis, default_tier="pro").effective("newcomer")
    assert quota == EffectiveQuota("newcomer", "pro", DEFAULT_TIERS["pro"], known=False)


async def test_unknown_tenants_are_refused_when_known_tenants_are_required(redis: Redis) -> None:
    store = make_store(redis, require_known_tenant=True)
    assert await store.effective("newcomer") is None
    await store.set("newcomer", "free")
    quota = await store.effective("newcomer")
    assert quota is not None
    assert quota.known


async def test_a_record_of_a_tier_removed_from_configuration_falls_back_to_the_default(
    store: QuotaStore, redis: Redis
) -> None:
    await store.set("acme", "pro", {"maxConnections": 7})
    narrowed = QuotaStore(redis, load_settings(), tiers={"free": DEFAULT_TIERS["free"]})
    quota = await narrowed.effective("acme")
    assert quota is not None
    assert quota.tier == "free"
    assert quota.limits.max_connections == 7


async def test_a_stored_override_this_version_cannot_use_keeps_the_tiers_value(
    store: QuotaStore, redis: Redis
) -> None:
    """A record written by a newer version (a limit key this one does not know) or before a
    bound existed (a task timeout beyond 7 days) made every send of the tenant a 422 and every
    socket a 1008 quoting the record: a tenant punished for what only an admin can fix. The
    overrides this version can use apply; the others keep the tier's value."""
    await store.set("acme", "pro", {"maxConnections": 7})
    record = msgspec.json.decode(await redis.get(keys.tenant_quota("acme")))
    record["limits"].update({"taskTimeoutSeconds": 10**12, "futureLimit": 3})
    await redis.set(keys.tenant_quota("acme"), msgspec.json.encode(record))
    quota = await store.effective("acme")
    assert quota is not None
    assert quota.limits.max_connections == 7
    assert quota.limits.task_timeout_seconds == DEFAULT_TIERS["pro"].task_timeout_seconds


async def test_an_unreadable_record_is_an_error_not_a_silent_downgrade(
    store: QuotaStore, redis: Redis
) -> None:
    await redis.set(keys.tenant_quota("acme"), b'{"tier": 3}')
    with pytest.raises(InvalidQuota, match="quota record of acme is unreadable"):
        await store.effective("acme")


async def test_an_unreadable_record_is_logged_once_a_minute_with_what_it_refused(
    store: QuotaStore, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    cache = QuotaCache(store, ttl=300.0, clock=lambda: now[0])
    await redis.set(keys.tenant_quota("acme"), b'{"tier": 3}')
    for step in (0, 1, 1, 59, 1):  # refusals at 1000, 1001, 1002, 1061, 1062
        now[0] += step
        with pytest.raises(UnreadableQuota):
            await cache.effective("acme")
    lines = [r for r in caplog.records if "quota record of acme" in r.getMessage()]
    assert [r.__dict__["refused_since_last_line"] for r in lines] == [0, 2]
    cache.forget("acme")  # an announced change: a new breakage is told at once
    with pytest.raises(UnreadableQuota):
        await cache.effective("acme")
    assert len([r for r in caplog.records if "quota record of acme" in r.getMessage()]) == 3


def test_a_default_tier_missing_from_the_table_stops_the_store(redis: Redis) -> None:
    with pytest.raises(ConfigError, match="ORCHESTRATOR_DEFAULT_TIER"):
        QuotaStore(redis, Settings(default_tier="gold"), tiers=DEFAULT_TIERS)


async def test_writes_are_announced_with_the_tenant_id(store: QuotaStore, redis: Redis) -> None:
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.QUOTA_CHANGES)
        await store.set("acme", "pro")
        await store.delete("acme")
        seen: list[bytes] = []

        async def announced() -> bool:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
            if message is not None:
                seen.append(message["data"])
            return len(seen) == 2

        await eventually(announced, within=2.0)
    assert seen == [b"acme", b"acme"]


async def test_the_cache_serves_repeated_lookups_without_redis(
    cache: QuotaCache, store: QuotaStore, redis: Redis
) -> None:
    await set_and_hear(cache, store, "acme", "pro")
    first = await cache.effective("acme")
    await redis.set(keys.tenant_quota("acme"), b"not even json")  # unannounced: invisible
    assert await cache.effective("acme") == first


async def test_a_change_written_by_another_client_reaches_the_cache_within_a_second(
    cache: QuotaCache, redis: Redis, redis_url: str
) -> None:
    assert cache.live
    assert await tier_of(cache, "acme") == "free"
    other = Redis.from_url(redis_url)
    try:
        await make_store(other).set("acme", "enterprise")

        async def upgraded() -> bool:
            return await tier_of(cache, "acme") == "enterprise"

        assert await eventually(upgraded, within=2.0) < 1.0
    finally:
        await other.aclose()


async def test_the_cache_forgets_everything_after_the_subscription_reconnects(
    cache: QuotaCache, store: QuotaStore, redis: Redis
) -> None:
    await set_and_hear(cache, store, "acme", "pro")
    await cache.effective("acme")
    # A change nobody announced stands for one announced while the connection was down.
    upgraded = msgspec.json.encode(
        {"tenantId": "acme", "tier": "enterprise", "updatedAt": "2025-01-01T00:00:00Z"}
    )
    await redis.set(keys.tenant_quota("acme"), upgraded)
    assert await tier_of(cache, "acme") == "pro"

    await redis.client_kill_filter(_type="pubsub")

    async def reloaded() -> bool:
        return await tier_of(cache, "acme") == "enterprise"

    await eventually(reloaded, within=5.0)


async def test_a_cache_with_zero_ttl_always_reads_through(store: QuotaStore, redis: Redis) -> None:
    uncached = QuotaCache(store, ttl=0)
    await uncached.start()
    try:
        await set_and_hear(uncached, store, "acme", "pro")
        await uncached.effective("acme")
        await redis.delete(keys.tenant_quota("acme"))
        assert await tier_of(uncached, "acme") == "free"
    finally:
        await uncached.stop()


async def test_cached_entries_expire_after_the_ttl(store: QuotaStore, redis: Redis) -> None:
    clock = [100.0]
    expiring = QuotaCache(store, ttl=5.0, clock=lambda: clock[0])
    await expiring.start()
    try:
        await set_and_hear(expiring, store, "acme", "pro")
        await expiring.effective("acme")
        await redis.delete(keys.tenant_quota("acme"))  # unannounced
        clock[0] += 4.9
        assert await tier_of(expiring, "acme") == "pro"
        clock[0] += 0.2
        assert await tier_of(expiring, "acme") == "free"  # the default tier: no record
    finally:
        await expiring.stop()
