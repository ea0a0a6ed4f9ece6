"""A rollback long after the upgrade: the first new api started more than the SCAN window ago
(`{tasks}:index-since` is old), and pods of the previous release serve again next to the new
ones, as they do while `helm rollback` rolls them one by one. Their tasks are in no session's
index; docs/kubernetes.md "Upgrade" has the operator delete the key before the rollback (the
review of this release found that it said "after rolling forward again" only: an erasure by a
new api during the rollback answered 200 and left the old api's tasks readable)."""

from __future__ import annotations

import httpx
import pytest

from services.core import clock, keys
from services.core.tasks import INDEX_SLACK_SECONDS
from services.core.tiers import MAX_TASK_TIMEOUT_SECONDS
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import redis_client
from tests.upgrade.conftest import Mixed

pytestmark = pytest.mark.e2e

DEFAULT_TASK_TTL_SECONDS = 86_400
WINDOW_SECONDS = DEFAULT_TASK_TTL_SECONDS + MAX_TASK_TIMEOUT_SECONDS + INDEX_SLACK_SECONDS


@pytest.mark.parametrize("worker", ["new", "old"])
async def test_an_erasure_by_a_new_api_during_a_rollback_finds_the_old_apis_tasks(
    mixed: Mixed, worker: str
) -> None:
    """A session an old api wrote into (its task run by either version's worker), erased
    through a new api: its task is gone on both apis and from Redis. Without the key's
    deletion the new api read the session's index only (the window counted from the first
    upgrade), where the old api's tasks are not, and left the message readable for the rest
    of TASK_TTL_SECONDS."""
    mixed.use(worker=worker, executor=worker)
    redis = redis_client(mixed.redis)
    since = await redis.get(keys.TASK_INDEX_SINCE)
    # The first new api started a window and an hour ago (Redis's clock, as the api's)...
    await redis.set(keys.TASK_INDEX_SINCE, int((clock.now() - WINDOW_SECONDS - 3600) * 1000))
    # ...and the operator rolls back as docs/kubernetes.md says: the key deleted first.
    await redis.delete(keys.TASK_INDEX_SINCE)
    tenant, session = unique("t"), unique("s")
    try:
        ws, _ = await connect(mixed.old_api.ws_url, tenant, session)
        async with httpx.AsyncClient(timeout=30) as http:
            sent = await send(http, mixed.old_api.url, tenant,
                              {"message": "my secret", "session_id": session})  # fmt: skip
            task_id = sent.json()["task_id"]
            await events_until(ws, final_of(task_id))
            await ws.close()
            erased = await http.delete(
                f"{mixed.new_api.url}/api/sessions/{session}", headers=auth(tenant)
            )
            assert erased.status_code == 200, erased.text
            state_key = keys.task_state(tenant, session, task_id)
            left = await redis.hget(state_key, "action")
            served = [
                (await http.get(f"{at.url}/api/chat/tasks/{task_id}", headers=auth(tenant)))
                for at in (mixed.new_api, mixed.old_api)
            ]
    finally:
        if since is not None:
            await redis.set(keys.TASK_INDEX_SINCE, since)
        await redis.aclose()
    assert [reply.status_code for reply in served] == [404, 404], [r.text for r in served]
    assert left is None, f"the erased session's message is still in {state_key}: {left!r}"
