"""`orchestrator operator`: build the quota reconciler, hand it to kopf, run until stopped.

Everything that can be wrong before talking to Kubernetes (settings, the tier table, no
cluster configured at all) stops the process with one line and a non-zero exit, before kopf
starts; kopf then owns retries of everything it talks to.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kopf

from services.core.quotas import QuotaStore
from services.core.redis_client import create_redis
from services.core.settings import ConfigError, Settings
from services.core.tenant_sockets import TenantSockets
from services.core.usage import UsageCounter
from services.operator.claims import TenantClaims
from services.operator.handlers import FINALIZER, GROUP, TierQuotaHandlers
from services.operator.reconcile import QuotaReconciler
from services.operator.settings import MAX_PRIORITY, OperatorSettings, require_dns_label

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_KUBECONFIG = Path("~/.kube/config")
NO_CLUSTER = (
    "no Kubernetes cluster configured: set KUBECONFIG (or create ~/.kube/config), "
    "or run in a pod with a service account token"
)
_DROPPED_LOG_FIELDS = ("settings", "k8s_skip")


class NoCluster(ConfigError):
    """Neither a kubeconfig nor an in-cluster service account: nothing to connect to."""


class ClusterUnreachable(ConfigError):
    """kopf gave up reaching the API server (after its own retries): a wrong server or
    credentials, or no network path to it. One line instead of kopf's traceback."""


def cluster_source(
    environ: Mapping[str, str] | None = None,
    *,
    token: Path = SERVICE_ACCOUNT_TOKEN,
    home_config: Path = DEFAULT_KUBECONFIG,
) -> str | None:
    """Where the API credentials come from: "kubeconfig", "service-account", or None.

    The order of kubectl and the official clients: an explicit `KUBECONFIG` wins, then the
    pod's service account (`KUBERNETES_SERVICE_HOST` set and a token mounted), then
    `~/.kube/config`.
    """
    env = os.environ if environ is None else environ
    if env.get("KUBECONFIG"):
        return "kubeconfig"
    if env.get("KUBERNETES_SERVICE_HOST") and token.exists():
        return "service-account"
    if home_config.expanduser().exists():
        return "kubeconfig"
    return None


def login(*, settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own rudimentary logins, chosen by `cluster_source` (no client library needed)."""
    source = cluster_source()
    if source == "service-account":
        return kopf.login_with_service_account(settings=settings, **kwargs)
    if source == "kubeconfig":
        return kopf.login_with_kubeconfig(settings=settings, **kwargs)
    raise kopf.LoginError(NO_CLUSTER)


@dataclass(frozen=True, slots=True)
class Scope:
    """Which namespaces the operator serves; `namespaces` empty means all of them."""

    namespaces: tuple[str, ...]

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def resolve_scope(
    operator_settings: OperatorSettings,
    *,
    namespaces: Collection[str] = (),
    all_namespaces: bool = False,
) -> Scope:
    """Command-line choices win over `ORCHESTRATOR_OPERATOR_NAMESPACES`."""
    if all_namespaces and namespaces:
        raise ConfigError("--namespace and --all-namespaces exclude each other")
    if all_namespaces:
        return Scope(())
    for namespace in namespaces:
        try:
            require_dns_label(namespace)
        except ValueError as exc:
            raise ConfigError(f"--namespace: {exc}") from None
    return Scope(tuple(dict.fromkeys(namespaces)) or tuple(operator_settings.namespaces))


def kopf_settings(*, pod_name: str | None) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    # Progress in `status.kopf` (the CRD preserves it); the last handled spec in our annotation.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # No watching of namespaces and CRDs: RBAC stays at tierquotas, events and peering.
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Warnings and errors about a resource (a Ready=False change, a failed handler) become
    # Events on it; INFO stays in the logs (a timer tick must not post an Event).
    settings.posting.loggers = True
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "orchestrator-operator"
    settings.posting.reporting_instance = pod_name or "operator"
    settings.peering.stealth = True
    return settings


def build_operator(
    settings: Settings,
    operator_settings: OperatorSettings,
    scope: Scope,
) -> kopf.OperatorRegistry:
    """The registry with every handler, over a reconciler on a (lazily connecting) client."""
    redis = create_redis(settings, max_connections=16)
    store = QuotaStore(redis, settings)  # validates the tier table: ConfigError before kopf
    reconciler = QuotaReconciler(
        store,
        TenantClaims(redis, contender_ttl=operator_settings.contender_ttl),
        UsageCounter(redis),
        TenantSockets(redis, settings.connection_ttl_seconds),
        watched_namespaces=scope.namespaces or None,
    )
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)

    async def close_redis(**_: Any) -> None:
        await redis.aclose()

    kopf.on.cleanup(registry=registry)(close_redis)
    TierQuotaHandlers(reconciler, refresh_seconds=operator_settings.refresh_seconds).register(
        registry
    )
    return registry


class OperatorLogFields(logging.Filter):
    """kopf's per-object records carry `k8s_ref` (and internal fields): keep a flat `resource`."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = vars(record)
        for key in _DROPPED_LOG_FIELDS:
            fields.pop(key, None)
        ref = fields.pop("k8s_ref", None)
        if isinstance(ref, Mapping) and ref.get("name"):
            namespace = ref.get("namespace")
            fields.setdefault(
                "resource", f"{namespace}/{ref['name']}" if namespace else ref["name"]
            )
        return True


def configure_operator_logging(level: str) -> None:
    from services.core.logs import configure_logging

    configure_logging(level, "operator")
    for handler in logging.getLogger().handlers:
        handler.addFilter(OperatorLogFields())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # the liveness probe


def operator_arguments(
    settings: Settings,
    operator_settings: OperatorSettings,
    scope: Scope,
    *,
    standalone: bool | None = None,
    priority: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `kopf.run` / `kopf.operator`: the whole wiring in one place."""
    peering = operator_settings.peering if standalone is None else not standalone
    chosen_priority = priority if priority is not None else operator_settings.priority
    if chosen_priority is None:
        chosen_priority = random.randint(1, MAX_PRIORITY)
    port = operator_settings.liveness_port
    return {
        "registry": build_operator(settings, operator_settings, scope),
        "settings": kopf_settings(pod_name=settings.pod_name),
        "clusterwide": scope.clusterwide,
        "namespaces": list(scope.namespaces),
        "standalone": not peering,
        "peering_name": operator_settings.peering_name if peering else None,
        "priority": chosen_priority,
        "liveness_endpoint": f"http://0.0.0.0:{port}/healthz" if port else None,
    }


def run_operator(
    settings: Settings,
    operator_settings: OperatorSettings,
    *,
    namespaces: Collection[str] = (),
    all_namespaces: bool = False,
    standalone: bool | None = None,
    priority: int | None = None,
) -> int:
    scope = resolve_scope(operator_settings, namespaces=namespaces, all_namespaces=all_namespaces)
    if cluster_source() is None:
        raise NoCluster(NO_CLUSTER)
    arguments = operator_arguments(
        settings, operator_settings, scope, standalone=standalone, priority=priority
    )
    log.info(
        "operator starting",
        extra={
            "namespaces": list(scope.namespaces) or "*",
            "peering": arguments["peering_name"],
            "priority": arguments["priority"],
        },
    )
    serve(arguments)
    return 0


def serve(arguments: Mapping[str, Any]) -> None:
    """Run kopf until it stops; an API server it cannot reach ends it with `ClusterUnreachable`."""
    try:
        kopf.run(**arguments)
    except (aiohttp.ClientError, OSError, kopf.LoginError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ClusterUnreachable(f"cannot reach the Kubernetes API server: {detail}") from None
