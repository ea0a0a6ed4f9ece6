"""`DELETE /api/sessions/{id}` while both versions run: a session whose tasks one version
created, erased through the other (a task still running among them), then a second DELETE."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from services.cli.stack import Child
from services.core import keys
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import redis_client
from tests.upgrade.conftest import Mixed

pytestmark = pytest.mark.e2e


def api(mixed: Mixed, version: str) -> Child:
    return mixed.old_api if version == "old" else mixed.new_api


async def completed(http: httpx.AsyncClient, at: Child, tenant: str, task_id: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        reply = await http.get(f"{at.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
        if reply.status_code == 200 and reply.json()["status"] == "completed":
            return
        assert time.monotonic() < deadline, reply.text
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("creator", "eraser", "worker"),
    # Each version's erasure of the other's session, each with the other's worker (the four
    # combinations passed; two keep the suite's time).
    [("old", "new", "old"), ("new", "old", "new")],
)
async def test_a_session_one_version_filled_is_erased_by_the_other(
    mixed: Mixed, creator: str, eraser: str, worker: str
) -> None:
    """Every task is found: the finished ones are gone, the running one is ended as cancelled
    (its sockets told, its AES told) and keeps no message; no key of the session holds the
    message any more; a second DELETE, through either api, is 404."""
    mixed.use(worker=worker, executor=worker)
    made, erasing = api(mixed, creator), api(mixed, eraser)
    redis: Any = redis_client(mixed.redis)  # (replies are bytes: decode_responses off)
    tenant, session = unique("t"), unique("s")
    secret = f"secret-{unique('m')}"
    ws, _ = await connect(made.ws_url, tenant, session)
    async with httpx.AsyncClient(timeout=30) as http:
        done = []
        for n in range(2):
            reply = await send(http, made.url, tenant, {"message": f"{secret} {n}",
                                                         "session_id": session})  # fmt: skip
            assert reply.status_code == 202, reply.text
            done.append(reply.json()["task_id"])
            await events_until(ws, final_of(done[-1]))
        stalled = await send(
            http, made.url, tenant,
            {"message": f"{secret} stalled", "session_id": session, "stream": True,
             "context": {"simulate": {"stall": True}}},
        )  # fmt: skip
        running = stalled.json()["task_id"]
        erased = await http.delete(f"{erasing.url}/api/sessions/{session}", headers=auth(tenant))
        assert erased.status_code == 200, erased.text
        told = await events_until(ws, final_of(running))
        assert told[-1]["type"] == "chat.cancelled", told
        await ws.close()
        for task_id in done:
            for at in (made, erasing):
                gone = await http.get(f"{at.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
                assert gone.status_code == 404, (at.url, gone.text)
        stub = await http.get(f"{made.url}/api/chat/tasks/{running}", headers=auth(tenant))
        assert stub.status_code == 404, stub.text  # erased with its session
        left = []
        async for key in redis.scan_iter(match=f"*{keys.session_tag(tenant, session)}*"):
            kind = (await redis.type(key)).decode()
            if kind == "hash":
                values = [v.decode() for v in (await redis.hgetall(key)).values()]
            elif kind == "string":
                values = [(await redis.get(key) or b"").decode()]
            elif kind == "stream":
                values = [str(fields) for _, fields in await redis.xrange(key)]
            else:
                values = [m.decode() for m in await redis.zrange(key, 0, -1)]
            left += [(key, v) for v in values if secret in v]
        assert left == [], left
        for at in (erasing, made):
            again = await http.delete(f"{at.url}/api/sessions/{session}", headers=auth(tenant))
            assert again.status_code == 404, (at.url, again.text)
    await redis.aclose()
