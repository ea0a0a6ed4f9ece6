"""README "Configuration": `MAX_FRAME_BYTES` and `MAX_BODY_BYTES` "must hold a message of
`MAX_MESSAGE_CHARS` characters" (else the process stops at start), and "No message is accepted
beyond ORCHESTRATOR_MAX_MESSAGE_CHARS": a message within it is accepted, whatever its script.

JSON text may escape any character (RFC 8259 §7); Python's `json.dumps` and `requests` do so
by default (`ensure_ascii=True`): a character outside the BMP becomes a surrogate pair
`\\ud83d\\ude00`, 12 bytes, not the 4 the start-up check reserves."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.clients import auth, unique
from tests.e2e.conftest import Deployment

pytestmark = pytest.mark.e2e

MAX_MESSAGE_CHARS = 32_000  # the default; the e2e tenants get the enterprise tier (32 000)


def test_rest_message_at_the_limit_escaped_json_is_accepted(deployment: Deployment) -> None:
    message = "\U0001f600" * MAX_MESSAGE_CHARS  # 32 000 characters: exactly the limit
    body = json.dumps({"message": message, "session_id": unique("esc")})  # ensure_ascii
    assert len(json.loads(body)["message"]) == MAX_MESSAGE_CHARS
    reply = httpx.post(
        f"{deployment.api.url}/api/chat/send",
        content=body.encode(),
        headers={**auth(unique("tn")), "Content-Type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == 202, (
        f"a message of MAX_MESSAGE_CHARS characters, as valid JSON, refused "
        f"{reply.status_code} ({len(body)} bytes): {reply.text[:300]}"
    )


async def test_socket_message_at_the_limit_escaped_json_is_accepted(
    deployment: Deployment,
) -> None:
    """The same on the socket: `MAX_FRAME_BYTES` "must hold a message of MAX_MESSAGE_CHARS
    characters"; observed: an `error` event (frame too large) instead of the task's status."""
    from tests.e2e.clients import connect, next_event

    tenant, session = unique("tn"), unique("esc")
    ws, _ack = await connect(deployment.api.ws_url, tenant, session)
    try:
        message = "\U0001f600" * MAX_MESSAGE_CHARS
        frame = json.dumps({"type": "chat.send", "data": {"message": message, "request_id": "r1"}})
        await ws.send(frame)
        event = await next_event(ws)
        assert event["type"] == "chat.status", (
            f"a chat.send of MAX_MESSAGE_CHARS characters ({len(frame)} bytes of JSON) "
            f"answered {event}"
        )
    finally:
        await ws.close()
