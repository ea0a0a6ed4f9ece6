"""The operator runs for months while tenants come and go (TierQuota resources created and
deleted): its per-resource bookkeeping goes when the resource goes.

`QuotaReconciler.release` (the deletion's finalizer) added the resource to `_released` and never
took it out again (only a resource re-created under the same name did), and a timer tick that
races with the deletion (which the set exists for) made a new entry in `_locks` that nothing
removed: both grew by one entry per TierQuota ever deleted, for the operator's whole life.
"""

from __future__ import annotations

from redis.asyncio import Redis

from services.operator.reconcile import RELEASED_REMEMBERED, ResourceRef
from tests.operator.conftest import make_reconciler, tier_quota

TENANTS = 2000


async def test_deleted_tier_quotas_leave_nothing_in_the_reconciler(redis: Redis) -> None:
    reconciler = make_reconciler(redis)
    for n in range(TENANTS):
        ref = ResourceRef("tenants", f"trial-{n}")
        spec = tier_quota(f"trial-{n}")
        outcome = await reconciler.reconcile(ref, spec)
        assert outcome is not None
        assert await reconciler.release(ref, spec)  # the finalizer: record removed
        # kopf's timer for the resource may fire once more while it is being deleted.
        assert await reconciler.refresh(ref, spec) is None
    assert await redis.scard("{quota}:tenants") == 0  # Redis is clean, and so is the memory
    assert len(reconciler._released) <= RELEASED_REMEMBERED < TENANTS
    assert reconciler._locks == {}
