"""The quota store: each tenant's tier and limit overrides in Redis, and the api pods' cache.

This is the only module that reads or writes quota records: `orchestrator tenants set|get|list`
and the operator write through `QuotaStore`; api pods read through `QuotaCache`.

Layout and slots: a tenant's record is one JSON string at `{tn:T}:quota`, on the tenant's slot
next to its tenant-wide rate limit and its usage, so a later script may read them together.
The index of tenants that have a record (`{quota}:tenants`) has its own slot, because it spans
tenants; only `list` reads it. Record and index are written in one pipeline but not atomically:
`list` skips an index entry whose record is gone, and a record is readable by `get` whether or
not its index entry has landed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.core import keys
from services.core.errors import InvalidInput
from services.core.ids import Id, is_valid_id
from services.core.redis_client import REDIS_DOWN, REDIS_REFUSING
from services.core.settings import ConfigError, Settings
from services.core.task_stop import cancel_and_wait
from services.core.tiers import (
    DEFAULT_TIER_VARIABLE,
    LimitError,
    TierLimits,
    load_tiers,
    merge_limits,
    validate_overrides,
)

log = logging.getLogger(__name__)

MAX_CACHED_TENANTS = 10_000
START_TIMEOUT_SECONDS = 5.0
LISTEN_POLL_SECONDS = 1.0
# A subscription silent this long is pinged; without an answer by the deadline it is dropped
# and made again. A connection that goes silent without a FIN (a dropped conntrack entry, a
# load balancer failover) otherwise looks like a quiet channel for ever, and the cache keeps
# trusting entries no change will reach.
PING_IDLE_SECONDS = 2.0
PONG_TIMEOUT_SECONDS = 3.0
RECONNECT_DELAYS = (0.05, 2.0)  # first and longest pause between resubscription attempts
# An unreadable record fails every request of its tenant: one error line per tenant this often,
# with the number of requests refused since the last, not one line per request.
UNREADABLE_LOG_SECONDS = 60.0


class InvalidQuota(InvalidInput):
    """A quota write or record that cannot be accepted (unknown tier, bad limit, bad id)."""


class UnreadableQuota(InvalidQuota):
    """A stored quota record this version cannot read (edited by hand, damaged). For the
    tenant's requests it is the deployment's fault, not the client's: 503 `unavailable`
    (was 422 `validation_error`, and sockets were refused 1008 as for a bad request); the
    CLI and the operator handle it as any `InvalidQuota`."""

    code, status = "unavailable", 503


class QuotaRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """What is stored per tenant: a tier plus only the limits that differ from it."""

    tenant_id: Id
    tier: str
    limits: dict[str, Any] = msgspec.field(default_factory=dict)  # camelCase, as in the CRD
    allowed_agents: tuple[Id, ...] | None = None  # None: the tier's list
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EffectiveQuota:
    """The limits a tenant's traffic is held to right now: tier defaults merged with overrides.

    `known` is False for a tenant without a record, which gets the configured default tier.
    """

    tenant_id: str
    tier: str
    limits: TierLimits
    known: bool


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(QuotaRecord)


def _require_tenant(tenant_id: str) -> None:
    if not is_valid_id(tenant_id):
        raise InvalidQuota(
            "tenant id must match [A-Za-z0-9_-]{1,64}", details={"tenantId": tenant_id[:80]}
        )


@dataclass(frozen=True, slots=True)
class QuotaPage:
    """A page of quota records: those set aside as unreadable, and the tenant id to pass as
    `after` for the next page (None: this was the last)."""

    records: list[QuotaRecord]
    unreadable: list[InvalidQuota]
    next_after: str | None


class QuotaStore:
    """Reads and writes quota records; every write is announced on `keys.QUOTA_CHANGES`.

    The announcement (payload: the tenant id) is published only after the write has been
    acknowledged, in a second round trip: a pod that reloads on the announcement must find the
    new record, and on Redis Cluster one pipeline across slots guarantees no order. Writes are
    rare (an operator or an admin), so the extra round trip buys correctness for free.
    """

    def __init__(
        self, redis: Redis, settings: Settings, tiers: Mapping[str, TierLimits] | None = None
    ) -> None:
        self.redis = redis
        self.tiers: Mapping[str, TierLimits] = (
            dict(tiers) if tiers is not None else load_tiers(settings)
        )
        if settings.default_tier not in self.tiers:
            raise ConfigError(
                f"{DEFAULT_TIER_VARIABLE}: unknown tier {settings.default_tier!r}; "
                f"known: {', '.join(self.tiers)}"
            )
        self.default_tier = settings.default_tier
        self.require_known_tenant = settings.require_known_tenant
        self.max_message_chars = settings.max_message_chars

    async def publish_tiers(self) -> None:
        """Record the tier table this api serves, for `orchestrator tenants set` to check its
        own against: run from a shell without the installation's ORCHESTRATOR_TIERS it wrote
        a tier the apis do not have, said it was in force, and the apis served the default
        tier instead."""
        await self.redis.set(keys.INSTALLED_TIERS, msgspec.json.encode(self.tiers))

    async def tier_served_otherwise(self, tier: str) -> tuple[bool, str] | None:
        """How the apis' table differs from this process's for `tier`, and whether a record
        naming it would be wrong (True: they do not have it, or only they do) or only this
        process's description of it (False: they define it with other limits). None when the
        tables agree on it, or when no api has recorded its table yet."""
        raw = await self.redis.get(keys.INSTALLED_TIERS)
        if raw is None:
            return None
        served: dict[str, Any] = msgspec.json.decode(raw)
        if tier not in served:
            return True, f"the apis have no tier {tier!r} (theirs: {', '.join(served)})"
        if tier not in self.tiers:
            return True, f"the apis have a tier {tier!r}, this command's tier table has not"
        if served[tier] != msgspec.json.decode(msgspec.json.encode(self.tiers[tier])):
            return False, f"the apis define tier {tier!r} with other limits than this command"
        return None

    async def set(
        self,
        tenant_id: str,
        tier: str,
        limits: Mapping[str, Any] | None = None,
        allowed_agents: Sequence[str] | None = None,
    ) -> QuotaRecord:
        """Replace the tenant's record (declarative, like the `TierQuota` spec it mirrors).

        `limits` holds camelCase keys of `tiers.LIMIT_KEYS`; `allowed_agents=None` keeps the
        tier's list, an empty list allows every agent.
        """
        _require_tenant(tenant_id)
        if tier not in self.tiers:
            raise InvalidQuota(
                f"unknown tier {tier!r}; known: {', '.join(self.tiers)}",
                details={"tier": tier[:80], "known": list(self.tiers)},
            )
        try:
            overrides = validate_overrides(limits or {})
        except LimitError as exc:
            raise InvalidQuota(str(exc)) from None
        agents = None if allowed_agents is None else tuple(allowed_agents)
        for agent in agents or ():
            if not is_valid_id(agent):
                raise InvalidQuota(f"allowed agent {agent[:80]!r} must match [A-Za-z0-9_-]{{1,64}}")
        record = QuotaRecord(
            tenant_id=tenant_id,
            tier=tier,
            limits=overrides,
            allowed_agents=agents,
            updated_at=datetime.now(UTC),
        )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.tenant_quota(tenant_id), _encoder.encode(record))
            pipe.sadd(keys.QUOTA_TENANTS, tenant_id)
            await pipe.execute()
        await self.announce(tenant_id)
        return record

    async def announce(self, tenant_id: str) -> None:
        """Tell the api pods' caches to drop the tenant's entry (see `QuotaCache`)."""
        await self.redis.publish(keys.QUOTA_CHANGES, tenant_id)

    async def get(self, tenant_id: str) -> QuotaRecord | None:
        _require_tenant(tenant_id)
        return self._decode(tenant_id, await self.redis.get(keys.tenant_quota(tenant_id)))

    async def delete(self, tenant_id: str) -> bool:
        """Remove the record (the tenant falls back to the default tier); True if it existed."""
        _require_tenant(tenant_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.tenant_quota(tenant_id))
            pipe.srem(keys.QUOTA_TENANTS, tenant_id)
            deleted, _ = await pipe.execute()
        await self.announce(tenant_id)
        return bool(deleted)

    async def list(self) -> list[QuotaRecord]:
        """Every record, by tenant id (an unreadable one raises `InvalidQuota`)."""
        page = await self.page()
        if page.unreadable:
            raise page.unreadable[0]
        return page.records

    async def page(self, *, after: str | None = None, limit: int | None = None) -> QuotaPage:
        """The records of the tenants after `after`, by tenant id, at most `limit` of them;
        two round trips whatever the number of tenants (the index's names, then the page's
        records). An unreadable record is set aside, not raised: one damaged record among
        thousands must not hide every other tenant from `tenants list`."""
        members = await self.redis.smembers(keys.QUOTA_TENANTS)
        tenants = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        if after is not None:
            tenants = tenants[bisect.bisect_right(tenants, after) :]
        more = None
        if limit is not None and len(tenants) > limit:
            tenants, more = tenants[:limit], tenants[limit - 1]
        if not tenants:
            return QuotaPage([], [], None)
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant_id in tenants:
                pipe.get(keys.tenant_quota(tenant_id))
            raw = await pipe.execute()
        records, unreadable = [], []
        for tenant_id, value in zip(tenants, raw, strict=True):
            try:
                record = self._decode(tenant_id, value)
            except InvalidQuota as exc:
                unreadable.append(exc)
                continue
            if record is not None:
                records.append(record)
        return QuotaPage(records, unreadable, more)

    async def effective(self, tenant_id: str) -> EffectiveQuota | None:
        """The tenant's limits now; None only for an unknown tenant when those are refused."""
        record = await self.get(tenant_id)
        if record is None:
            if self.require_known_tenant:
                return None
            tier = self.default_tier
            return EffectiveQuota(tenant_id, tier, self.capped(self.tiers[tier]), known=False)
        tier = record.tier
        if tier not in self.tiers:
            # The tier was removed from the configuration after the record was written.
            # The details in the text too: `orchestrator tenants get` prints only that.
            log.warning(
                "quota record of %s names tier %r, unknown here; the default tier %r is used",
                tenant_id,
                tier,
                self.default_tier,
                extra={"tenant_id": tenant_id, "tier": tier, "default_tier": self.default_tier},
            )
            tier = self.default_tier
        limits = self._merged(tenant_id, self.tiers[tier], record.limits)
        if record.allowed_agents is not None:
            limits = msgspec.structs.replace(limits, allowed_agents=record.allowed_agents)
        return EffectiveQuota(tenant_id, tier, self.capped(limits), known=True)

    @staticmethod
    def _merged(tenant_id: str, base: TierLimits, overrides: Mapping[str, Any]) -> TierLimits:
        """`base` with the stored overrides this version can use. A stored override it cannot
        (a limit key from a newer version during a rolling upgrade, a value beyond a bound
        added since it was written) keeps the tier's value and is logged: refusing every send
        of the tenant for a record only an admin can fix would punish the tenant for it."""
        try:
            return merge_limits(base, overrides)
        except LimitError:
            pass
        for key, value in overrides.items():
            try:
                base = merge_limits(base, {key: value})
            except LimitError as exc:
                log.warning(
                    "quota record of %s: override %s not applied (%s); the tier's value is used",
                    tenant_id,
                    key,
                    exc,
                    extra={"tenant_id": tenant_id, "limit": key, "error": str(exc)},
                )
        return base

    def capped(self, limits: TierLimits) -> TierLimits:
        """The limits as they apply: no message is accepted beyond the installation's
        ORCHESTRATOR_MAX_MESSAGE_CHARS whatever a tier or an override says, so what the CLI and
        the operator's status show as effective must not say more."""
        if limits.max_message_chars <= self.max_message_chars:
            return limits
        return msgspec.structs.replace(limits, max_message_chars=self.max_message_chars)

    @staticmethod
    def _decode(tenant_id: str, raw: bytes | str | None) -> QuotaRecord | None:
        if raw is None:
            return None
        try:
            return _decoder.decode(raw)
        except msgspec.DecodeError as exc:  # also covers ValidationError
            # Loud on purpose: silently serving the default tier would downgrade a paying tenant.
            raise UnreadableQuota(f"quota record of {tenant_id} is unreadable: {exc}") from None


