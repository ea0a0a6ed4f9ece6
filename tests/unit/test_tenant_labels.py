"""The worker's bounded tenant labels."""

from __future__ import annotations

from services.core.ids import is_valid_id
from services.worker.metrics import OTHER_TENANTS, TenantLabels


def test_tenants_beyond_the_limit_share_a_label_no_tenant_can_have() -> None:
    labels = TenantLabels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "other")] == [
        "a",
        "b",
        OTHER_TENANTS,
        "a",
        OTHER_TENANTS,
    ]
    assert not is_valid_id(OTHER_TENANTS)  # a tenant named "other" is not mixed with them
    early = TenantLabels(2)
    assert early("other") == "other"
