"""A `TierQuota`'s spec, checked the way `orchestrator tenants set` checks its arguments.

The CRD's schema already refuses most bad input at the API server; this stays the authority
all the same: the tier table is deployment configuration (`ORCHESTRATOR_TIERS`,
`ORCHESTRATOR_TIERS_FILE`) that a CRD shipped in the chart's `crds/` cannot follow, and Helm never
upgrades `crds/`, so a cluster may validate with an older schema than this operator expects.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from services.core.ids import is_valid_id
from services.core.tiers import LimitError, validate_overrides

UNLIMITED = "unlimited"
"""`spec.limits.tokensPerDay: unlimited`: the kubectl-safe spelling of "no budget".

JSON `null` means the same (as in the quota store), but `kubectl apply` reads a `null` in a
manifest as "remove the field", which silently falls back to the tier's budget.
"""


class InvalidSpec(ValueError):
    """The spec cannot be applied; the message says which field and why, in one line."""


@dataclass(frozen=True, slots=True)
class TierQuotaSpec:
    """A valid spec, normalized: `limits` as the quota store keeps them (camelCase overrides)."""

    tenant_id: str
    tier: str
    limits: dict[str, Any]
    allowed_agents: tuple[str, ...] | None  # None: the tier's list; (): every agent


def tenant_of(spec: Mapping[str, Any]) -> str | None:
    """The spec's tenant id if it is a valid one (what a claim or a record can be keyed by)."""
    tenant_id = spec.get("tenantId")
    return tenant_id if isinstance(tenant_id, str) and is_valid_id(tenant_id) else None


def parse_spec(spec: Mapping[str, Any], tiers: Collection[str]) -> TierQuotaSpec:
    tenant_id = tenant_of(spec)
    if tenant_id is None:
        raise InvalidSpec(
            f"spec.tenantId {str(spec.get('tenantId'))[:80]!r} must match [A-Za-z0-9_-]{{1,64}}"
        )
    tier = spec.get("tier")
    if not isinstance(tier, str) or tier not in tiers:
        raise InvalidSpec(
            f"spec.tier {str(tier)[:80]!r} is not a configured tier "
            f"(configured: {', '.join(tiers)})"
        )
    return TierQuotaSpec(
        tenant_id=tenant_id,
        tier=tier,
        limits=_limits(spec.get("limits")),
        allowed_agents=_allowed_agents(spec.get("allowedAgents")),
    )


def _limits(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidSpec("spec.limits must be an object of limits")
    limits = {
        key: None if key == "tokensPerDay" and value == UNLIMITED else value
        for key, value in raw.items()
    }
    try:
        return validate_overrides(limits)
    except LimitError as exc:
        raise InvalidSpec(f"spec.limits.{exc}") from None


def _allowed_agents(raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list | tuple):
        raise InvalidSpec("spec.allowedAgents must be a list of agent ids")
    for agent in raw:
        if not isinstance(agent, str) or not is_valid_id(agent):
            raise InvalidSpec(
                f"spec.allowedAgents: {str(agent)[:80]!r} must match [A-Za-z0-9_-]{{1,64}}"
            )
    return tuple(dict.fromkeys(raw))  # duplicates dropped, order kept
