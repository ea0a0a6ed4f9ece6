"""`orchestrator tenants set|get|list|delete`: the quota store without Kubernetes.

It writes through `QuotaStore`, the code path the operator uses, so every write is validated
the same way and announced to the api pods. Output is JSON on stdout (an object for `set`,
`get` and `delete`, an array for `list`); errors are one line on stderr. Exit codes: 0 done,
1 no such tenant (or Redis unreachable), 2 invalid argument.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import msgspec
from redis.asyncio import Redis

from services.core.ids import is_valid_id
from services.core.quotas import InvalidQuota, QuotaRecord, QuotaStore
from services.core.redis_client import REDIS_DOWN, create_redis, not_reached
from services.core.settings import ConfigError, Settings
from services.core.tiers import parse_limit_overrides
from services.operator.claims import quota_owner_key


def _require_tenant(tenant_id: str) -> None:
    if not is_valid_id(tenant_id):
        raise ConfigError(f"tenant {tenant_id[:80]!r}: must match [A-Za-z0-9_-]{{1,64}}")


def parse_allowed_agents(text: str | None) -> list[str] | None:
    """`a,b` -> ["a", "b"]; "" -> [] (every agent); None -> None (the tier's list)."""
    if text is None:
        return None
    return [agent.strip() for agent in text.split(",") if agent.strip()]


def record_dict(record: QuotaRecord) -> dict[str, Any]:
    """The stored record in its camelCase form (as in the `TierQuota` spec)."""
    result: dict[str, Any] = msgspec.to_builtins(record)
    return result


async def _describe(store: QuotaStore, record: QuotaRecord) -> dict[str, Any]:
    """The stored record plus `effective`: the tier's defaults merged with its overrides."""
    result = record_dict(record)
    effective = await store.effective(record.tenant_id)
    if effective is not None:
        result["effective"] = {"tier": effective.tier, "limits": effective.limits.to_dict()}
    return result


def _print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), file=out)


def _error(message: str) -> int:
    print(f"orchestrator: {message}", file=sys.stderr)
    return 1


async def _managed(redis: Redis, tenant_id: str, force: bool) -> int | None:
    """Exit 1 for a tenant a TierQuota manages (its owner names the resource), unless forced.

    The operator's timer puts the resource's spec back within its refresh (60 s), and deleting
    the resource removes whatever record is there then: a write here was undone in silence,
    or a later `kubectl delete` took the admin's record with it. Forced, it says so."""
    holder = await redis.get(quota_owner_key(tenant_id))
    if holder is None:
        return None
    owner = holder.decode() if isinstance(holder, bytes) else str(holder)
    if not force:
        return _error(
            f"tenant {tenant_id} is managed by TierQuota {owner}: change that resource "
            "(the operator puts its spec back), or pass --force"
        )
    print(
        f"orchestrator: warning: tenant {tenant_id} is managed by TierQuota {owner}; its "
        "operator puts the resource's spec back within a minute",
        file=sys.stderr,
    )
    return None


def _store(redis: Redis, settings: Settings) -> QuotaStore:
    return QuotaStore(redis, settings)


async def set_command(
    settings: Settings,
    tenant_id: str,
    *,
    tier: str,
    limits: Sequence[str] = (),
    allowed_agents: str | None = None,
    force: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Replace the tenant's record; print it with its effective limits."""
    _require_tenant(tenant_id)
    overrides = parse_limit_overrides(limits)
    agents = parse_allowed_agents(allowed_agents)
    try:
        async with create_redis(settings) as redis:
            if (refused := await _managed(redis, tenant_id, force)) is not None:
                return refused
            store = _store(redis, settings)
            if (otherwise := await store.tier_served_otherwise(tier)) is not None:
                wrong, why = otherwise
                advice = (
                    f"--tier {tier}: {why}; run this with the installation's ORCHESTRATOR_TIERS "
                    "or ORCHESTRATOR_TIERS_FILE (as its api pods have them)"
                )
                if wrong:
                    raise ConfigError(advice)
                print(f"warning: {advice} (the limits printed are this command's)", file=sys.stderr)
            try:
                record = await store.set(tenant_id, tier, overrides, allowed_agents=agents)
            except InvalidQuota as exc:
                raise ConfigError(exc.message) from None
            _print_json(await _describe(store, record), out)
    except REDIS_DOWN as exc:
        return _error(not_reached(exc))
    return 0


async def get_command(settings: Settings, tenant_id: str, *, out: TextIO = sys.stdout) -> int:
    """Print the tenant's record and effective limits; exit 1 for a tenant without one."""
    _require_tenant(tenant_id)
    try:
        async with create_redis(settings) as redis:
            store = _store(redis, settings)
            try:
                record = await store.get(tenant_id)
                if record is None:
                    if store.require_known_tenant:
                        fallback = "unknown tenants are refused"
                    else:
                        fallback = f"it gets the default tier {store.default_tier!r}"
                    return _error(f"tenant {tenant_id} has no quota record ({fallback})")
                _print_json(await _describe(store, record), out)
            except InvalidQuota as exc:
                return _error(exc.message)
    except REDIS_DOWN as exc:
        return _error(not_reached(exc))
    return 0


async def list_command(
    settings: Settings,
    *,
    after: str | None = None,
    limit: int | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print the stored records (overrides only), by tenant id, as a JSON array: all of them,
    or `limit` after the tenant `after` (stderr then names the next page's command). A record
    that cannot be read is named on stderr and the rest printed; the exit status is then 1."""
    if limit is not None and limit < 1:
        raise ConfigError("--limit: must be at least 1")  # a bad argument: exit 2
    try:
        async with create_redis(settings) as redis:
            page = await _store(redis, settings).page(after=after, limit=limit)
    except REDIS_DOWN as exc:
        return _error(not_reached(exc))
    _print_json([record_dict(record) for record in page.records], out)
    if page.next_after is not None:
        print(
            f"more: orchestrator tenants list --limit {limit} --after={page.next_after}",
            file=sys.stderr,
        )
    for unreadable in page.unreadable:
        _error(unreadable.message)
    return 1 if page.unreadable else 0


async def delete_command(
    settings: Settings, tenant_id: str, *, force: bool = False, out: TextIO = sys.stdout
) -> int:
    """Remove the tenant's record (it falls back to the default tier); exit 1 if it had none."""
    _require_tenant(tenant_id)
    try:
        async with create_redis(settings) as redis:
            if (refused := await _managed(redis, tenant_id, force)) is not None:
                return refused
            deleted = await _store(redis, settings).delete(tenant_id)
    except REDIS_DOWN as exc:
        return _error(not_reached(exc))
    if not deleted:
        return _error(f"tenant {tenant_id} has no quota record")
    _print_json({"tenantId": tenant_id, "deleted": True}, out)
    return 0
