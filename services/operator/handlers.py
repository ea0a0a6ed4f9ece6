"""kopf wiring: each handler is a few lines over `QuotaReconciler`, which holds the logic.

Handlers: `apply` (create, resume), `change` (update of the spec), `release` (deletion, behind
the finalizer `orchestrator.agents.io/tierquota`), `refresh` (a timer: usage and a level
reconcile) and the index `tierquotas_by_tenant` (which resources name which tenant, so a claim
left by a resource that vanished without its finalizer can be taken over).

Outcomes map to kopf's retry model: an invalid spec is a `PermanentError` (no retry until the
spec changes), Redis being down a `TemporaryError` retried with exponential backoff. Either way
the `Ready` condition says why; a change of reason is logged through kopf's per-object logger,
and a change to not ready (a warning) is also posted as a Kubernetes Event on the resource.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from services.operator.reconcile import QuotaReconciler, ResourceRef, StoreUnavailable
from services.operator.spec import tenant_of
from services.operator.status import READY, Outcome, status_patch

GROUP = "orchestrator.agents.io"
VERSION = "v1alpha1"
PLURAL = "tierquotas"
RESOURCE = (GROUP, VERSION, PLURAL)
FINALIZER = f"{GROUP}/tierquota"
INDEX = "tierquotas_by_tenant"
MAX_RETRY_DELAY_SECONDS = 60.0


def retry_delay(retry: int) -> float:
    """1, 2, 4 ... 60 seconds: the backoff between attempts while Redis is down."""
    return min(MAX_RETRY_DELAY_SECONDS, float(2 ** min(retry, 6)))


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _ref(namespace: str | None, name: str) -> ResourceRef:
    return ResourceRef(namespace or "", name)  # TierQuota is namespaced: always set


def _previous_reason(status: Mapping[str, Any]) -> str | None:
    for condition in status.get("conditions") or ():
        if isinstance(condition, Mapping) and condition.get("type") == READY:
            reason = condition.get("reason")
            return str(reason) if reason is not None else None
    return None


class TierQuotaHandlers:
    def __init__(
        self,
        reconciler: QuotaReconciler,
        *,
        refresh_seconds: float,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.reconciler = reconciler
        self.refresh_seconds = refresh_seconds
        self._clock = clock

    def register(self, registry: kopf.OperatorRegistry) -> kopf.OperatorRegistry:
        kopf.index(*RESOURCE, id=INDEX, registry=registry)(self.index_by_tenant)
        kopf.on.create(*RESOURCE, id="apply", registry=registry)(self.apply)
        kopf.on.resume(*RESOURCE, id="apply", registry=registry)(self.apply)
        kopf.on.update(*RESOURCE, id="change", field="spec", registry=registry)(self.change)
        kopf.on.delete(*RESOURCE, id="release", registry=registry)(self.release)
        kopf.timer(
            *RESOURCE,
            id="refresh",
            interval=self.refresh_seconds,
            initial_delay=min(5.0, self.refresh_seconds),
            registry=registry,
        )(self.refresh)
        return registry

    def index_by_tenant(
        self, *, namespace: str | None, name: str, spec: Mapping[str, Any], **_: Any
    ) -> dict[str, str] | None:
        tenant_id = tenant_of(spec)
        return None if tenant_id is None else {tenant_id: str(_ref(namespace, name))}

    async def apply(
        self,
        *,
        namespace: str | None,
        name: str,
        spec: Mapping[str, Any],
        meta: Mapping[str, Any],
        status: Mapping[str, Any],
        patch: kopf.Patch,
        retry: int,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        outcome = await self.reconciler.reconcile(
            _ref(namespace, name), spec, live_resources=self._live(spec, kwargs)
        )
        self._report(outcome, meta=meta, status=status, patch=patch, logger=logger)
        if outcome.temporary:
            raise kopf.TemporaryError(outcome.message, delay=retry_delay(retry))
        if outcome.permanent:
            raise kopf.PermanentError(outcome.message)

    async def change(
        self,
        *,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
        namespace: str | None,
        name: str,
        retry: int,
        **kwargs: Any,
    ) -> None:
        """A spec update; a changed tenant id (refused by the CRD, kept for safety) first
        releases the old tenant, so a resource never holds two tenants."""
        old_tenant = tenant_of(old or {})
        if old_tenant is not None and old_tenant != tenant_of(new or {}):
            await self._release(_ref(namespace, name), old or {}, retry)
        await self.apply(namespace=namespace, name=name, retry=retry, **kwargs)

    async def release(
        self, *, namespace: str | None, name: str, spec: Mapping[str, Any], retry: int, **_: Any
    ) -> None:
        await self._release(_ref(namespace, name), spec, retry)

    async def refresh(
        self,
        *,
        namespace: str | None,
        name: str,
        spec: Mapping[str, Any],
        meta: Mapping[str, Any],
        status: Mapping[str, Any],
        patch: kopf.Patch,
        logger: kopf.Logger,
        **kwargs: Any,
    ) -> None:
        """Copy today's usage into `status.usage` and re-check ownership and drift.

        An invalid spec is not raised again here: its condition is already in the status.
        """
        outcome = await self.reconciler.refresh(
            _ref(namespace, name), spec, live_resources=self._live(spec, kwargs)
        )
        if outcome is None:  # released: the resource is being deleted
            return
        self._report(outcome, meta=meta, status=status, patch=patch, logger=logger)
        if outcome.temporary:
            raise kopf.TemporaryError(outcome.message, delay=retry_delay(kwargs.get("retry", 0)))

    async def _release(self, ref: ResourceRef, spec: Mapping[str, Any], retry: int) -> None:
        try:
            await self.reconciler.release(ref, spec)
        except StoreUnavailable as exc:
            raise kopf.TemporaryError(str(exc), delay=retry_delay(retry)) from None

    @staticmethod
    def _live(spec: Mapping[str, Any], kwargs: Mapping[str, Any]) -> list[str] | None:
        index = kwargs.get(INDEX)
        tenant_id = tenant_of(spec)
        if index is None or tenant_id is None:
            return None
        return list(index.get(tenant_id, ()))

    def _report(
        self,
        outcome: Outcome,
        *,
        meta: Mapping[str, Any],
        status: Mapping[str, Any],
        patch: kopf.Patch,
        logger: kopf.Logger,
    ) -> None:
        generation = meta.get("generation")
        patch.status.update(
            status_patch(
                outcome,
                generation=generation if isinstance(generation, int) else None,
                previous=status,
                now=self._clock(),
            )
        )
        if _previous_reason(status) != str(outcome.reason):
            level = logging.INFO if outcome.ready else logging.WARNING
            logger.log(level, f"Ready={outcome.ready} ({outcome.reason}): {outcome.message}")
