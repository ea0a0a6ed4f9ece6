"""ORCHESTRATOR_WEBSOCKET_FRAMES_PER_SECOND (bursts of twice that): frames over it are dropped,
and a dropped `chat.send` or `chat.cancel` is refused by its `request_id`, so the client knows
which ones to send again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import connect, events_until, unique
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e

RATE = 2  # frames per second: a burst of 4 passes


def answered(event: dict[str, Any]) -> str | None:
    """The request id a `chat.status` (accepted) or `chat.error` (refused) answers."""
    if event["type"] in ("chat.status", "chat.error"):
        request_id = event["data"].get("request_id")
        return request_id if isinstance(request_id, str) else None
    return None


async def test_every_dropped_send_is_refused_by_its_request_id(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A user pasting several messages, or a client flushing its queue on reconnect, went over
    the budget: the sends past the burst vanished, with one `error` saying only that "some"
    frames were dropped (no request id, no count)."""
    with lone_api(redis_server, tmp_path, websocket_frames_per_second=str(RATE)) as api:
        ws, _ = await connect(api.ws_url, unique("t"), unique("s"))
        ids = [f"r{i}" for i in range(10)]
        for request_id in ids:
            data = {"message": f"message {request_id}", "request_id": request_id}
            await ws.send(json.dumps({"type": "chat.send", "data": data}))
        seen: set[str] = set()

        def all_answered(event: dict[str, Any]) -> bool:
            if (request_id := answered(event)) is not None:
                seen.add(request_id)
            return seen == set(ids)

        received = await events_until(ws, all_answered)
        for _ in range(10):  # frames that are no request: one `error` a second says so
            await ws.send(json.dumps({"type": "ping"}))
        pinged = await events_until(ws, lambda e: e["type"] == "error")
        await ws.close()
    accepted = [e["data"]["request_id"] for e in received if e["type"] == "chat.status"]
    refused = [e["data"] for e in received if e["type"] == "chat.error"]
    assert accepted[: 2 * RATE] == ids[: 2 * RATE]  # the burst (more if frames took seconds)
    assert refused, received
    assert sorted(accepted + [r["request_id"] for r in refused]) == sorted(ids)  # each once
    for refusal in refused:
        assert refusal["code"] == "rate_limited", refusal
        assert refusal["details"]["scope"] == "frames", refusal
        assert 0 < refusal["details"]["retry_in_ms"] <= 1000 // RATE, refusal
    assert pinged[-1]["data"]["code"] == "frame_rate_exceeded"
    assert {e["type"] for e in pinged} <= {"pong", "error"}
