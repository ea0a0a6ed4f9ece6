"""Resume under live traffic: a client that drops and reconnects again and again, alternating
between two api processes, keeping `lastId = frame.id` for every frame (README's client)."""

from __future__ import annotations

import random

import httpx
import pytest

from services.cli.stack import Child, LocalStack
from tests.e2e.clients import Event, connect, events_until, final_of, next_event, send, unique

pytestmark = pytest.mark.e2e


async def test_a_client_reconnecting_every_few_frames_across_pods_sees_each_event_once(
    two_apis: tuple[LocalStack, Child, Child],
) -> None:
    _, a, b = two_apis
    rng = random.Random(7)
    tenant, session = unique("t"), unique("s")
    control, _ = await connect(a.ws_url, tenant, session)
    ws, ack = await connect(b.ws_url, tenant, session)
    last = ack["id"]
    async with httpx.AsyncClient(timeout=10) as http:
        reply = await send(
            http, a.url, tenant,
            {"message": "storm", "stream": True, "session_id": session,
             "context": {"simulate": {"repeat": 30, "chunk_delay_ms": 3}}},
        )  # fmt: skip
        task_id = reply.json()["task_id"]
    seen: list[Event] = []
    done = final_of(task_id)
    reconnects = 0
    while not (seen and done(seen[-1])):
        for _ in range(rng.randint(1, 6)):
            event = await next_event(ws, timeout=20)
            last = event["id"]
            if event.get("task_id") == task_id:
                seen.append(event)
            if done(event):
                break
        if seen and done(seen[-1]):
            break
        # The network drops (no close handshake: a client's clean close can wait its whole
        # close_timeout behind frames it has not read).
        ws.transport.abort()
        reconnects += 1
        ws, ack = await connect((a, b)[reconnects % 2].ws_url, tenant, session, last_event_id=last)
        assert ack["data"]["resumed"] is True, ack
        last = ack["id"]
    reference = await events_until(control, done)
    ids = [e["id"] for e in seen]
    assert len(ids) == len(set(ids)), "an event twice"
    assert ids == [e["id"] for e in reference], (reconnects, len(ids), len(reference))
    await ws.close()
    await control.close()
