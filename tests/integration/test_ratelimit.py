"""The GCRA limiter on a real Redis: bursts, retry-after, many clients, pipelined checks."""

from __future__ import annotations

import asyncio
from importlib.resources import files

import pytest
from redis.asyncio import Redis

from services.core import keys
from services.core.errors import RateLimited
from services.core.ratelimit import (
    Budget,
    RateCheck,
    RateDecision,
    RateLimiter,
    check_arguments,
    most_restrictive,
    rate_decision,
    rate_limit_headers,
    rate_limited,
)
from services.core.tiers import DEFAULT_TIERS

NOW = 1_700_000_000_000_000  # microseconds; a realistic epoch value exercises Lua's precision
SECOND = 1_000_000

TIER_LIMITS = sorted(
    {
        limit
        for tier in DEFAULT_TIERS.values()
        for limit in (tier.requests_per_minute_per_session, tier.requests_per_minute_per_tenant)
    }
)


@pytest.fixture
def limiter(redis: Redis) -> RateLimiter:
    return RateLimiter(redis)


async def checks_at_one_moment(
    redis: Redis, key: str, limit: int, count: int
) -> list[RateDecision]:
    """`count` checks at the simulated moment NOW, in one MULTI. The key expires in real time
    (`PX` from the simulated clock: 10 ms after the first check of 6 000 a minute), so checks
    sent one by one lost their key whenever a loaded machine took longer than that between
    two; Redis's clock stands still inside a transaction."""
    script = redis.register_script((files("services.core") / "lua" / "ratelimit.lua").read_text())
    check = RateCheck(key, limit, 1)
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(count):
            await script(keys=[key], args=check_arguments(check, NOW), client=pipe)
        replies = await pipe.execute()
    return [rate_decision(limit, reply) for reply in replies]


@pytest.mark.parametrize("limit", TIER_LIMITS)
async def test_the_request_after_a_full_burst_is_refused_and_allowed_after_retry_after(
    limiter: RateLimiter, redis: Redis, limit: int
) -> None:
    key = keys.session_rate("acme", f"s{limit}")
    *burst, refused = await checks_at_one_moment(redis, key, limit, limit + 1)
    for sent, decision in enumerate(burst, start=1):
        assert decision.allowed
        assert decision.remaining == limit - sent
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == pytest.approx(60 / limit, abs=1e-6)

    just_before = NOW + round(refused.retry_after * SECOND) - 1
    assert not (await limiter.check(key, limit, now_us=just_before)).allowed
    after = await limiter.check(key, limit, now_us=NOW + round(refused.retry_after * SECOND))
    assert after.allowed
    assert after.remaining == 0


async def test_with_the_server_clock_a_refused_request_passes_after_retry_after(
    limiter: RateLimiter,
) -> None:
    key = keys.tenant_rate("acme")
    assert (await limiter.check(key, 600, cost=600)).allowed
    refused = await limiter.check(key, 600)
    assert not refused.allowed
    assert 0 < refused.retry_after <= 0.1
    await asyncio.sleep(refused.retry_after)
    assert (await limiter.check(key, 600)).allowed


async def test_the_limit_holds_across_clients_checking_concurrently(redis_url: str) -> None:
    clients = [Redis.from_url(redis_url) for _ in range(2)]
    try:
        limiters = [RateLimiter(client) for client in clients]
        key = keys.tenant_rate("shared")
        decisions = await asyncio.gather(
            *(limiters[n % 2].check(key, 50, now_us=NOW) for n in range(120))
        )
    finally:
        for client in clients:
            await client.aclose()
    assert sum(decision.allowed for decision in decisions) == 50
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))


async def test_decisions_report_remaining_reset_and_retry_after(limiter: RateLimiter) -> None:
    key = keys.session_rate("acme", "s1")
    decision = await limiter.check(key, 10, cost=3, now_us=NOW)
    assert decision == RateDecision(
        allowed=True, limit=10, remaining=7, reset_after=18.0, retry_after=0.0
    )
    later = await limiter.check(key, 10, cost=0, now_us=NOW + 9 * SECOND)
    assert (later.remaining, later.reset_after) == (8, 9.0)
    refused = await limiter.check(key, 10, cost=10, now_us=NOW + 9 * SECOND)
    assert not refused.allowed
    assert (refused.remaining, refused.reset_after, refused.retry_after) == (8, 9.0, 9.0)


