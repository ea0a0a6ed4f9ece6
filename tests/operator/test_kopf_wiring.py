"""kopf itself running the handlers against KMock's emulated Kubernetes API and a real Redis.

No cluster exists here; KMock serves discovery, list, watch and patch for the TierQuota and
peering resources from memory, which is enough for kopf's real machinery: the finalizer, the
status patches (also when a handler raises `PermanentError`), peering keep-alives, Events and
the liveness endpoint. Every request kopf makes must be allowed by `rbac.required_rules`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
from redis.asyncio import Redis

from services.cli.embedded import free_port
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from services.operator.handlers import FINALIZER, GROUP, PLURAL, VERSION
from services.operator.main import Scope, operator_arguments
from services.operator.rbac import PEERING_GROUP, allows, required_rules
from services.operator.settings import OperatorSettings

NAMESPACE = "tenants"
PEERING = "agent-orchestrator"
COLLECTION = f"/apis/{GROUP}/{VERSION}/namespaces/{NAMESPACE}/{PLURAL}"
VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {within}s")
        await asyncio.sleep(0.05)


def tier_quota(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TierQuota",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": spec,
    }


def verb_of(request: kmock.Request) -> str:
    if request.method.value == "GET":
        if request.name is not None:
            return "get"
        return "watch" if request.params.get("watch") in ("true", "1") else "list"
    return VERBS[request.method.value]


@pytest.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator):
        resources = emulator.resources
        resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
            kind="TierQuota",
            namespaced=True,
            subresources={"status"},
            verbs={"get", "list", "watch", "patch", "update", "create", "delete"},
        )
        resources[f"{PEERING_GROUP}/v1/kopfpeerings"] = kmock.ResourceInfo(
            kind="KopfPeering", namespaced=True, verbs={"get", "list", "watch", "patch", "create"}
        )
        resources["v1/events"] = kmock.ResourceInfo(kind="Event", namespaced=True, verbs={"create"})
        resources["v1/namespaces"] = kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs={"get", "list", "watch"}
        )
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
            "contexts: [{name: kmock, context: {cluster: kmock, user: kmock}}]\n"
            f'clusters: [{{name: kmock, cluster: {{server: "{str(emulator.url).rstrip("/")}"}}}}]\n'
            "users: [{name: kmock, user: {token: test}}]\n"
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield emulator


async def test_kopf_applies_reports_and_releases_within_its_rbac(
    api: Any, redis: Redis, redis_url: str
) -> None:
    settings = load_settings(redis_url=redis_url, tiers=None, tiers_file=None)
    liveness_port = free_port()
    operator_settings = OperatorSettings(
        refresh_seconds=1.0, liveness_port=liveness_port, peering=True, peering_name=PEERING
    )
    arguments = operator_arguments(settings, operator_settings, Scope((NAMESPACE,)), priority=7)
    store = QuotaStore(redis, settings)

    async with aiohttp.ClientSession(base_url=str(api.url)) as client:

        async def body_of(name: str) -> dict[str, Any] | None:
            async with client.get(f"{COLLECTION}/{name}") as response:
                return await response.json() if response.status == 200 else None

        async def ready(name: str, status: str, reason: str) -> bool:
            body = await body_of(name)
            conditions = ((body or {}).get("status") or {}).get("conditions") or []
            return any(
                (c["type"], c["status"], c["reason"]) == ("Ready", status, reason)
                for c in conditions
            )

        peering = {"metadata": {"name": PEERING, "namespace": NAMESPACE, "resourceVersion": "1"}}
        path = f"/apis/{PEERING_GROUP}/v1/namespaces/{NAMESPACE}/kopfpeerings"
        await client.post(path, json={"apiVersion": f"{PEERING_GROUP}/v1", **peering})
        await client.post(COLLECTION, json=tier_quota("acme", tenantId="acme", tier="enterprise"))

        stop = asyncio.Event()
        operator = asyncio.create_task(kopf.operator(**arguments, stop_flag=stop))
        try:
            await eventually(lambda: ready("acme", "True", "Applied"))
            record = await store.get("acme")
            assert record is not None
            assert record.tier == "enterprise"
            acme = await body_of("acme")
            assert acme is not None
            assert FINALIZER in acme["metadata"]["finalizers"]
            assert acme["status"]["observedGeneration"] == 1

            await client.post(COLLECTION, json=tier_quota("gold", tenantId="gold", tier="gold"))
            await eventually(lambda: ready("gold", "False", "InvalidSpec"))

            async def usage_reported() -> bool:
                body = await body_of("acme")
                return "usage" in ((body or {}).get("status") or {})

            await eventually(usage_reported)

            async with client.get(f"http://127.0.0.1:{liveness_port}/healthz") as probe:
                assert probe.status == 200

            await client.delete(f"{COLLECTION}/acme")

            async def gone() -> bool:
                return await body_of("acme") is None

            await eventually(gone)
            assert await store.get("acme") is None
        finally:
            stop.set()
            await asyncio.wait_for(operator, timeout=30)

    rules = required_rules(clusterwide=False, peering_name=PEERING)
    used = set()
    for request in api:
        if not request.headers.get("User-Agent", "").startswith("kopf/"):
            continue  # the test's own requests
        if request.resource is None or not request.resource.plural:
            continue  # discovery, open to every authenticated client
        resource = request.resource.plural + (
            f"/{request.subresource}" if request.subresource else ""
        )
        verb = verb_of(request)
        used.add((request.resource.group, resource, verb))
        assert allows(
            rules, group=request.resource.group, resource=resource, verb=verb, name=request.name
        ), (verb, request.url)
    assert {
        (GROUP, PLURAL, "list"),
        (GROUP, PLURAL, "watch"),
        (GROUP, PLURAL, "patch"),
        (GROUP, f"{PLURAL}/status", "patch"),
        ("", "events", "create"),
        (PEERING_GROUP, "kopfpeerings", "patch"),
    } <= used