@dataclass(slots=True)
class _Entry:
    quota: EffectiveQuota | None
    expires: float


class QuotaCache:
    """`QuotaStore.effective` cached per api pod, dropped per tenant when a change is announced.

    Entries live `ttl` seconds at most; the announcement makes a change visible within about a
    second. Entries are cached only while the subscription is live: a pod that cannot hear
    announcements reads through to Redis. Every (re)subscription clears the whole cache, since
    announcements sent while the connection was down are lost. A generation counter keeps a
    lookup that raced with an announcement from caching the value from before the change.
    """

    def __init__(
        self,
        store: QuotaStore,
        ttl: float,
        *,
        max_entries: int = MAX_CACHED_TENANTS,
        start_timeout: float = START_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._max_entries = max_entries
        self._start_timeout = start_timeout
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._unreadable_logged: dict[str, tuple[float, int]] = {}  # tenant: (when, refused since)
        self._generation = 0
        self.announcements = 0  # changes heard so far (for metrics, and tests that await one)
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        """True while announcements are being received (and entries may be cached)."""
        return self._subscribed.is_set()

    async def start(self) -> None:
        """Subscribe in the background; wait (bounded) for the first subscription.

        When Redis is unreachable the pod still starts: lookups read through until the
        subscription is made.
        """
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="quota-cache-listener")
        try:
            await asyncio.wait_for(self._subscribed.wait(), self._start_timeout)
        except TimeoutError:
            log.warning("quota announcements not subscribed yet; reading quotas uncached")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._go_dark()

    async def effective(self, tenant_id: str) -> EffectiveQuota | None:
        now = self._clock()
        entry = self._entries.get(tenant_id)
        if entry is not None and entry.expires > now:
            return entry.quota
        generation = self._generation
        try:
            quota = await self._store.effective(tenant_id)
        except UnreadableQuota as exc:  # every request of the tenant fails until it is fixed
            self._log_unreadable(tenant_id, exc, now)
            raise
        if self.live and self._ttl > 0 and generation == self._generation:
            self._entries.pop(tenant_id, None)
            if len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # the oldest entry
            self._entries[tenant_id] = _Entry(quota, now + self._ttl)
        return quota

    def _log_unreadable(self, tenant_id: str, exc: UnreadableQuota, now: float) -> None:
        last, refused = self._unreadable_logged.get(tenant_id, (None, 0))
        if last is not None and now - last < UNREADABLE_LOG_SECONDS:
            self._unreadable_logged[tenant_id] = (last, refused + 1)
            return
        if tenant_id not in self._unreadable_logged and (
            len(self._unreadable_logged) >= self._max_entries
        ):
            del self._unreadable_logged[next(iter(self._unreadable_logged))]
        self._unreadable_logged[tenant_id] = (now, 0)
        log.error(
            "%s: set it again with `orchestrator tenants set`",
            exc.message,
            extra={"tenant_id": tenant_id, "refused_since_last_line": refused},
        )

    def forget(self, tenant_id: str | None = None) -> None:
        """Drop one tenant's entry, or every entry."""
        self._generation += 1
        if tenant_id is None:
            self._entries.clear()
        else:
            self._entries.pop(tenant_id, None)
            self._unreadable_logged.pop(tenant_id, None)  # broken again: say so at once

    def _go_dark(self) -> None:
        self._subscribed.clear()
        self.forget()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RECONNECT_DELAYS[0]
        while True:
            pubsub = self._store.redis.pubsub()
            try:
                await pubsub.subscribe(keys.QUOTA_CHANGES)
                heard = loop.time()
                pinged: float | None = None
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_POLL_SECONDS)
                    now = loop.time()
                    if message is not None:  # a pong too
                        heard, pinged = now, None
                        self._on_message(message)
                        delay = RECONNECT_DELAYS[0]
                    elif pinged is not None and now - pinged > PONG_TIMEOUT_SECONDS:
                        raise RedisConnectionError("no answer to a ping on quota announcements")
                    elif pinged is None and now - heard > PING_IDLE_SECONDS:
                        pinged = now
                        async with asyncio.timeout(PONG_TIMEOUT_SECONDS):
                            await pubsub.ping()
            except (*REDIS_DOWN, *REDIS_REFUSING) as exc:  # MISCONF: even a PING is refused
                log.warning("quota announcements lost; resubscribing", extra={"error": str(exc)})
            except Exception:
                log.exception("quota announcement listener failed; resubscribing")
            finally:
                self._go_dark()
                with contextlib.suppress(*REDIS_DOWN):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAYS[1])

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            # The first subscription, or redis-py resubscribing after a reconnect: whatever
            # was announced in between is unknown, so nothing cached is trusted.
            self.forget()
            self._subscribed.set()
        elif kind == "message":
            self.announcements += 1
            data = message.get("data")
            self.forget(data.decode() if isinstance(data, bytes) else str(data))