async def test_a_look_with_cost_zero_consumes_nothing(limiter: RateLimiter, redis: Redis) -> None:
    key = keys.session_rate("acme", "s1")
    for _ in range(3):
        assert (await limiter.check(key, 1, cost=0)).remaining == 1
    assert await redis.exists(key) == 0


async def test_a_refund_gives_back_exactly_what_was_taken(limiter: RateLimiter) -> None:
    key = keys.session_rate("acme", "s1")
    await limiter.check(key, 10, cost=4, now_us=NOW)
    await limiter.refund(key, 10, cost=3, now_us=NOW)
    assert (await limiter.check(key, 10, cost=0, now_us=NOW)).remaining == 9
    await limiter.refund(key, 10, cost=5, now_us=NOW)  # more than taken: the limit is just full
    assert (await limiter.check(key, 10, cost=0, now_us=NOW)).remaining == 10


async def test_the_key_expires_once_the_limit_is_full_again(
    limiter: RateLimiter, redis: Redis
) -> None:
    key = keys.tenant_rate("acme")
    await limiter.check(key, 600)
    assert 0 < await redis.pttl(key) <= 100


async def test_check_many_returns_each_decision(limiter: RateLimiter) -> None:
    checks = [
        RateCheck(keys.session_rate("acme", "s1"), 10),
        RateCheck(keys.tenant_rate("acme"), 30),
    ]
    session, tenant = await limiter.check_many(checks, now_us=NOW)
    assert (session.allowed, session.remaining) == (True, 9)
    assert (tenant.allowed, tenant.remaining) == (True, 29)


async def test_check_many_refunds_the_limits_that_allowed_when_another_refused(
    limiter: RateLimiter,
) -> None:
    session_key, tenant_key = keys.session_rate("acme", "s1"), keys.tenant_rate("acme")
    checks = [RateCheck(session_key, 10), RateCheck(tenant_key, 3)]
    for _ in range(3):
        assert all(d.allowed for d in await limiter.check_many(checks, now_us=NOW))
    session, tenant = await limiter.check_many(checks, now_us=NOW)
    assert session.allowed
    assert not tenant.allowed
    assert (await limiter.check(session_key, 10, cost=0, now_us=NOW)).remaining == 7


async def _requests(redis: Redis, usage_key: str) -> int:
    return int(await redis.hget(usage_key, "requests") or 0)


async def test_a_budget_is_checked_with_its_limit_and_counts_the_request(
    limiter: RateLimiter, redis: Redis
) -> None:
    usage_key = keys.tenant_usage("acme", "2026-01-01")
    budget = Budget(usage_key, 100, 3600)
    checks = [
        RateCheck(keys.session_rate("acme", "s1"), 10),
        RateCheck(keys.tenant_rate("acme"), 30, budget=budget),
    ]
    session, tenant = await limiter.check_many(checks, now_us=NOW)
    assert session.within_budget
    assert tenant.within_budget
    assert (tenant.allowed, tenant.remaining) == (True, 29)
    assert await _requests(redis, usage_key) == 1
    assert 0 < await redis.ttl(usage_key) <= 3600
    await redis.hset(usage_key, "tokens", 100)  # the day's budget is used up
    session, tenant = await limiter.check_many(checks, now_us=NOW)
    assert tenant.allowed
    assert not tenant.within_budget
    assert tenant.remaining == 28  # as before: the rate limit counted the refused request
    assert await _requests(redis, usage_key) == 1  # but it is not counted as a request
    unlimited = [RateCheck(keys.tenant_rate("b"), 30, budget=Budget(usage_key, None, 3600))]
    assert (await limiter.check_many(unlimited, now_us=NOW))[0].within_budget
    assert await _requests(redis, usage_key) == 2


async def test_a_refusal_by_another_limit_takes_back_the_counted_request(
    limiter: RateLimiter, redis: Redis
) -> None:
    usage_key = keys.tenant_usage("acme", "2026-01-01")
    session_key, tenant_key = keys.session_rate("acme", "s1"), keys.tenant_rate("acme")
    checks = [
        RateCheck(session_key, 2),
        RateCheck(tenant_key, 30, budget=Budget(usage_key, 100, 3600)),
    ]
    for _ in range(2):
        assert all(d.allowed for d in await limiter.check_many(checks, now_us=NOW))
    session, tenant = await limiter.check_many(checks, now_us=NOW)
    assert not session.allowed
    assert tenant.allowed
    assert await _requests(redis, usage_key) == 2  # the refused request is not counted
    assert (await limiter.check(tenant_key, 30, cost=0, now_us=NOW)).remaining == 28
    # Refused by its own limit, a budgeted check touches no budget (and is not refunded).
    tight = [RateCheck(keys.tenant_rate("t"), 1, budget=Budget(usage_key, 100, 3600))]
    assert (await limiter.check_many(tight, now_us=NOW))[0].allowed
    refused = (await limiter.check_many(tight, now_us=NOW))[0]
    assert not refused.allowed
    assert refused.within_budget
    assert await _requests(redis, usage_key) == 3


