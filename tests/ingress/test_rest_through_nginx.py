"""REST through a real nginx configured as the chart's ingress-nginx annotations ask.

A frontend reaches the api through the ingress only; what it reads there (status, headers,
the error body the README promises, the affinity cookie) is what these tests check.
"""

from __future__ import annotations

import json

import httpx
import pytest

from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import redis_client
from tests.ingress.conftest import Front
from tests.ingress.nginx import COOKIE

pytestmark = pytest.mark.e2e

# The chart's `nginx.ingress.kubernetes.io/proxy-body-size: 1m`.
INGRESS_BODY_BYTES = 1024 * 1024


def error_shape(reply: httpx.Response) -> dict[str, object]:
    """The README's one error shape, `{"error": {"code", "message", "details"}}`, or a failed
    assertion naming what came instead."""
    try:
        body = reply.json()
    except ValueError:
        raise AssertionError(
            f"{reply.status_code} is not the error shape: {reply.headers.get('content-type')} "
            f"{reply.text[:120]!r}"
        ) from None
    assert set(body) == {"error"}, body
    assert {"code", "message", "details"} <= set(body["error"]), body
    error: dict[str, object] = body["error"]
    return error


async def test_send_replay_status_and_refusals_reach_the_client_as_sent(front: Front) -> None:
    """Guard: what a page reads on a send (202, `RateLimit-*`, the replay of an
    `Idempotency-Key`, the task's state, a 401's challenge, a 422's body) passes the proxy
    unchanged, and the proxy pins the client with `ao-affinity` to the api that answered."""
    tenant, session = unique("t"), unique("s")
    async with httpx.AsyncClient(base_url=front.nginx.url, timeout=10) as http:
        body = {"message": "hello", "session_id": session}
        headers = {**auth(tenant), "Idempotency-Key": "k-1"}
        first = await http.post("/api/chat/send", json=body, headers=headers)
        assert first.status_code == 202, first.text
        assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(first.headers)
        assert http.cookies.get(COOKIE) in {"a", "b"}
        again = await http.post("/api/chat/send", json=body, headers=headers)
        assert again.status_code == 202
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.json()["task_id"] == first.json()["task_id"]
        task = await http.get(f"/api/chat/tasks/{first.json()['task_id']}", headers=auth(tenant))
        assert task.status_code == 200
        assert task.json()["task_id"] == first.json()["task_id"]

        unsigned = await http.post("/api/chat/send", json=body)
        assert unsigned.status_code == 401
        assert unsigned.headers["www-authenticate"].startswith("Bearer")
        assert error_shape(unsigned)["code"] == "unauthorized"
        typo = await http.post("/api/chat/send", json={"mesage": "x"}, headers=auth(tenant))
        assert typo.status_code == 422
        assert error_shape(typo)["code"] == "validation_error"


async def test_a_rate_limited_send_keeps_retry_after_and_its_body(front: Front) -> None:
    """Guard: the 429 a page acts on (`Retry-After`, `RateLimit-*`, `details.scope`) comes
    through the proxy as the api sent it."""
    tenant, session = unique("t"), unique("s")
    redis = redis_client(front.redis)
    try:
        await QuotaStore(redis, load_settings()).set(
            tenant, "pro", {"requestsPerMinutePerSession": 1}
        )
    finally:
        await redis.aclose()
    async with httpx.AsyncClient(base_url=front.nginx.url, timeout=10) as http:
        body = {"message": "hello", "session_id": session}
        assert (await http.post("/api/chat/send", json=body, headers=auth(tenant))).status_code
        refused = await http.post("/api/chat/send", json=body, headers=auth(tenant))
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit-remaining"] == "0"
    error = error_shape(refused)
    assert error["code"] == "rate_limited"
    assert error["details"] == {"scope": "session"} or "scope" in error["details"]  # type: ignore[operator]


async def test_the_largest_message_a_tier_allows_fits_the_ingress_body_limit(front: Front) -> None:
    """Guard: an enterprise message of `maxMessageChars` emoji, escaped as Python's
    `json.dumps` writes them (12 bytes each, the README's worst case), is accepted through the
    chart's 1m body limit."""
    tenant = unique("t")
    content = json.dumps({"message": "\U0001f600" * 32000, "session_id": unique("s")}).encode()
    assert len(content) < INGRESS_BODY_BYTES
    async with httpx.AsyncClient(base_url=front.nginx.url, timeout=10) as http:
        reply = await http.post(
            "/api/chat/send",
            content=content,
            headers={**auth(tenant), "Content-Type": "application/json"},
        )
    assert reply.status_code == 202, reply.text[:300]
