"""docs/kubernetes.md, "Values": each value below is set to something other than its default and
the rendered objects must change as its row says: the values the other chart tests leave at
their defaults (scheduling and security knobs, the prune and migration
timings, the dashboard's folder and namespace, the ServiceMonitor's labels, the Service type,
`tests.enabled`, autoscaling rates, `tmpSizeLimit`, `config.websocketCompression`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.chart.conftest import PROMETHEUS_OPERATOR_APIS, Rendered, parse, render
from tests.chart.test_render import _crd_for, _k8s_error

JWT = {"auth": {"secret": "s" * 64}}
API, WORKER = "ao-agent-orchestrator-api", "ao-agent-orchestrator-worker"


def _pod(r: Rendered, name: str = API) -> dict[str, Any]:
    return r.get("Deployment", name)["spec"]["template"]["spec"]


def _config(r: Rendered) -> dict[str, str]:
    return r.get("ConfigMap", "ao-agent-orchestrator-config")["data"]


def _hpa(r: Rendered, name: str = API) -> dict[str, Any]:
    return r.get("HorizontalPodAutoscaler", name)["spec"]


def _cron(r: Rendered) -> dict[str, Any]:
    return r.get("CronJob", "ao-agent-orchestrator-prune")["spec"]


def _job(r: Rendered) -> dict[str, Any]:
    (job,) = r.of_kind("Job")
    return job["spec"]


def _dashboard(r: Rendered) -> dict[str, Any]:
    (cm,) = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
    return cm


# value row -> (values, check of the rendered release)
ROWS: dict[str, tuple[dict[str, Any], Callable[[Rendered], bool]]] = {
    "tmpSizeLimit": (
        {"tmpSizeLimit": "128Mi"},
        lambda r: all(
            v["emptyDir"]["sizeLimit"] == "128Mi"
            for _, p in r.pod_specs()
            for v in p["volumes"]
            if v["name"] == "tmp"
        ),
    ),
    "imagePullSecrets": (
        {"imagePullSecrets": [{"name": "regcred"}]},
        lambda r: all(p.get("imagePullSecrets") == [{"name": "regcred"}] for _, p in r.pod_specs()),
    ),
    "config.websocketCompression": (
        {"config": {"websocketCompression": True}},
        lambda r: _config(r)["ORCHESTRATOR_WEBSOCKET_COMPRESSION"] == "true",
    ),
    "config.logLevel (migrations too)": (
        {"config": {"logLevel": "DEBUG"}},
        lambda r: (
            _config(r)["ORCHESTRATOR_LOG_LEVEL"] == "DEBUG"
            and {"name": "ORCHESTRATOR_LOG_LEVEL", "value": "DEBUG"}
            in _job(r)["template"]["spec"]["containers"][0]["env"]
        ),
    ),
    "externalRedis.maxConnections": (
        {"externalRedis": {"maxConnections": 200}},
        lambda r: _config(r)["ORCHESTRATOR_REDIS_MAX_CONNECTIONS"] == "200",
    ),
    "api.priorityClassName": (
        {"api": {"priorityClassName": "chat-critical"}},
        lambda r: _pod(r)["priorityClassName"] == "chat-critical",
    ),
    "api.nodeSelector/tolerations/affinity": (
        {
            "api": {
                "nodeSelector": {"pool": "edge"},
                "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {}},
            }
        },
        lambda r: (
            _pod(r)["nodeSelector"] == {"pool": "edge"}
            and _pod(r)["tolerations"][0]["key"] == "edge"
            and _pod(r)["affinity"] == {"nodeAffinity": {}}
        ),
    ),
    "api.topologySpread.whenUnsatisfiable/maxSkew": (
        {"api": {"topologySpread": {"whenUnsatisfiable": "DoNotSchedule", "maxSkew": 2}}},
        lambda r: all(
            (c["whenUnsatisfiable"], c["maxSkew"]) == ("DoNotSchedule", 2)
            for c in _pod(r)["topologySpreadConstraints"]
        ),
    ),
    "worker.topologySpread.enabled=false": (
        {"worker": {"topologySpread": {"enabled": False}}},
        lambda r: "topologySpreadConstraints" not in _pod(r, WORKER),
    ),
    "api.service.type": (
        {"api": {"service": {"type": "LoadBalancer"}}},
        lambda r: r.get("Service", API)["spec"]["type"] == "LoadBalancer",
    ),
    "api.serviceAccount.name/annotations": (
        {"api": {"serviceAccount": {"name": "chat-api", "annotations": {"iam": "role"}}}},
        lambda r: (
            _pod(r)["serviceAccountName"] == "chat-api"
            and r.get("ServiceAccount", "chat-api")["metadata"]["annotations"] == {"iam": "role"}
        ),
    ),
    "api.serviceAccount.create=false": (
        {"api": {"serviceAccount": {"create": False, "name": "shared"}}},
        lambda r: (
            _pod(r)["serviceAccountName"] == "shared"
            and not [s for s in r.of_kind("ServiceAccount") if s["metadata"]["name"] == "shared"]
        ),
    ),
    "api.autoscaling rates": (
        {
            "api": {
                "autoscaling": {
                    "scaleUpPodsPerMinute": 9,
                    "scaleDownPodsPerMinute": 3,
                    "scaleDownStabilizationSeconds": 120,
                    "targetCPUUtilizationPercentage": 55,
                }
            }
        },
        lambda r: (
            {"type": "Pods", "value": 9, "periodSeconds": 60}
            in _hpa(r)["behavior"]["scaleUp"]["policies"]
            and _hpa(r)["behavior"]["scaleDown"]["policies"][0]["value"] == 3
            and _hpa(r)["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
            and _hpa(r)["metrics"][1]["resource"]["target"]["averageUtilization"] == 55
        ),
    ),
    "worker.autoscaling.externalMetricName/targetLagPerPod": (
        {"worker": {"autoscaling": {"externalMetricName": "lag_x", "targetLagPerPod": 50}}},
        lambda r: (
            _hpa(r, WORKER)["metrics"][0]["external"]["metric"]["name"] == "lag_x"
            and _hpa(r, WORKER)["metrics"][0]["external"]["target"]["averageValue"] == "50"
        ),
    ),
    "worker.terminationGracePeriodSeconds": (
        {"worker": {"terminationGracePeriodSeconds": 90}},
        lambda r: _pod(r, WORKER)["terminationGracePeriodSeconds"] == 90,
    ),
    "api.pdb.enabled=false": (
        {"api": {"pdb": {"enabled": False}}},
        lambda r: [p["metadata"]["name"] for p in r.of_kind("PodDisruptionBudget")] == [WORKER],
    ),
    "prune timings": (
        {
            "prune": {
                "startingDeadlineSeconds": 600,
                "successfulJobsHistoryLimit": 2,
                "failedJobsHistoryLimit": 5,
                "backoffLimit": 4,
                "activeDeadlineSeconds": 900,
            }
        },
        lambda r: (
            (
                _cron(r)["startingDeadlineSeconds"],
                _cron(r)["successfulJobsHistoryLimit"],
                _cron(r)["failedJobsHistoryLimit"],
                _cron(r)["jobTemplate"]["spec"]["backoffLimit"],
                _cron(r)["jobTemplate"]["spec"]["activeDeadlineSeconds"],
            )
            == (600, 2, 5, 4, 900)
        ),
    ),
    "prune.image (falls back to worker.image)": (
        {"prune": {"image": {"tag": "9.9.9"}}},
        lambda r: (
            _cron(r)["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
            == "ghcr.io/agent-orchestrator/agent-orchestrator-worker:9.9.9"
        ),
    ),
    "migrations timings": (
        {
            "migrations": {
                "backoffLimit": 1,
                "activeDeadlineSeconds": 120,
                "ttlSecondsAfterFinished": 60,
            }
        },
        lambda r: (
            (
                _job(r)["backoffLimit"],
                _job(r)["activeDeadlineSeconds"],
                _job(r)["ttlSecondsAfterFinished"],
            )
            == (1, 120, 60)
        ),
    ),
    "migrations.enabled=false": (
        {"migrations": {"enabled": False}},
        lambda r: (
            not r.of_kind("Job")
            and not [
                n
                for n in r.of_kind("NetworkPolicy")
                if n["metadata"]["name"].endswith("-migrations")
            ]
        ),
    ),
    "monitoring.dashboard.folder/namespace/label": (
        {
            "monitoring": {
                "dashboard": {
                    "folder": "Chat",
                    "namespace": "grafana",
                    "label": "dash",
                    "labelValue": "yes",
                }
            }
        },
        lambda r: (
            _dashboard(r)["metadata"]["namespace"] == "grafana"
            and _dashboard(r)["metadata"]["annotations"] == {"grafana_folder": "Chat"}
            and _dashboard(r)["metadata"]["labels"]["dash"] == "yes"
        ),
    ),
    "monitoring.dashboard.enabled=false": (
        {"monitoring": {"dashboard": {"enabled": False}}},
        lambda r: (
            not [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
        ),
    ),
    "monitoring.serviceMonitor.labels/interval": (
        {
            "monitoring": {
                "serviceMonitor": {
                    "labels": {"release": "kps"},
                    "interval": "15s",
                    "scrapeTimeout": "5s",
                }
            }
        },
        lambda r: (
            r.of_kind("ServiceMonitor")[0]["metadata"]["labels"]["release"] == "kps"
            and r.of_kind("ServiceMonitor")[0]["spec"]["endpoints"][0]["interval"] == "15s"
            and r.of_kind("ServiceMonitor")[0]["spec"]["endpoints"][0]["scrapeTimeout"] == "5s"
        ),
    ),
    "monitoring.prometheusRule.labels": (
        {"monitoring": {"prometheusRule": {"labels": {"release": "kps"}}}},
        lambda r: r.of_kind("PrometheusRule")[0]["metadata"]["labels"]["release"] == "kps",
    ),
    "tests.enabled=false": (
        {"tests": {"enabled": False}},
        lambda r: (
            not r.of_kind("Pod")
            and not [
                n for n in r.of_kind("NetworkPolicy") if n["metadata"]["name"].endswith("-test")
            ]
        ),
    ),
    "networkPolicy.enabled=false": (
        {"networkPolicy": {"enabled": False}},
        lambda r: not r.of_kind("NetworkPolicy"),
    ),
    "exposure.mode=none": (
        {"exposure": {"mode": "none"}},
        lambda r: (
            not r.of_kind("Ingress")
            and not r.of_kind("HTTPRoute")
            and "exposure.mode=none" in r.notes
        ),
    ),
    "exposure.gateway.annotations/sessionPersistence.enabled=false": (
        {
            "exposure": {
                "mode": "gateway",
                "gateway": {"annotations": {"a": "b"}, "sessionPersistence": {"enabled": False}},
            }
        },
        lambda r: (
            r.of_kind("HTTPRoute")[0]["metadata"]["annotations"] == {"a": "b"}
            and "sessionPersistence" not in r.of_kind("HTTPRoute")[0]["spec"]["rules"][0]
        ),
    ),
    "otel.resourceAttributes": (
        {"otel": {"enabled": True, "resourceAttributes": {"deployment.environment": "prod"}}},
        lambda r: (
            "deployment.environment=prod"
            in {e["name"]: e.get("value") for e in _pod(r)["containers"][0]["env"]}[
                "OTEL_RESOURCE_ATTRIBUTES"
            ]
        ),
    ),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_documented_value_changes_the_rendered_objects(row: str) -> None:
    """Each row of the values table does what it says to the rendered objects, and the
    objects stay valid Kubernetes (kubernetes-validate, strict) (guard)."""
    values, check = ROWS[row]
    rendered = parse(row, {**JWT, **values}, render({**JWT, **values}, PROMETHEUS_OPERATOR_APIS))
    assert check(rendered), row
    errors = [_k8s_error(o, "1.30.0") for o in rendered.objects if _crd_for(o) is None]
    assert not [e for e in errors if e], errors
