"""The Kubernetes permissions the operator needs: exactly what its handlers and kopf call.

The chart renders these rules (a Role per watched namespace, or one ClusterRole when every
namespace is watched) and its tests compare what they render with `required_rules`; the
operator's tests check that kopf, running the handlers, makes no request outside them.

What uses what:
- `tierquotas`: list and watch (kopf's watch stream and the index), patch (the finalizer and
  the annotation holding the last handled spec). Never get, create, update or delete.
- `tierquotas/status`: patch (conditions, observedGeneration, usage, effective limits, and
  kopf's progress in `status.kopf`).
- `events` (core): create (kopf posts handler outcomes and the `Ready` changes as Events).
- peering, when enabled: list and watch the peering resources, patch the one named
  `ORCHESTRATOR_OPERATOR_PEERING_NAME` (the keep-alives). `kopfpeerings` (namespaced) when
  specific namespaces are watched, `clusterkopfpeerings` when every namespace is.

kopf's namespace and CRD scanning is disabled (`settings.scanning.disabled`), so neither
`namespaces` nor `customresourcedefinitions` is needed; API discovery is open to every
authenticated client.
"""

from __future__ import annotations

from typing import Any

from services.operator.handlers import GROUP

PEERING_GROUP = "kopf.dev"


def required_rules(*, clusterwide: bool, peering_name: str | None) -> list[dict[str, Any]]:
    """The `rules` of the operator's Role (per namespace) or ClusterRole (every namespace)."""
    rules: list[dict[str, Any]] = [
        {"apiGroups": [GROUP], "resources": ["tierquotas"], "verbs": ["list", "watch", "patch"]},
        {"apiGroups": [GROUP], "resources": ["tierquotas/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    if peering_name is not None:
        peerings = "clusterkopfpeerings" if clusterwide else "kopfpeerings"
        rules += [
            {"apiGroups": [PEERING_GROUP], "resources": [peerings], "verbs": ["list", "watch"]},
            {
                "apiGroups": [PEERING_GROUP],
                "resources": [peerings],
                "resourceNames": [peering_name],
                "verbs": ["patch"],
            },
        ]
    return rules


def allows(
    rules: list[dict[str, Any]],
    *,
    group: str,
    resource: str,
    verb: str,
    name: str | None = None,
) -> bool:
    """Whether `rules` grant `verb` on `group`/`resource` (`plural` or `plural/subresource`)."""
    for rule in rules:
        if group not in rule["apiGroups"] or resource not in rule["resources"]:
            continue
        if verb not in rule["verbs"]:
            continue
        names = rule.get("resourceNames")
        if names is None or (name is not None and name in names):
            return True
    return False
