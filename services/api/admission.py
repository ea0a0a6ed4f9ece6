"""Tenancy at the door: quotas, tier rules, rate limits and budgets for sends and sockets.

The tier always comes from the quota store (cached per pod, dropped on change), never from
the client. A send's rate limits are the session's and the tenant's (with its token budget,
which also counts the request: one script on the tenant's slot). On one server they run in the
send's own script (`ChatService`); on a cluster they are one pipeline here (`admit_send`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter

from services.api.models import SendRequest
from services.core import clock, keys
from services.core.errors import Forbidden, InvalidInput, RateLimited
from services.core.quotas import EffectiveQuota, QuotaCache
from services.core.ratelimit import (
    RateCheck,
    RateDecision,
    RateLimiter,
    most_restrictive,
    rate_limited,
)
from services.core.settings import Settings
from services.core.tenant_sockets import TenantSockets
from services.core.usage import UsageCounter

rate_limit_rejections = Counter(
    "orchestrator_rate_limit_rejections",
    "Requests refused by a rate limit (sends: session, tenant; history and usage reads: "
    "tenant_reads)",
    ["scope"],
)
quota_rejections = Counter(
    "orchestrator_quota_rejections", "Sends and sockets refused by a tier rule", ["reason"]
)
RATE_LIMIT_SCOPES = ("session", "tenant", "tenant_reads")
QUOTA_REASONS = (
    "unknown_tenant",
    "message_too_long",
    "agent_not_allowed",
    "streaming_not_allowed",
    "token_budget",
)


@dataclass(frozen=True, slots=True)
class SendRules:
    quota: EffectiveQuota
    session: RateCheck
    tenant: RateCheck

    @property
    def checks(self) -> list[RateCheck]:
        return [self.session, self.tenant]


@dataclass(frozen=True, slots=True)
class Admitted:
    quota: EffectiveQuota
    decision: RateDecision  # the most restrictive limit, for the RateLimit-* headers


def check_message(message: str) -> None:
    """Refuse a message the history cannot keep as sent: PostgreSQL `text` cannot hold
    U+0000, so the writer stored U+FFFD where the socket had shown the NUL (valid JSON,
    `\\u0000`), and the history differed from what was sent. Refused at the door instead,
    before anything is queued, on REST (422) and on the socket alike."""
    if "\x00" in message:
        raise InvalidInput(
            "message contains U+0000 (NUL), which the history cannot store",
            details={"position": message.index("\x00")},
        )


def seconds_until_utc_midnight(now: datetime | None = None) -> int:
    moment = now or clock.utcnow()
    tomorrow = (moment + timedelta(days=1)).date()
    midnight = datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC)
    return max(1, int((midnight - moment).total_seconds()) + 1)


class Admission:
    def __init__(
        self,
        quotas: QuotaCache,
        limiter: RateLimiter,
        usage: UsageCounter,
        sockets: TenantSockets,
        settings: Settings,
    ) -> None:
        self.quotas = quotas
        self.limiter = limiter
        self.usage = usage
        self.sockets = sockets
        self.settings = settings

    async def quota(self, tenant_id: str) -> EffectiveQuota:
        quota = await self.quotas.effective(tenant_id)
        if quota is None:
            quota_rejections.labels("unknown_tenant").inc()
            raise Forbidden(f"tenant {tenant_id} is not registered", code="unknown_tenant")
        return quota

    async def admit_send(
        self, tenant_id: str, session_id: str, agent_id: str, request: SendRequest
    ) -> Admitted:
        """Every tier rule, then the rate limits, then the budget; the first refusal wins."""
        rules = await self.send_rules(tenant_id, session_id, agent_id, request)
        return self.judge(rules, await self.limiter.check_many(rules.checks))

    async def send_rules(
        self, tenant_id: str, session_id: str, agent_id: str, request: SendRequest
    ) -> SendRules:
        """The tier's rules for a send (refused here, with no Redis call, when it breaks one)
        and the rate checks it must pass: the session's limit, then the tenant's with the
        day's token budget. `judge` turns their decisions into admission or a refusal."""
        quota = await self.quota(tenant_id)
        limits = quota.limits
        if len(request.message) > limits.max_message_chars:
            quota_rejections.labels("message_too_long").inc()
            raise InvalidInput(
                f"message is longer than the {quota.tier} tier's "
                f"{limits.max_message_chars} characters",
                details={"limit": limits.max_message_chars, "length": len(request.message)},
                code="message_too_long",
            )
        if not limits.allows_agent(agent_id):
            quota_rejections.labels("agent_not_allowed").inc()
            raise Forbidden(
                f"agent {agent_id} is not allowed for this tenant",
                details={"agent_id": agent_id},
                code="agent_not_allowed",
            )
        if request.stream and not limits.streaming:
            quota_rejections.labels("streaming_not_allowed").inc()
            raise Forbidden(
                f"streaming is not part of the {quota.tier} tier",
                details={"tier": quota.tier},
                code="streaming_not_allowed",
            )
        return SendRules(quota, *self._rate_checks(tenant_id, session_id, quota))

    def _rate_checks(
        self, tenant_id: str, session_id: str, quota: EffectiveQuota
    ) -> tuple[RateCheck, RateCheck]:
        limits = quota.limits
        per_session = limits.requests_per_minute_per_session
        budget = self.usage.budget(tenant_id, limits.tokens_per_day)
        session = RateCheck(keys.session_rate(tenant_id, session_id), per_session)
        tenant = RateCheck(
            keys.tenant_rate(tenant_id), limits.requests_per_minute_per_tenant, budget=budget
        )
        return session, tenant

    async def standing(self, tenant_id: str, session_id: str) -> RateDecision:
        """Where a send's limits stand now, taking nothing from them (cost 0 only looks): the
        `RateLimit-*` headers of a replayed send, which sent nothing."""
        quota = await self.quota(tenant_id)
        looks = [
            check._replace(cost=0) for check in self._rate_checks(tenant_id, session_id, quota)
        ]
        return most_restrictive(await self.limiter.check_many(looks))

    def judge(self, rules: SendRules, decisions: Sequence[RateDecision]) -> Admitted:
        """Admitted, or the refusal to answer: the rate limit that lasts longest, then the
        budget."""
        refused = [
            (decision, scope)
            for scope, decision in zip(("session", "tenant"), decisions, strict=True)
            if not decision.allowed
        ]
        if refused:
            decision, scope = max(refused, key=lambda pair: pair[0].retry_after)
            rate_limit_rejections.labels(scope).inc()
            raise rate_limited(decision, scope)
        if not all(decision.within_budget for decision in decisions):
            limits = rules.quota.limits
            quota_rejections.labels("token_budget").inc()
            retry_after = seconds_until_utc_midnight()
            raise RateLimited(
                f"the tenant's {limits.tokens_per_day} tokens per day are used up until "
                "midnight UTC",
                details={"limit": limits.tokens_per_day, "retryAfter": retry_after},
                # Every 429 carries the RateLimit-* headers; here they describe the budget.
                headers={
                    "RateLimit-Limit": str(limits.tokens_per_day),
                    "RateLimit-Remaining": "0",
                    "RateLimit-Reset": str(retry_after),
                    "Retry-After": str(retry_after),
                },
                code="token_budget_exhausted",
            )
        return Admitted(rules.quota, most_restrictive(decisions))
