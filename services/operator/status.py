"""What a `TierQuota`'s status says: the `Ready` condition, the generation seen, today's usage.

Conditions follow the Kubernetes conventions (`type`, `status` "True"/"False"/"Unknown",
`reason` in CamelCase, `message`, `lastTransitionTime`, `observedGeneration`);
`lastTransitionTime` moves only when `status` changes. Conditions of other types (written by
someone else) are kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

READY = "Ready"


class Reason(StrEnum):
    APPLIED = "Applied"  # the spec is the tenant's quota record
    CONFLICT = "Conflict"  # another TierQuota names the same tenant
    INVALID_SPEC = "InvalidSpec"  # permanent until the spec changes
    REDIS_UNAVAILABLE = "RedisUnavailable"  # temporary; retried with backoff


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one reconcile: what the `Ready` condition says, and usage if read."""

    reason: Reason
    message: str
    usage: dict[str, Any] | None = None
    effective: dict[str, Any] | None = None  # the tenant's limits, when this resource owns it

    @property
    def ready(self) -> bool:
        return self.reason is Reason.APPLIED

    @property
    def permanent(self) -> bool:
        """Retrying cannot help until the spec (or the tier configuration) changes."""
        return self.reason is Reason.INVALID_SPEC

    @property
    def temporary(self) -> bool:
        return self.reason is Reason.REDIS_UNAVAILABLE


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, second precision, as Kubernetes writes `metav1.Time`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def ready_condition(
    outcome: Outcome,
    *,
    generation: int | None,
    previous: Sequence[Mapping[str, Any]] = (),
    now: datetime,
) -> dict[str, Any]:
    status = "True" if outcome.ready else "False"
    before = next((c for c in previous if c.get("type") == READY), None)
    kept = before.get("lastTransitionTime") if before is not None else None
    if before is None or before.get("status") != status or not kept:
        kept = timestamp(now)
    condition: dict[str, Any] = {
        "type": READY,
        "status": status,
        "reason": str(outcome.reason),
        "message": outcome.message,
        "lastTransitionTime": kept,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def status_patch(
    outcome: Outcome,
    *,
    generation: int | None,
    previous: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """The fields of `status` to merge in (kopf's own `status.kopf` is left alone)."""
    conditions = list((previous or {}).get("conditions") or [])
    others = [c for c in conditions if isinstance(c, Mapping) and c.get("type") != READY]
    ready = ready_condition(outcome, generation=generation, previous=conditions, now=now)
    patch: dict[str, Any] = {"conditions": [ready, *others]}
    if generation is not None:
        patch["observedGeneration"] = generation
    if outcome.usage is not None:
        patch["usage"] = outcome.usage
    if outcome.reason in (Reason.APPLIED, Reason.CONFLICT) or outcome.effective is not None:
        patch["effective"] = outcome.effective  # None (a contender) removes it
    return patch