async def test_a_budget_over_its_tokens_is_not_taken_back_when_another_limit_refused(
    limiter: RateLimiter, redis: Redis
) -> None:
    usage_key = keys.tenant_usage("acme", "2026-01-01")
    await redis.hset(usage_key, mapping={"tokens": 100, "requests": 5})
    checks = [
        RateCheck(keys.session_rate("acme", "s1"), 1),
        RateCheck(keys.tenant_rate("acme"), 30, budget=Budget(usage_key, 100, 3600)),
    ]
    await limiter.check_many(checks, now_us=NOW)
    session, tenant = await limiter.check_many(checks, now_us=NOW)
    assert not session.allowed
    assert not tenant.within_budget
    assert await _requests(redis, usage_key) == 5
    assert (await limiter.check(keys.tenant_rate("acme"), 30, cost=0, now_us=NOW)).remaining == 29


async def test_check_many_sends_nothing_but_the_scripts(limiter: RateLimiter, redis: Redis) -> None:
    checks = [RateCheck(keys.session_rate("a", "s"), 10), RateCheck(keys.tenant_rate("a"), 30)]
    await limiter.check_many(checks)  # loads the script if needed
    await redis.config_resetstat()
    await limiter.check_many(checks)
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 2
    assert not {name for name in stats if "script" in name or name == "cmdstat_eval"}


async def test_checks_survive_a_script_flush(limiter: RateLimiter, redis: Redis) -> None:
    checks = [RateCheck(keys.session_rate("a", "s"), 10)]
    await limiter.check_many(checks, now_us=NOW)
    await redis.script_flush()
    assert (await limiter.check_many(checks, now_us=NOW))[0].remaining == 8
    await redis.script_flush()
    assert (await limiter.check(checks[0].key, 10, now_us=NOW)).remaining == 7


async def test_impossible_arguments_are_programming_errors(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match="limit_per_minute"):
        await limiter.check("k", 0)
    with pytest.raises(ValueError, match="cost"):
        await limiter.check("k", 5, cost=6)
    with pytest.raises(ValueError, match="cost"):
        await limiter.check_many([RateCheck("k", 5, -1)])


def test_a_refusal_becomes_429_headers_rounded_up_to_whole_seconds() -> None:
    refused = RateDecision(allowed=False, limit=10, remaining=0, reset_after=60.0, retry_after=5.2)
    assert rate_limit_headers(refused) == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
        "Retry-After": "6",
    }
    error = rate_limited(refused, "session")
    assert isinstance(error, RateLimited)
    assert error.status == 429
    assert error.headers["Retry-After"] == "6"
    assert error.details == {
        "scope": "session",
        "limit": 10,
        "remaining": 0,
        "retryAfter": 6,
        "retry_in_ms": 5200,  # README's one wait for every `rate_limited`, unrounded
        "reset": 60,
    }


def test_an_allowed_decision_has_no_retry_after_header() -> None:
    allowed = RateDecision(allowed=True, limit=10, remaining=4, reset_after=36.5, retry_after=0)
    assert rate_limit_headers(allowed) == {
        "RateLimit-Limit": "10",
        "RateLimit-Remaining": "4",
        "RateLimit-Reset": "37",
    }


def test_the_most_restrictive_decision_is_the_longest_refusal_else_the_fullest() -> None:
    a = RateDecision(allowed=True, limit=10, remaining=3, reset_after=42.0, retry_after=0)
    b = RateDecision(allowed=True, limit=30, remaining=1, reset_after=58.0, retry_after=0)
    c = RateDecision(allowed=False, limit=30, remaining=0, reset_after=60.0, retry_after=2.0)
    d = RateDecision(allowed=False, limit=10, remaining=0, reset_after=60.0, retry_after=6.0)
    assert most_restrictive([a, b]) is b
    assert most_restrictive([a, c]) is c
    assert most_restrictive([c, a, d]) is d
