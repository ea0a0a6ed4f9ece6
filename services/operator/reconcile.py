"""Every decision of the TierQuota operator, in plain code over Redis (no Kubernetes here).

`reconcile` is level-triggered and idempotent: create, update, resume and the periodic timer
all call it with the resource's current spec, and it converges the quota store on that spec.
It writes the tenant's record (through `QuotaStore`, the module `orchestrator tenants` uses,
which announces the change to the api pods) only when this resource owns the tenant and the
stored record differs, so the timer costs a read, not a write and an announcement, per tick.
A record edited behind the operator's back (`orchestrator tenants set`) is put back on the
next tick.

An invalid spec keeps whatever was applied before: a typo in a paying tenant's resource must
not drop the tenant to the default tier. Deleting the resource (`release`) removes the
tenant's record only if this resource owns the tenant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from services.core.quotas import InvalidQuota, QuotaRecord, QuotaStore
from services.core.redis_client import REDIS_DOWN, REDIS_REFUSING
from services.core.tenant_sockets import TenantSockets
from services.core.tiers import TierLimits, merge_limits
from services.core.usage import UsageCounter
from services.operator.claims import Claim, TenantClaims
from services.operator.spec import UNLIMITED, InvalidSpec, TierQuotaSpec, parse_spec, tenant_of
from services.operator.status import Outcome, Reason, timestamp

log = logging.getLogger(__name__)

RELEASED_REMEMBERED = 1024  # deleted resources whose late timer ticks are refused


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ResourceRef:
    """One `TierQuota` resource; `namespace/name` is how claims and messages name it."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class StoreUnavailable(Exception):
    """Redis could not be reached; the caller retries later (one-line message)."""


def is_stale_holder(
    holder: str,
    *,
    live_resources: Collection[str] | None,
    watched_namespaces: Collection[str] | None,
) -> bool:
    """True when the holder of a claim provably no longer names the tenant.

    `live_resources` are the `namespace/name` of every resource that names the tenant in the
    namespaces this operator watches (`watched_namespaces`, None for all), as seen by a fully
    populated index; None when unknown. A holder in a namespace this operator does not watch
    (another operator's) is never judged.
    """
    if live_resources is None:
        return False
    namespace = holder.partition("/")[0]
    if watched_namespaces is not None and namespace not in watched_namespaces:
        return False
    return holder not in live_resources


def _same(record: QuotaRecord | None, wanted: TierQuotaSpec) -> bool:
    return (
        record is not None
        and record.tier == wanted.tier
        and record.limits == wanted.limits
        and record.allowed_agents == wanted.allowed_agents
    )


def _describe(wanted: TierQuotaSpec) -> str:
    overrides = len(wanted.limits)
    text = f"tenant {wanted.tenant_id}: tier {wanted.tier}"
    if overrides:
        text += f" with {overrides} limit override{'s' if overrides > 1 else ''}"
    if wanted.allowed_agents is not None:
        text += f", {len(wanted.allowed_agents) or 'any'} allowed agent(s)"
    return text


def shown(tier: str, limits: TierLimits) -> dict[str, Any]:
    """Limits in force as `status.effective` shows them."""
    fields = limits.to_dict()
    if fields.get("tokensPerDay") is None:
        fields["tokensPerDay"] = UNLIMITED  # a null would be dropped by the merge patch
    return {"tier": tier, **fields}


def effective_limits(tier: TierLimits, wanted: TierQuotaSpec, store: QuotaStore) -> dict[str, Any]:
    """What `status.effective` shows: the tier merged with the overrides, as the api sees it
    (capped by the installation's ORCHESTRATOR_MAX_MESSAGE_CHARS, as the store caps it: the
    status said an enterprise tenant could send 32 000 characters where the api took 4 000)."""
    limits = merge_limits(tier, wanted.limits)
    if wanted.allowed_agents is not None:
        limits = msgspec.structs.replace(limits, allowed_agents=tuple(wanted.allowed_agents))
    return shown(wanted.tier, store.capped(limits))


