"""ORCHESTRATOR_ALLOWED_ORIGINS decides for sockets as for CORS (README "WebSocket"), wildcards
included."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from services.cli.embedded import RedisServer
from tests.e2e.clients import token, unique
from tests.integration.start_checks import base_env, run_role, stop

PATTERN = "https://*.example.com"


async def decide(base: str, page: str) -> tuple[bool, bool]:
    """Whether the CORS preflight and the socket handshake of `page` are allowed."""
    async with httpx.AsyncClient(timeout=10) as client:
        preflight = await client.options(
            f"http://{base}/api/chat/send",
            headers={
                "Origin": page,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
    rest = preflight.status_code < 300 and preflight.headers.get("access-control-allow-origin") in (
        page,
        "*",
    )
    try:
        ws = await websockets.connect(
            f"ws://{base}/ws/acme/{unique('s')}",
            subprotocols=["orchestrator.v1", f"bearer.{token('acme')}"],  # type: ignore[list-item]
            origin=page,  # type: ignore[arg-type]
            open_timeout=10,
        )
    except InvalidStatus as refused:
        if refused.response.status_code != 403:
            raise
        return rest, False
    await ws.close()
    return rest, True


@pytest.mark.parametrize(
    ("page", "allowed"),
    [("https://app.example.com", True), ("https://app.example.org", False)],
)
def test_a_wildcard_origin_is_decided_alike_for_rest_and_sockets(
    redis_server: RedisServer, tmp_path: Path, page: str, allowed: bool
) -> None:
    """Litestar's CORS layer reads `*` inside an origin as a wildcard (the page's preflight was
    allowed); the socket check compared exact strings (the same page's socket got 403)."""
    env = base_env(redis_server.url, allowed_origins=PATTERN, default_tier="enterprise")
    outcome, process = run_role("api", env, tmp_path / "api.log", keep=True)
    try:
        assert outcome.state == "ready", outcome.describe()
        assert asyncio.run(decide(f"127.0.0.1:{outcome.port}", page)) == (allowed, allowed)
    finally:
        stop(process)
