"""A message within MAX_MESSAGE_CHARS fits a socket frame as it fits a REST body. The defaults
contradicted each other: MAX_MESSAGE_CHARS 32 000 (the enterprise tier's maxMessageChars) vs
MAX_FRAME_BYTES 65 536, so a message within the limit in a non-Latin script was refused on the
socket (`frame_too_large`) while REST accepted it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.core.settings import ConfigError, load_settings
from tests.e2e.clients import auth, connect, next_event, unique
from tests.integration.start_checks import base_env, run_role, stop

MESSAGE = "漢" * 25_000  # 25 000 characters (limit 32 000), 75 000 bytes in UTF-8


def test_a_message_within_max_message_chars_is_accepted_on_the_socket_as_by_rest(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = base_env(redis_server.url, default_tier="enterprise")  # every default otherwise
    outcome, process = run_role("api", env, tmp_path / "api.log", keep=True)
    try:
        assert outcome.state == "ready", outcome.describe()

        async def scenario() -> tuple[int, dict[str, object]]:
            session = unique("s")
            async with httpx.AsyncClient(timeout=10) as client:
                rest = await client.post(
                    f"http://127.0.0.1:{outcome.port}/api/chat/send",
                    json={"message": MESSAGE, "session_id": unique("s")},
                    headers=auth("acme"),
                )
            ws, _ = await connect(f"ws://127.0.0.1:{outcome.port}", "acme", session)
            try:
                await ws.send(
                    json.dumps(
                        {"type": "chat.send", "data": {"message": MESSAGE, "request_id": "r1"}},
                        ensure_ascii=False,
                    )
                )
                first = await next_event(ws, timeout=10)
            finally:
                await ws.close()
            return rest.status_code, first

        rest_status, first = asyncio.run(scenario())
        assert rest_status == 202, rest_status
        assert first["type"] != "error", (
            f"REST accepted the {len(MESSAGE)}-character message (202); the socket answered {first}"
        )
    finally:
        stop(process)


def test_sizes_that_cannot_hold_a_message_are_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="MAX_FRAME_BYTES"):
        load_settings(max_frame_bytes=64 * 1024)  # an old default: 64 KiB < 32 000 x 12 bytes
    with pytest.raises(ConfigError, match="MAX_BODY_BYTES"):
        load_settings(max_message_chars=100_000, max_frame_bytes=1_300_000)
