"""The 200 bodies of history, usage and erasure, as a real api (with PostgreSQL) answers them,
against the schema the OpenAPI document declares for them: a frontend generating its client
from /schema gets every field the api sends, typed, and no `any`. And the history's `limit`
declares the bounds the api enforces (a client generated from it does not send a page size
the api refuses).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child
from services.core.settings import Settings
from services.persistence.history import DEFAULT_PAGE
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy
from tests.e2e.test_openapi_document import fetch_document, schema_validator

pytestmark = pytest.mark.e2e

MESSAGES = "/api/sessions/{session_id}/messages"
SESSION = "/api/sessions/{session_id}"
USAGE = "/api/usage"
PAGE_MAX = int(Settings.model_fields["history_page_max"].default)  # the test api's page max


@pytest.fixture(scope="module")
def api(e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    """api, worker (with its persistence writer) and executor on a PostgreSQL of their own."""
    postgres = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(postgres.url()))
        logs = tmp_path_factory.mktemp("logs")
        with deploy(e2e_redis, logs, database_url=postgres.url(), **FAST_EXECUTOR) as deployed:
            yield deployed.api
    finally:
        postgres.cleanup()


@pytest.fixture(scope="module")
def doc(api: Child) -> dict[str, Any]:
    return fetch_document(api.url)


@pytest.fixture(scope="module")
def conversation(api: Child) -> tuple[str, str]:
    """(tenant, session) of one completed task, awaited on the session's socket."""
    tenant, session = unique("ob"), unique("s")

    async def run() -> None:
        ws, _ = await connect(api.ws_url, tenant, session)
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                sent = await send(http, api.url, tenant, {"message": "hi", "session_id": session})
            assert sent.status_code == 202, sent.text
            await events_until(ws, final_of(sent.json()["task_id"]))
        finally:
            await ws.close()

    asyncio.run(run())
    return tenant, session


def eventually(api: Child, tenant: str, path: str, ready: str) -> httpx.Response:
    """GET `path` until its body's `ready` list is not empty: the writer persists after the
    fact and no event says when (the history waits for it itself; usage does not)."""
    deadline = time.monotonic() + 20
    while True:
        reply = httpx.get(f"{api.url}{path}", headers=auth(tenant), timeout=10)
        assert reply.status_code == 200, reply.text
        if reply.json()[ready] or time.monotonic() > deadline:
            return reply
        time.sleep(0.05)


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = doc["components"]["schemas"][name]
    return schema


def object_arm(doc: dict[str, Any], schema: dict[str, Any], value: Any) -> dict[str, Any]:
    """The arm of a nullable `oneOf` that describes `value`'s JSON type."""
    schema = resolve(doc, schema)
    wanted = "object" if isinstance(value, dict) else "array"
    for arm in schema.get("oneOf") or schema.get("anyOf") or []:
        arm = resolve(doc, arm)
        if arm.get("type") == wanted:
            return arm
    return schema


def untyped(doc: dict[str, Any], schema: dict[str, Any], body: Any, where: str) -> list[str]:
    """Fields of `body` its schema leaves out, optional, or as an untyped map: every field
    the api sends is always there, and a generated client should know its type."""
    schema = object_arm(doc, schema, body)
    problems: list[str] = []
    if isinstance(body, list):
        for item in body:
            problems += untyped(doc, schema.get("items", {}), item, f"{where}[]")
        return problems
    if not isinstance(body, dict):
        return problems
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    for key, value in body.items():
        if key not in properties:
            problems.append(f"{where}.{key} is not declared ({schema})")
        elif key not in required:
            problems.append(f"{where}.{key} is declared optional, the api always sends it")
        elif isinstance(value, dict | list):
            problems += untyped(doc, properties[key], value, f"{where}.{key}")
    return problems


def check_200(doc: dict[str, Any], method: str, path: str, reply: httpx.Response) -> None:
    assert reply.status_code == 200, reply.text
    schema = doc["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    body = reply.json()
    errors = [error.message for error in schema_validator(doc, schema).iter_errors(body)]
    assert errors == [], (body, errors)
    assert untyped(doc, schema, body, "body") == [], body


def test_a_history_page_is_declared_field_by_field(
    api: Child, doc: dict[str, Any], conversation: tuple[str, str]
) -> None:
    """A page of a completed task (a user message without usage, an answer with it)."""
    tenant, session = conversation
    reply = eventually(api, tenant, f"/api/sessions/{session}/messages", "messages")
    assert {m["role"] for m in reply.json()["messages"]} == {"user", "assistant"}, reply.text
    check_200(doc, "get", MESSAGES, reply)
    paged = httpx.get(
        f"{api.url}/api/sessions/{session}/messages?limit=1", headers=auth(tenant), timeout=10
    )
    assert paged.json()["next_cursor"], paged.text  # a page with a cursor conforms too
    check_200(doc, "get", MESSAGES, paged)


def test_the_usage_is_declared_field_by_field(
    api: Child, doc: dict[str, Any], conversation: tuple[str, str]
) -> None:
    tenant, _ = conversation
    check_200(doc, "get", USAGE, eventually(api, tenant, USAGE, "days"))


def test_an_erasure_is_declared_field_by_field(
    api: Child, doc: dict[str, Any], conversation: tuple[str, str]
) -> None:
    tenant, session = conversation
    eventually(api, tenant, f"/api/sessions/{session}/messages", "messages")
    reply = httpx.delete(f"{api.url}/api/sessions/{session}", headers=auth(tenant), timeout=10)
    assert reply.json()["deleted_messages"] == 2, reply.text
    check_200(doc, "delete", SESSION, reply)


def test_the_history_limit_declares_the_bounds_the_api_enforces(
    api: Child, doc: dict[str, Any]
) -> None:
    """`limit` is an integer from 1 to the page max (ORCHESTRATOR_HISTORY_PAGE_MAX), 50 when
    absent: the api answers 422 beyond either bound."""
    parameters = doc["paths"][MESSAGES]["get"]["parameters"]
    (limit,) = [p for p in parameters if p["name"] == "limit" and p["in"] == "query"]
    schema = limit["schema"]
    assert schema.get("type") == "integer", schema  # not `oneOf` integer/null: a query has no null
    assert (schema.get("minimum"), schema.get("maximum")) == (1, PAGE_MAX), schema
    assert schema.get("default") == DEFAULT_PAGE, schema
    tenant = unique("ob")
    for value, status in [(0, 422), (PAGE_MAX + 1, 422), (PAGE_MAX, 404)]:
        reply = httpx.get(
            f"{api.url}/api/sessions/none/messages?limit={value}", headers=auth(tenant), timeout=10
        )
        assert reply.status_code == status, (value, reply.text)