def _claim_outcome(
    wanted: TierQuotaSpec, claim: Claim, tier: TierLimits, store: QuotaStore
) -> Outcome:
    tenant = wanted.tenant_id
    if not claim.ours:
        return Outcome(
            Reason.CONFLICT,
            f"tenant {tenant} is owned by TierQuota {claim.holder}; this resource's limits are "
            "not applied while that resource exists (delete one of the two)",
        )
    if claim.contenders:
        return Outcome(
            Reason.CONFLICT,
            f"tenant {tenant} is also named by TierQuota {', '.join(claim.contenders)}; this "
            f"resource claimed it first and its limits are in force ({_describe(wanted)}); "
            "delete the other resource(s)",
            effective=effective_limits(tier, wanted, store),
        )
    return Outcome(
        Reason.APPLIED,
        f"{_describe(wanted)} in force",
        effective=effective_limits(tier, wanted, store),
    )


class QuotaReconciler:
    def __init__(
        self,
        store: QuotaStore,
        claims: TenantClaims,
        usage: UsageCounter,
        sockets: TenantSockets,
        *,
        watched_namespaces: Collection[str] | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.store = store
        self.claims = claims
        self.usage_counter = usage
        self.sockets = sockets
        self.watched_namespaces = None if watched_namespaces is None else set(watched_namespaces)
        self._clock = clock
        # kopf runs a resource's timer concurrently with its handlers, even with its deletion
        # handler: each resource's calls are serialized here, and a released resource is
        # remembered so that a timer tick racing with the deletion cannot claim the tenant again.
        # The last RELEASED_REMEMBERED releases only (oldest first): a racing tick comes within
        # seconds of its deletion, and the operator lives while tenants come and go for months.
        self._locks: dict[str, asyncio.Lock] = {}
        self._released: dict[str, None] = {}
        # Tenants whose record was written but maybe not announced (`_write_if_changed`).
        self._unannounced: set[str] = set()

    async def reconcile(
        self,
        ref: ResourceRef,
        spec: Mapping[str, Any],
        *,
        live_resources: Collection[str] | None = None,
    ) -> Outcome:
        """Converge the quota store on `spec`; the outcome is what `status` should say.

        `live_resources`: see `is_stale_holder` (lets a claim left by a resource that vanished
        without its finalizer be taken over). Never raises for bad input or Redis outages:
        those are outcomes (`permanent`, `temporary`) that the status must show.
        """
        async with self._lock(ref):
            self._released.pop(str(ref), None)  # a resource created again under the same name
            return await self._converge(ref, spec, live_resources, with_usage=False)

    async def refresh(
        self,
        ref: ResourceRef,
        spec: Mapping[str, Any],
        *,
        live_resources: Collection[str] | None = None,
    ) -> Outcome | None:
        """The timer's reconcile, with today's usage; None once the resource was released."""
        if str(ref) in self._released:
            return None  # and no lock made again for it
        async with self._lock(ref):
            if str(ref) in self._released:
                return None
            return await self._converge(ref, spec, live_resources, with_usage=True)

    def _lock(self, ref: ResourceRef) -> asyncio.Lock:
        return self._locks.setdefault(str(ref), asyncio.Lock())

    async def _converge(
        self,
        ref: ResourceRef,
        spec: Mapping[str, Any],
        live_resources: Collection[str] | None,
        *,
        with_usage: bool,
    ) -> Outcome:
        try:
            wanted = parse_spec(spec, self.store.tiers)
        except InvalidSpec as exc:
            return await self._invalid(ref, spec, exc)
        try:
            claim = await self.claims.claim(wanted.tenant_id, str(ref))
            if not claim.ours and is_stale_holder(
                claim.holder,
                live_resources=live_resources,
                watched_namespaces=self.watched_namespaces,
            ):
                log.warning(
                    "taking over a tenant claimed by a TierQuota that no longer exists",
                    extra={
                        "resource": str(ref),
                        "tenant_id": wanted.tenant_id,
                        "stale_owner": claim.holder,
                    },
                )
                claim = await self.claims.claim(wanted.tenant_id, str(ref), replace=claim.holder)
            if claim.ours:
                await self._write_if_changed(ref, wanted)
            outcome = _claim_outcome(wanted, claim, self.store.tiers[wanted.tier], self.store)
            if with_usage:
                outcome = dataclasses.replace(outcome, usage=await self.usage(wanted.tenant_id))
        except REDIS_DOWN as exc:
            return Outcome(Reason.REDIS_UNAVAILABLE, f"cannot reach Redis ({exc}); retrying")
        except REDIS_REFUSING as exc:  # out of memory, a read-only replica: as an outage
            return Outcome(Reason.REDIS_UNAVAILABLE, f"Redis refuses writes ({exc}); retrying")
        except InvalidQuota as exc:  # the store refused what parse_spec accepted: a bug
            return Outcome(Reason.INVALID_SPEC, exc.message)
        return outcome

    async def _invalid(
        self, ref: ResourceRef, spec: Mapping[str, Any], problem: InvalidSpec
    ) -> Outcome:
        """Nothing is written for a spec that cannot be applied; the status says what is in
        force instead, when this resource owns the tenant. That is not always what was
        applied before: a tier removed from ORCHESTRATOR_TIERS since leaves the tenant on the
        default tier (the status kept showing the removed tier's limits as in force)."""
        written = "nothing was written"
        tenant_id = tenant_of(spec)
        try:
            if tenant_id is None or await self.claims.holder(tenant_id) != str(ref):
                return Outcome(Reason.INVALID_SPEC, f"{problem}; {written}")
            quota = await self.store.effective(tenant_id)
        except (*REDIS_DOWN, *REDIS_REFUSING, InvalidQuota):
            return Outcome(Reason.INVALID_SPEC, f"{problem}; {written}")
        if quota is None:  # no record, and unknown tenants are refused
            return Outcome(Reason.INVALID_SPEC, f"{problem}; {written}; the tenant is refused")
        return Outcome(
            Reason.INVALID_SPEC,
            f"{problem}; {written}; in force: tier {quota.tier}",
            effective=shown(quota.tier, quota.limits),
        )

    async def release(self, ref: ResourceRef, spec: Mapping[str, Any]) -> bool:
        """Remove the tenant's record if this resource owns the tenant; stop contending.

        True if a record was removed. Raises `StoreUnavailable` when Redis is down (the
        finalizer then keeps the resource until a retry succeeds).
        """
        async with self._lock(ref):
            self._released[str(ref)] = None
            if len(self._released) > RELEASED_REMEMBERED:
                del self._released[next(iter(self._released))]
            removed = await self._release(ref, spec)
        self._locks.pop(str(ref), None)
        return removed

    async def _release(self, ref: ResourceRef, spec: Mapping[str, Any]) -> bool:
        tenant_id = tenant_of(spec)
        if tenant_id is None:  # never valid, so never claimed anything
            return False
        claimant = str(ref)
        try:
            removed = False
            if await self.claims.holder(tenant_id) == claimant:
                # The claim is still ours here, so no one else can have written the record.
                removed = await self.store.delete(tenant_id)
            await self.claims.release(tenant_id, claimant)
        except REDIS_DOWN as exc:
            raise StoreUnavailable(f"cannot reach Redis ({exc}); retrying") from None
        except REDIS_REFUSING as exc:
            raise StoreUnavailable(f"Redis refuses writes ({exc}); retrying") from None
        if removed:
            log.info("tier quota removed", extra={"resource": claimant, "tenant_id": tenant_id})
        return removed

    async def usage(self, tenant_id: str) -> dict[str, Any]:
        """Today's usage as `status.usage` shows it (UTC day, live sockets across all pods)."""
        today = await self.usage_counter.today(tenant_id)
        connections = await self.sockets.live(tenant_id)
        return {
            "day": today.day,
            "tokensToday": today.tokens,
            "requestsToday": today.requests,
            "connections": connections,
            "updatedAt": timestamp(self._clock()),
        }

    async def _write_if_changed(self, ref: ResourceRef, wanted: TierQuotaSpec) -> None:
        tenant_id = wanted.tenant_id
        try:
            current = await self.store.get(tenant_id)
        except InvalidQuota:
            current = None  # unreadable: overwrite it with the spec
        if _same(current, wanted):
            if tenant_id in self._unannounced:  # written by an earlier pass that then failed
                await self.store.announce(tenant_id)
                self._unannounced.discard(tenant_id)
            return
        # The write and its announcement are two round trips: should the second fail, the
        # retry finds the record unchanged, and without this the api pods would serve the
        # old limits until their cache expires (ORCHESTRATOR_VALIDATION_CACHE_TTL).
        self._unannounced.add(tenant_id)
        await self.store.set(
            tenant_id, wanted.tier, wanted.limits, allowed_agents=wanted.allowed_agents
        )
        self._unannounced.discard(tenant_id)
        log.info(
            "tier quota applied",
            extra={"resource": str(ref), "tenant_id": wanted.tenant_id, "tier": wanted.tier},
        )
