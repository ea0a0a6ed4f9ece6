"""HS secret rotation as README "Client API" ("Rotating the key") and the chart's values
(auth.secret, auth.previousSecret) tell it, through a `helm upgrade`'s rolling update: the
api pods of the release before and after the upgrade, each given the environment the
rendered chart gives it (ConfigMap and Secrets resolved as the kubelet does), serve side by
side as `maxSurge: 1, maxUnavailable: 0` has them, while clients call either one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from tests.chart.conftest import parse, render
from tests.chart.test_key_rotation_releases import api_env
from tests.e2e.conftest import e2e_redis

__all__ = ["e2e_redis"]  # the fixture, found by name

OLD = "old-secret-0123456789abcdef-0123456789abcdef"
NEW = "new-secret-0123456789abcdef-0123456789abcdef"


def token(secret: str) -> str:
    claims = {"sub": "u1", "tenant_id": "t1", "exp": int(time.time()) + 600}
    return jwt.encode(claims, secret, algorithm="HS256")


def release_api(stack: LocalStack, values: dict[str, Any], folder: Path) -> Child:
    """An api process with the environment the release of `values` gives its pods (set on
    `stack` for this start only: the two releases' pods share one Valkey, as in a rollout)."""
    folder.mkdir()
    env = api_env(parse("rotation", values, render(values, upgrade=True)), folder)
    common = dict(stack.env)
    stack.env.update(env)
    try:
        return stack.start_api()
    finally:
        stack.env = common


@pytest.fixture
def rollouts(e2e_redis: RedisServer, tmp_path: Path) -> Iterator[tuple[Child, Child, Child]]:
    """A pod of the release before the rotation, of its first rollout (the new secret only
    accepted) and of its second (the new secret signs, the old one only accepted)."""
    stack = LocalStack.for_redis(e2e_redis.url, log_dir=tmp_path / "logs")
    stack.env["ORCHESTRATOR_DEFAULT_TIER"] = "enterprise"
    try:
        before = release_api(stack, {"auth": {"secret": OLD}}, tmp_path / "before")
        first = release_api(
            stack, {"auth": {"secret": OLD, "previousSecret": NEW}}, tmp_path / "first"
        )
        second = release_api(
            stack, {"auth": {"secret": NEW, "previousSecret": OLD}}, tmp_path / "second"
        )
        stack.wait_ready(before, first, second)
        yield before, first, second
    finally:
        stack.stop()


def test_a_rotation_as_documented_fails_no_request_during_either_rollout(
    rollouts: tuple[Child, Child, Child],
) -> None:
    """README "Rotating the key", for HS secrets, in two rollouts. It said to make the new
    secret ORCHESTRATOR_JWT_SECRET at once: what signs with it (`orchestrator token`, the
    chart's `helm test` pod, an issuer sharing the chart's Secret) handed out tokens every pod
    of the release before refused (401) until the rollout ended. Now: in the first rollout
    only old tokens exist and every pod takes them; in the second, pods of the first and the
    second rollouts serve side by side and take old and new tokens alike."""
    before, first, second = rollouts
    expected = [(before, OLD), (first, OLD), (second, OLD), (first, NEW), (second, NEW)]
    failed = []
    for pod, secret in expected:
        reply = httpx.get(
            f"{pod.url}/ws/stats", headers={"Authorization": f"Bearer {token(secret)}"}
        )
        if reply.status_code != 200:
            which = "old" if secret == OLD else "new"
            failed.append(f"{which} token on port {pod.port}: {reply.status_code}")
    assert failed == [], failed
