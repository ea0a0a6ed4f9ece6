"""Which `TierQuota` owns a tenant: one claim per tenant in Redis, first come, first served.

Two resources naming the same tenant are a conflict that both of them report, never a silent
last-writer-wins. The first resource to claim a tenant owns it: only the owner's spec is
written to the quota store. Every other claimant is a contender: it is told who owns the
tenant, and the owner is told who contends, so both show the conflict in their status.

- `{tn:T}:quota-owner` holds the owner as `namespace/name`. It is set only while absent and
  deleted only by its holder, after the holder has removed the tenant's record (the finalizer),
  so the record and the claim never belong to different resources. A contender claims the
  tenant on its next reconcile once the owner has gone.
- `{tn:T}:quota-contenders` is a sorted set of the other claimants, scored by when each last
  asked (seconds since the epoch). Contenders renew their entry on every reconcile; one not
  renewed within `contender_ttl` is forgotten, so a contender removed behind the operator's back
  stops being reported.

Both keys are on the tenant's slot (`{tn:T}`), next to its quota record; every call is one
script. The owner key never expires: an owner whose resource is gone without its finalizer
having run is replaced only when the caller proves it stale (`claim(..., replace=...)`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

# Kept beside the scripts that use them; candidates for `services.core.keys` (the key registry).


def quota_owner_key(tenant_id: str) -> str:
    return f"{{tn:{tenant_id}}}:quota-owner"


def quota_contenders_key(tenant_id: str) -> str:
    return f"{{tn:{tenant_id}}}:quota-contenders"


# KEYS: owner, contenders. ARGV: claimant, now, stale holder to replace ('' for none), ttl.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or (ARGV[3] ~= '' and holder == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1])
  holder = ARGV[1]
end
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
if holder == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('EXPIRE', KEYS[2], math.ceil(ttl))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
return {holder, redis.call('ZRANGE', KEYS[2], 0, -1)}
"""

# KEYS: owner, contenders. ARGV: claimant. Returns 1 if it held the claim.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of asking for a tenant: who holds it and who else wants it."""

    claimant: str
    holder: str
    contenders: tuple[str, ...]  # the other claimants, never the holder nor `claimant`

    @property
    def ours(self) -> bool:
        return self.holder == self.claimant


class TenantClaims:
    def __init__(
        self,
        redis: Redis,
        *,
        contender_ttl: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if contender_ttl <= 0:
            raise ValueError("contender_ttl must be positive")
        self._contender_ttl = contender_ttl
        self._clock = clock
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._redis = redis

    async def claim(self, tenant_id: str, claimant: str, *, replace: str | None = None) -> Claim:
        """Take the tenant if it is free (or held by `replace`), else register as a contender."""
        holder, contenders = await self._claim(
            keys=[quota_owner_key(tenant_id), quota_contenders_key(tenant_id)],
            args=[claimant, repr(self._clock()), replace or "", math.ceil(self._contender_ttl)],
        )
        holder_text = _text(holder)
        others = tuple(
            sorted(c for c in map(_text, contenders) if c not in (claimant, holder_text))
        )
        return Claim(claimant=claimant, holder=holder_text, contenders=others)

    async def holder(self, tenant_id: str) -> str | None:
        value = await self._redis.get(quota_owner_key(tenant_id))
        return None if value is None else _text(value)

    async def release(self, tenant_id: str, claimant: str) -> bool:
        """Give up the tenant (if held) and stop contending; True if `claimant` held it."""
        released = await self._release(
            keys=[quota_owner_key(tenant_id), quota_contenders_key(tenant_id)], args=[claimant]
        )
        return bool(released)
