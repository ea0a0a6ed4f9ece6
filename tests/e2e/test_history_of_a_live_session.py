"""`GET /api/sessions/{id}/messages` of a session whose first task has not ended: nothing is in
the history yet, but the session exists (its task and events are in Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, send, unique
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e


@pytest.fixture
def api_without_executor(redis_server: RedisServer, tmp_path: Path) -> Iterator[Child]:
    """An api with history and no worker or executor: an accepted task stays `processing`."""
    postgres = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(postgres.url()))
        with lone_api(redis_server, tmp_path, database_url=postgres.url()) as api:
            yield api
    finally:
        postgres.cleanup()


async def test_a_session_whose_first_answer_is_running_has_an_empty_history(
    api_without_executor: Child,
) -> None:
    """A chat UI loading the conversation on screen (a page reload, a second tab) while its
    first answer still streams got 404 `not_found`, "conversation not found"."""
    api, tenant, session = api_without_executor, unique("t"), unique("s")
    async with httpx.AsyncClient(base_url=api.url) as http:
        sent = await send(http, api.url, tenant, {"message": "hello", "session_id": session})
        assert sent.status_code == 202, sent.text
        task = await http.get(f"/api/chat/tasks/{sent.json()['task_id']}", headers=auth(tenant))
        page = await http.get(f"/api/sessions/{session}/messages", headers=auth(tenant))
        unknown = await http.get(f"/api/sessions/{unique('s')}/messages", headers=auth(tenant))
        other = await http.get(f"/api/sessions/{session}/messages", headers=auth(unique("t")))
    assert task.json()["status"] == "processing", task.text
    assert page.status_code == 200, page.text
    assert page.json() == {"messages": [], "next_cursor": None, "pending": 0}
    assert unknown.status_code == 404, unknown.text  # a session nobody used: still not found
    assert other.status_code == 404, other.text  # nor another tenant's
