"""Rate limits shared by every api process: GCRA in one Lua script, one round trip per check.

Why GCRA and not a sliding window: GCRA keeps one integer per limit (O(1) memory and CPU per
check, whatever the limit), where a sliding-window log keeps one entry per request (6 000
sorted-set members for an enterprise tenant) and the two-bucket sliding-window counter is only
an estimate. GCRA is a token bucket in disguise: `limit_per_minute` is both the burst a client
may send at once and the sustained rate (one request per `60 / limit` seconds after the burst),
so the N+1-th request of a burst is refused and allowed again after exactly one interval.

Time comes from the Redis server (`TIME` inside the script), never from the callers, so many
processes with drifting clocks still agree on one limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, NamedTuple

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from services.core.errors import RateLimited

MICROSECONDS = 1_000_000
WINDOW_MICROSECONDS = 60 * MICROSECONDS


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The verdict of one limit; seconds are floats, exact to the microsecond."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float  # until the limit is full again
    retry_after: float  # until the same request would be allowed; 0 when allowed
    # With a `Budget`: False when the limit allowed the request but the day's tokens are used
    # up (the request was not counted). Always True without one.
    within_budget: bool = True


class Budget(NamedTuple):
    """A tenant's daily token budget, checked in the same script as its rate limit (one slot);
    see `UsageCounter.budget`. An allowed check within the budget counts the request."""

    usage_key: str
    tokens_per_day: int | None  # None: unlimited
    ttl_seconds: int


class RateCheck(NamedTuple):
    key: str
    limit_per_minute: int
    cost: int = 1
    budget: Budget | None = None


def _interval(limit_per_minute: int) -> int:
    """Microseconds per request, rounded up so integer rounding never loosens a limit."""
    return -(-WINDOW_MICROSECONDS // limit_per_minute)


def validate_check(check: RateCheck) -> RateCheck:
    if check.limit_per_minute < 1:
        raise ValueError(f"limit_per_minute must be >= 1, got {check.limit_per_minute}")
    if not 0 <= check.cost <= check.limit_per_minute:
        raise ValueError(f"cost must be between 0 and the limit, got {check.cost}")
    return check


def check_arguments(check: RateCheck, now_us: int | None) -> list[int | str]:
    """ratelimit.lua's ARGV for a check (also composed into send.lua)."""
    interval = _interval(check.limit_per_minute)
    moment = "" if now_us is None else now_us
    args: list[int | str] = [interval, interval * check.limit_per_minute, check.cost, moment]
    if check.budget is not None:
        args += [check.budget.tokens_per_day or 0, check.budget.ttl_seconds]
    return args


def check_keys(check: RateCheck) -> tuple[str, ...]:
    return (check.key,) if check.budget is None else (check.key, check.budget.usage_key)


def rate_decision(limit: int, reply: Sequence[int]) -> RateDecision:
    allowed, remaining, reset_after, retry_after, *budget = (int(value) for value in reply)
    return RateDecision(
        allowed=allowed == 1,
        limit=limit,
        remaining=remaining,
        reset_after=reset_after / MICROSECONDS,
        retry_after=retry_after / MICROSECONDS,
        within_budget=not budget or budget[0] == 1,
    )


