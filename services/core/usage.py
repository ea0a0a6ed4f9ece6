"""Per-tenant usage of each UTC day: tokens, requests, tasks and cost, and the token budget.

Counters live in one hash per tenant per day (`{tn:T}:usage:YYYY-MM-DD`) on the tenant's slot,
so counting a task and marking it counted is one script. A hash outlives its day by about two
days (for `status.usage` and reports), then expires; nothing else cleans up.

The budget is checked before a task runs and usage is known only after it ends, so a tenant
may end its day somewhat over budget (by at most the tasks in flight when it crossed); from
then on it is refused until the next UTC day. The day is the caller's UTC date: pods with
skewed clocks disagree only for the seconds around midnight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis

from services.core import clock, keys
from services.core.ids import is_valid_id
from services.core.ratelimit import Budget

USAGE_TTL_SECONDS = 2 * 86_400
COUNTED_TTL_SECONDS = 2 * 86_400  # longer than any redelivery of a completion callback


def _utcnow() -> datetime:
    return clock.utcnow()  # the day of a budget: the same for every pod


def _require_id(kind: str, value: str) -> None:
    if not is_valid_id(value):
        raise ValueError(f"{kind} must match [A-Za-z0-9_-]{{1,64}}, got {value[:80]!r}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class DailyUsage:
    """One tenant's usage on one UTC day (`day` is `YYYY-MM-DD`)."""

    day: str
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    tasks: int = 0
    cost: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """camelCase, as `TierQuota.status.usage` and the CLI show it."""
        return {
            "day": self.day,
            "tokens": self.tokens,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "requests": self.requests,
            "tasks": self.tasks,
            "cost": self.cost,
        }


class UsageCounter:
    """Counts usage for the token budget of DESIGN §5 (`tokensPerDay`, None = unlimited).

    `clock` exists so tests can cross midnight; it must return an aware datetime.
    """

    def __init__(self, redis: Redis, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._redis = redis
        self._clock = clock
        lua = files("services.core") / "lua"
        self._add = redis.register_script((lua / "usage_add.lua").read_text())
        self._admit = redis.register_script((lua / "usage_admit.lua").read_text())

    def day(self) -> str:
        return self._clock().astimezone(UTC).date().isoformat()

    async def add(
        self,
        tenant_id: str,
        task_id: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost: float = 0.0,
    ) -> bool:
        """Count a finished task's usage once; False when `task_id` was counted before.

        The worker calls this when a task completes; a redelivered callback is harmless.
        """
        script_keys, args = self.add_call(
            tenant_id, task_id, input_tokens=input_tokens, output_tokens=output_tokens, cost=cost
        )
        return bool(await self._add(keys=script_keys, args=args))

    def add_call(
        self,
        tenant_id: str,
        task_id: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost: float = 0.0,
    ) -> tuple[list[str], list[Any]]:
        """The keys and arguments of `usage_add.lua` for `add`, for callers that queue it on a
        pipeline (`Scripts.usage_add`): the worker counts a batch's completions with the
        acknowledgements of the next round trip instead of one round trip each."""
        _require_id("tenant id", tenant_id)
        _require_id("task id", task_id)
        if input_tokens < 0 or output_tokens < 0 or cost < 0:
            raise ValueError("token counts and cost must not be negative")
        script_keys = [
            keys.tenant_usage(tenant_id, self.day()),
            keys.tenant_usage_counted(tenant_id, task_id),
        ]
        args: list[Any] = [
            input_tokens,
            output_tokens,
            repr(float(cost)),
            USAGE_TTL_SECONDS,
            COUNTED_TTL_SECONDS,
        ]
        return script_keys, args

    async def record_request(self, tenant_id: str) -> None:
        """Count one accepted request (one round trip: a pipeline of HINCRBY and EXPIRE)."""
        _require_id("tenant id", tenant_id)
        key = keys.tenant_usage(tenant_id, self.day())
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "requests", 1)
            pipe.expire(key, USAGE_TTL_SECONDS)
            await pipe.execute()

    async def admit(self, tenant_id: str, tokens_per_day: int | None) -> bool:
        """`over_budget` and `record_request` in one round trip: the send path's call.

        True (and the request counted) unless today's tokens have reached the budget.
        """
        _require_id("tenant id", tenant_id)
        reply = await self._admit(
            keys=[keys.tenant_usage(tenant_id, self.day())],
            args=[tokens_per_day or 0, USAGE_TTL_SECONDS],
        )
        return bool(int(reply[0]))

    def budget(self, tenant_id: str, tokens_per_day: int | None) -> Budget:
        """Today's budget, for the tenant's rate-limit check (`RateCheck.budget`): the same
        admission as `admit`, in the limiter's script, so a send's admission is one round trip.
        """
        _require_id("tenant id", tenant_id)
        return Budget(keys.tenant_usage(tenant_id, self.day()), tokens_per_day, USAGE_TTL_SECONDS)

    async def over_budget(self, tenant_id: str, tokens_per_day: int | None) -> bool:
        """True once today's tokens reach the budget; never for an unlimited one (None)."""
        if tokens_per_day is None:
            return False
        _require_id("tenant id", tenant_id)
        used = await self._redis.hget(keys.tenant_usage(tenant_id, self.day()), "tokens")
        return int(used or 0) >= tokens_per_day

    async def today(self, tenant_id: str) -> DailyUsage:
        _require_id("tenant id", tenant_id)
        day = self.day()
        raw = await self._redis.hgetall(keys.tenant_usage(tenant_id, day))
        fields = {_text(name): _text(value) for name, value in raw.items()}
        return DailyUsage(
            day=day,
            tokens=int(fields.get("tokens", 0)),
            input_tokens=int(fields.get("input_tokens", 0)),
            output_tokens=int(fields.get("output_tokens", 0)),
            requests=int(fields.get("requests", 0)),
            tasks=int(fields.get("tasks", 0)),
            cost=float(fields.get("cost", 0.0)),
        )
