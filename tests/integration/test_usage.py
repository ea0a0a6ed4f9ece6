"""Daily usage per tenant and the tokens-per-day budget, on a real Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import pytest
from redis.asyncio import Redis

from services.core import keys
from services.core.usage import USAGE_TTL_SECONDS, DailyUsage, UsageCounter


class Clock:
    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2025, 3, 14, 23, 59, 30, tzinfo=UTC))


@pytest.fixture
def usage(redis: Redis, clock: Clock) -> UsageCounter:
    return UsageCounter(redis, clock=clock)


async def test_a_finished_task_counts_its_tokens_and_cost(usage: UsageCounter) -> None:
    assert await usage.add("acme", "task1", input_tokens=100, output_tokens=50, cost=0.25)
    assert await usage.add("acme", "task2", input_tokens=10, output_tokens=5, cost=0.5)
    assert await usage.today("acme") == DailyUsage(
        day="2025-03-14",
        tokens=165,
        input_tokens=110,
        output_tokens=55,
        requests=0,
        tasks=2,
        cost=0.75,
    )


async def test_a_task_reported_twice_counts_once(usage: UsageCounter) -> None:
    assert await usage.add("acme", "task1", input_tokens=100, output_tokens=50)
    assert not await usage.add("acme", "task1", input_tokens=100, output_tokens=50)
    assert (await usage.today("acme")).tokens == 150


async def test_concurrent_reports_of_one_task_count_once(usage: UsageCounter) -> None:
    results = await asyncio.gather(
        *(usage.add("acme", "task1", input_tokens=7, output_tokens=3) for _ in range(20))
    )
    assert results.count(True) == 1
    assert (await usage.today("acme")).tokens == 10


async def test_requests_are_counted_per_tenant(usage: UsageCounter) -> None:
    for _ in range(3):
        await usage.record_request("acme")
    await usage.record_request("other")
    assert (await usage.today("acme")).requests == 3
    assert (await usage.today("other")).requests == 1


async def test_usage_starts_over_at_midnight_utc(usage: UsageCounter, clock: Clock) -> None:
    await usage.add("acme", "task1", input_tokens=1000, output_tokens=0)
    assert await usage.over_budget("acme", 1000)
    clock.moment += timedelta(seconds=31)  # 00:00:01 UTC on the 15th
    assert not await usage.over_budget("acme", 1000)
    assert await usage.today("acme") == DailyUsage(day="2025-03-15")


async def test_the_day_is_the_utc_day_whatever_the_clock_zone(
    usage: UsageCounter, clock: Clock
) -> None:
    # 01:30 on the 15th in UTC+2 is still the 14th in UTC.
    clock.moment = datetime(2025, 3, 15, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert usage.day() == "2025-03-14"


async def test_a_tenant_is_over_budget_once_its_tokens_reach_it(usage: UsageCounter) -> None:
    assert not await usage.over_budget("acme", 100)
    await usage.add("acme", "task1", input_tokens=60, output_tokens=39)
    assert not await usage.over_budget("acme", 100)
    await usage.add("acme", "task2", input_tokens=1, output_tokens=0)
    assert await usage.over_budget("acme", 100)
    assert not await usage.over_budget("other", 100)


async def test_an_unlimited_budget_is_never_exceeded(usage: UsageCounter) -> None:
    await usage.add("acme", "task1", input_tokens=10**9, output_tokens=10**9)
    assert not await usage.over_budget("acme", None)
    assert await usage.admit("acme", None)


async def test_admit_counts_requests_under_budget_and_refuses_over_it(
    usage: UsageCounter,
) -> None:
    assert await usage.admit("acme", 100)
    assert await usage.admit("acme", 100)
    await usage.add("acme", "task1", input_tokens=100, output_tokens=0)
    assert not await usage.admit("acme", 100)
    assert (await usage.today("acme")).requests == 2  # the refused request is not counted


async def test_usage_keys_expire_a_couple_of_days_after_their_last_write(
    usage: UsageCounter, redis: Redis
) -> None:
    await usage.add("acme", "task1", input_tokens=1, output_tokens=1)
    await usage.record_request("acme")
    day_key = keys.tenant_usage("acme", "2025-03-14")
    assert USAGE_TTL_SECONDS - 5 <= await redis.ttl(day_key) <= USAGE_TTL_SECONDS
    assert await redis.ttl(keys.tenant_usage_counted("acme", "task1")) > 86_400


async def test_ids_that_cannot_be_keys_and_negative_counts_are_refused(
    usage: UsageCounter,
) -> None:
    with pytest.raises(ValueError, match="tenant id"):
        await usage.record_request("a:b")
    with pytest.raises(ValueError, match="task id"):
        await usage.add("acme", "t{1}", input_tokens=1, output_tokens=1)
    with pytest.raises(ValueError, match="negative"):
        await usage.add("acme", "task1", input_tokens=-1, output_tokens=1)


def test_usage_reads_as_camel_case_for_status_and_cli() -> None:
    assert DailyUsage(day="2025-03-14", tokens=3, input_tokens=1, output_tokens=2).to_dict() == {
        "day": "2025-03-14",
        "tokens": 3,
        "inputTokens": 1,
        "outputTokens": 2,
        "requests": 0,
        "tasks": 0,
        "cost": 0.0,
    }