class RateLimiter:
    """Checks against GCRA limits stored under the keys of `services.core.keys`.

    `now_us` (microseconds since the epoch) exists for tests only: it replaces the server
    clock so a test can move time exactly and without sleeping. Production code never passes it.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._source = (files("services.core") / "lua" / "ratelimit.lua").read_text()
        self._script = redis.register_script(self._source)

    async def check(
        self, key: str, limit_per_minute: int, cost: int = 1, *, now_us: int | None = None
    ) -> RateDecision:
        """Take `cost` from the limit if it has room; one EVALSHA. `cost=0` only looks."""
        check = validate_check(RateCheck(key, limit_per_minute, cost))
        reply = await self._script(keys=[key], args=check_arguments(check, now_us))
        return rate_decision(limit_per_minute, reply)

    async def refund(
        self, key: str, limit_per_minute: int, cost: int = 1, *, now_us: int | None = None
    ) -> None:
        """Give back what an allowed check took (exact: a TAT is a sum of costs)."""
        validate_check(RateCheck(key, limit_per_minute, cost))
        check = RateCheck(key, limit_per_minute, -cost)
        await self._script(keys=[key], args=check_arguments(check, now_us))

    async def check_many(
        self, checks: Sequence[RateCheck], *, now_us: int | None = None
    ) -> list[RateDecision]:
        """Several limits (a session's and its tenant's) in one round trip: all or none.

        The keys live in different slots, so one script cannot hold them; the checks travel
        in one non-transactional pipeline instead. Each check decides on its own, so a request
        refused by one limit would still have consumed from the others: a session throttled
        only by its tenant would drain its own budget while sending nothing. When any check
        refuses, the ones that allowed are therefore refunded (a second round trip, on the
        refusal path only), and the result keeps every decision as made, so the caller can
        report the refusing one. The short window between the check and the refund can only
        refuse a concurrent request that would have fit: it never lets one too many through.

        A check with a `Budget` also checks the day's tokens when its limit allows (its
        decision's `within_budget`) and counts the request when within it; the refund of such
        a check takes that count back. A request over its budget keeps what the rate limits
        took, as when the budget was checked after them.
        """
        for check in checks:
            validate_check(check)
        replies = await self._pipelined(checks, now_us)
        decisions = [
            rate_decision(check.limit_per_minute, reply)
            for check, reply in zip(checks, replies, strict=True)
        ]
        if not all(decision.allowed for decision in decisions):
            await self.give_back(checks, decisions, now_us=now_us)
        return decisions

    async def give_back(
        self,
        checks: Sequence[RateCheck],
        decisions: Sequence[RateDecision],
        *,
        now_us: int | None = None,
    ) -> None:
        """Refund what the allowed ones of `checks` took (their decisions from `check_many`),
        the day's request count included: for a request that in the end sent nothing."""
        refunds = [
            RateCheck(
                check.key,
                check.limit_per_minute,
                -check.cost,
                check.budget if decision.within_budget else None,
            )
            for check, decision in zip(checks, decisions, strict=True)
            if decision.allowed and check.cost
        ]
        if refunds:
            await self._pipelined(refunds, now_us)

    async def _pipelined(self, checks: Sequence[RateCheck], now_us: int | None) -> list[Any]:
        """EVALSHA each check in one pipeline; on NOSCRIPT load the script and redo those.

        redis-py's script objects would add a SCRIPT EXISTS round trip to every pipeline, so
        the pipeline calls EVALSHA itself and only pays for loading after a server restart.
        Only the checks refused with NOSCRIPT run again: the others have already counted.
        """
        replies = await self._evalsha_each(checks, now_us)
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            self._script.sha = await self._redis.script_load(self._source)
            retried = await self._evalsha_each([checks[n] for n in missing], now_us)
            for n, reply in zip(missing, retried, strict=True):
                replies[n] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _evalsha_each(self, checks: Sequence[RateCheck], now_us: int | None) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for check in checks:
                script_keys = check_keys(check)
                pipe.evalsha(
                    self._script.sha,
                    len(script_keys),
                    *script_keys,
                    *check_arguments(check, now_us),
                )
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies


def most_restrictive(decisions: Sequence[RateDecision]) -> RateDecision:
    """The decision to report: the refusal that lasts longest, else the one nearest its limit."""
    if not decisions:
        raise ValueError("no decisions")
    refused = [decision for decision in decisions if not decision.allowed]
    if refused:
        return max(refused, key=lambda decision: decision.retry_after)
    return min(decisions, key=lambda decision: (decision.remaining, -decision.reset_after))


def rate_limit_headers(decision: RateDecision) -> dict[str, str]:
    """`RateLimit-Limit/-Remaining/-Reset`, plus `Retry-After` on a refusal (whole seconds,
    rounded up so a client that waits exactly that long is allowed)."""
    headers = {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(decision.remaining),
        "RateLimit-Reset": str(math.ceil(decision.reset_after)),
    }
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after)))
    return headers


def rate_limited(decision: RateDecision, scope: str) -> RateLimited:
    """The 429 for a refusal, with the same facts in `details` as in the headers (the socket
    sends them in `chat.error`, where there are no headers). `scope`: session | tenant.
    `retry_in_ms` too: the one wait README names for every `rate_limited` (a frame refusal
    has only it), so a page reads one field whatever limit refused it."""
    headers = rate_limit_headers(decision)
    return RateLimited(
        f"{scope} rate limit of {decision.limit} requests per minute exceeded",
        details={
            "scope": scope,
            "limit": decision.limit,
            "remaining": decision.remaining,
            "retryAfter": int(headers.get("Retry-After", "0")),
            "retry_in_ms": max(1, math.ceil(decision.retry_after * 1000)),
            "reset": int(headers["RateLimit-Reset"]),
        },
        headers=headers,
    )
