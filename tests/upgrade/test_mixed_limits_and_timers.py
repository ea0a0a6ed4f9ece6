"""Per-tenant socket counts, timers and idempotency across the two versions: one tenant's
sockets on an old and a new api counted together against `maxConnections` (through their
refreshes), a task of one version's api retried and timed out by the other's worker, and an
`Idempotency-Key` replayed through the other api."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
import websockets

from services.cli.stack import Child
from tests.e2e.clients import auth, connect, events_until, final_of, send, token, unique
from tests.e2e.conftest import redis_env
from tests.upgrade.conftest import Mixed

pytestmark = pytest.mark.e2e


def api(mixed: Mixed, version: str) -> Child:
    return mixed.old_api if version == "old" else mixed.new_api


def set_tenant(mixed: Mixed, tenant: str, *limits: str) -> None:
    """`orchestrator tenants set` (this version's CLI; the record format did not change)."""
    args = [sys.executable, "-m", "services.cli.main", "tenants", "set", tenant]
    args += ["--tier", "enterprise", *(f"--limit={limit}" for limit in limits)]
    env = {**redis_env(mixed.redis), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


async def refused(at: Child, tenant: str, session: str) -> str | None:
    """The close reason of a socket refused at its handshake, or None if it was admitted."""
    ws = await websockets.connect(
        f"{at.ws_url}/ws/{tenant}/{session}",
        subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
        open_timeout=10,
    )
    try:
        first = await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as closed:
        frame = closed.rcvd
        return f"{frame.code} {frame.reason}" if frame else "closed without a frame"
    await ws.close()
    assert '"connection.ack"' in str(first), first
    return None


async def test_one_tenants_sockets_on_both_versions_count_against_one_limit(mixed: Mixed) -> None:
    """Two sockets (one per api) of a tenant allowed two: a third is refused on either api,
    and still after several socket ttls (both versions refresh their members); once the old
    api's socket closes, a new one is admitted."""
    tenant = unique("t")
    set_tenant(mixed, tenant, "maxConnections=2")
    old_ws, _ = await connect(mixed.old_api.ws_url, tenant, unique("s"))
    new_ws, _ = await connect(mixed.new_api.ws_url, tenant, unique("s"))
    for at in (mixed.old_api, mixed.new_api):
        reason = await refused(at, tenant, unique("s"))
        assert reason is not None
        assert "connection_limit" in reason, reason
    await asyncio.sleep(7)  # more than two ttls of 3 s: only refreshes keep the members
    for at in (mixed.new_api, mixed.old_api):
        reason = await refused(at, tenant, unique("s"))
        assert reason is not None
        assert "connection_limit" in reason, reason
    await old_ws.close()
    deadline = time.monotonic() + 10
    while (reason := await refused(mixed.new_api, tenant, unique("s"))) is not None:
        assert time.monotonic() < deadline, reason
        await asyncio.sleep(0.1)
    await new_ws.close()


@pytest.mark.parametrize(("sender", "worker"), [("old", "new"), ("new", "old")])
async def test_retries_and_timeouts_of_one_versions_tasks_by_the_others_worker(
    mixed: Mixed, sender: str, worker: str
) -> None:
    """A retryable failure is retried and then answered; a stalled task times out at its
    tier's deadline: both fired by a worker of the other version than the api's."""
    mixed.use(worker=worker, executor=worker)
    at = api(mixed, sender)
    tenant, session = unique("t"), unique("s")
    set_tenant(mixed, tenant, "taskTimeoutSeconds=2")
    ws, _ = await connect(at.ws_url, tenant, session)
    async with httpx.AsyncClient(timeout=10) as http:
        retried = await send(
            http, at.url, tenant,
            {"message": "again", "session_id": session,
             "context": {"simulate": {"fail_attempts": 1, "retryable": True}}},
        )  # fmt: skip
        assert retried.status_code == 202, retried.text
        events = await events_until(ws, final_of(retried.json()["task_id"]))
        assert events[-1]["type"] == "chat.response", events
        stalled = await send(
            http, at.url, tenant,
            {"message": "stall", "session_id": session, "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
        task_id = stalled.json()["task_id"]
        events = await events_until(ws, final_of(task_id))
        assert events[-1]["type"] == "chat.error", events
        state = await http.get(f"{at.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
        assert state.json()["status"] == "timed_out", state.text
        # The same Idempotency-Key through the other api: the first task, nothing enqueued.
        other = api(mixed, "new" if sender == "old" else "old")
        body = {"message": "once", "session_id": session}
        first = await send(http, at.url, tenant, body, **{"Idempotency-Key": "k-1"})
        again = await send(http, other.url, tenant, body, **{"Idempotency-Key": "k-1"})
        assert again.status_code in (200, 202), again.text
        assert again.json()["task_id"] == first.json()["task_id"], (first.text, again.text)
        assert again.headers.get("Idempotent-Replayed") == "true", again.headers
    await ws.close()
