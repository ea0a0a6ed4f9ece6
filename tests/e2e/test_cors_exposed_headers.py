"""What a page of an allowed origin can read of an answer: a browser hides every header of a
cross-origin answer but a safelisted few unless `Access-Control-Expose-Headers` names it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from services.api.app import EXPOSED_HEADERS
from services.cli.embedded import RedisServer
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e

ORIGIN = "https://app.example.com"


async def test_a_page_can_read_www_authenticate_of_a_401(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """README: a 401 carries `WWW-Authenticate` (`error="invalid_token"` when a token was
    given), which pages of allowed origins can read: a page tells an expired session (sign in
    again) from a missing token by it. It was not exposed, so `headers.get(...)` was null."""
    with lone_api(redis_server, tmp_path, allowed_origins=ORIGIN) as api:
        async with httpx.AsyncClient(base_url=api.url) as http:
            reply = await http.post(
                "/api/chat/send",
                json={"message": "hi"},
                headers={"Origin": ORIGIN, "Authorization": "Bearer not.a.jwt"},
            )
    assert reply.status_code == 401
    assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert reply.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = {h.strip().lower() for h in reply.headers["Access-Control-Expose-Headers"].split(",")}
    assert exposed == {h.lower() for h in EXPOSED_HEADERS}
    assert "www-authenticate" in exposed
