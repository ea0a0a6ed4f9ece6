"""A message cut through an emoji: a page that trims text at n UTF-16 units (`text.slice(0,
n)`) and `JSON.stringify`s it writes a lone surrogate escape (`"\\ud83d"`), which RFC 8259's
grammar allows. It was refused as malformed JSON (blaming the client's encoder), and over the
socket without the frame's `request_id`. Each lone surrogate is now read as U+FFFD, as a UTF-8
decoder reads a bad byte and as a token's `name` already was."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.clients import auth, connect, events_until, unique
from tests.e2e.conftest import Deployment

pytestmark = pytest.mark.e2e

CUT = "see you \\ud83d"  # as JSON text: the high half of an emoji, then the string ends
READ_AS = "see you \ufffd"


async def test_a_rest_send_cut_mid_emoji_is_accepted_with_u_fffd(deployment: Deployment) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    try:
        async with httpx.AsyncClient(base_url=deployment.api.url) as http:
            reply = await http.post(
                "/api/chat/send",
                content=f'{{"message": "{CUT}", "session_id": "{session}"}}'.encode(),
                headers={**auth(tenant), "Content-Type": "application/json"},
            )
        assert reply.status_code == 202, reply.text
        task_id = reply.json()["task_id"]
        events = await events_until(
            ws, lambda e: e["type"] == "chat.response" and e.get("task_id") == task_id
        )
    finally:
        await ws.close()
    assert READ_AS in events[-1]["data"]["content"], events[-1]  # the echo agent's answer


async def test_a_socket_send_cut_mid_emoji_is_accepted_by_its_request_id(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    try:
        await ws.send(
            f'{{"type": "chat.send", "data": {{"message": "{CUT}", "request_id": "cut"}}}}'
        )
        events = await events_until(
            ws, lambda e: e["type"] in ("chat.response", "chat.error", "error")
        )
    finally:
        await ws.close()
    statuses = [e for e in events if e["type"] == "chat.status"]
    assert statuses, events
    assert statuses[0]["data"]["request_id"] == "cut"
    assert events[-1]["type"] == "chat.response", events[-1]
    assert READ_AS in events[-1]["data"]["content"]


async def test_a_body_that_is_not_json_is_still_malformed(deployment: Deployment) -> None:
    """Only the lone surrogate is forgiven: NaN (which the stdlib json would read) and a
    truncated body stay 400 `malformed_json`."""
    async with httpx.AsyncClient(base_url=deployment.api.url) as http:
        for body in (f'{{"message": "{CUT}", "n": NaN}}', f'{{"message": "{CUT}'):
            reply = await http.post(
                "/api/chat/send",
                content=body.encode(),
                headers={**auth(unique("t")), "Content-Type": "application/json"},
            )
            assert reply.status_code == 400, (body, reply.text)
            assert reply.json()["error"]["code"] == "malformed_json", reply.text
