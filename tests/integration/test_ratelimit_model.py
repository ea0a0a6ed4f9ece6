"""The Lua limiter agrees with a reference model on every random sequence of requests.

The reference is a token bucket written independently of the script's GCRA formulation: the
bucket holds up to `limit` intervals of credit, refills one microsecond of credit per
microsecond, and a request of `cost` needs `cost` intervals of it. The two are equivalent on
paper; this test checks that the script (integer microseconds in Lua doubles, key expiry,
refusals that write nothing) is too. Time is driven through the limiter's test-only `now_us`,
so every example is deterministic and instant.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from services.core.ratelimit import RateDecision, RateLimiter

START = 1_700_000_000_000_000  # microseconds since the epoch
MINUTE = 60_000_000


@dataclass
class TokenBucket:
    limit: int
    interval: int = field(init=False)
    capacity: int = field(init=False)
    credit: int = field(init=False)
    last: int | None = None

    def __post_init__(self) -> None:
        self.interval = -(-MINUTE // self.limit)  # 60 s / limit, rounded up to the microsecond
        self.capacity = self.credit = self.interval * self.limit

    def take(self, now: int, cost: int) -> RateDecision:
        if self.last is not None:
            self.credit = min(self.capacity, self.credit + (now - self.last))
        self.last = now
        needed = cost * self.interval
        allowed = self.credit >= needed
        if allowed:
            self.credit -= needed
        return RateDecision(
            allowed=allowed,
            limit=self.limit,
            remaining=self.credit // self.interval,
            reset_after=(self.capacity - self.credit) / 1_000_000,
            retry_after=0.0 if allowed else (needed - self.credit) / 1_000_000,
        )


# Mostly small steps (inside one interval), some zero (a burst), some long (refills, expiry).
advances = st.one_of(
    st.just(0),
    st.integers(min_value=1, max_value=2_000_000),
    st.integers(min_value=0, max_value=2 * MINUTE),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    # Limits up to 60/min keep every stored key alive >= 1 s of real time, far longer than an
    # example runs, so the server's real-clock expiry never races the simulated clock.
    limit = draw(st.integers(min_value=1, max_value=60))
    steps = draw(
        st.lists(
            st.tuples(advances, st.integers(min_value=0, max_value=limit)),
            min_size=1,
            max_size=40,
        )
    )
    return limit, steps


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(scenario=scenarios())
async def test_lua_limiter_matches_the_token_bucket_model(
    redis: Redis, scenario: tuple[int, list[tuple[int, int]]]
) -> None:
    limit, steps = scenario
    limiter = RateLimiter(redis)
    model = TokenBucket(limit)
    key = f"{{model:{uuid.uuid4().hex}}}:rl"  # a fresh limit per example
    now = START
    for step, (advance, cost) in enumerate(steps):
        now += advance
        expected = model.take(now, cost)
        actual = await limiter.check(key, limit, cost, now_us=now)
        assert actual == expected, f"step {step}: +{advance}us cost {cost}"
