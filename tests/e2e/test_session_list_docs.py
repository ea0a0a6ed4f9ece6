"""A chat client's sidebar and history written from the published documents alone (README
"Persistence", the OpenAPI document a running api serves), against real processes: uvicorn
api, worker with its persistence writer, executor, Valkey and PostgreSQL. Each test states
the sentence it holds the api to; a failure is a mismatch between that sentence and what the
api answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy
from tests.e2e.test_openapi_document import fetch_document

pytestmark = pytest.mark.e2e

LIST = "/api/sessions"


@pytest.fixture(scope="module")
def stack(e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    postgres = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(postgres.url()))
        with deploy(
            e2e_redis,
            tmp_path_factory.mktemp("logs"),
            database_url=postgres.url(),
            **FAST_EXECUTOR,
        ) as deployed:
            yield deployed
    finally:
        postgres.cleanup()


def chat(api: str, tenant: str, user: str, session: str, message: str) -> None:
    """One message sent by REST, then waited for until `user`'s list counts it: the writer
    persists after the fact and no event says when (README: "usually within a second")."""
    reply = httpx.post(
        f"{api}/api/chat/send",
        json={"message": message, "session_id": session},
        headers=auth(tenant, user=user),
        timeout=10,
    )
    assert reply.status_code == 202, reply.text
    task = reply.json()["task_id"]
    deadline = time.monotonic() + 20
    while True:
        page = httpx.get(
            f"{api}/api/sessions/{session}/messages",
            params={"limit": 200},
            headers=auth(tenant, user=user),
            timeout=10,
        )
        if page.status_code == 200 and any(m["task_id"] == task for m in page.json()["messages"]):
            return
        assert time.monotonic() < deadline, f"{task} never reached the history: {page.text}"
        time.sleep(0.05)


def titles(api: str, tenant: str, user: str) -> dict[str, str]:
    reply = httpx.get(f"{api}{LIST}", headers=auth(tenant, user=user), timeout=10)
    assert reply.status_code == 200, reply.text
    return {s["session_id"]: s["title"] for s in reply.json()["sessions"]}


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (LIST, {"cursor": "not-a-cursor"}),
        ("/api/sessions/{session}/messages", {"after_event_id": "yesterday"}),
    ],
    ids=["sessions", "messages"],
)
def test_the_documented_400_example_has_the_code_the_api_answers(
    stack: Deployment, path: str, query: dict[str, str]
) -> None:
    """The OpenAPI document's 400 example of every history read (a GET: no body to be
    malformed) carries `"code": "malformed_json"`, while its own description says
    `bad_request` and the api answers `bad_request`: a client generated from the document
    (or a developer copying the example) switches on a code that never comes."""
    doc = fetch_document(stack.api.url)
    example = doc["paths"][path.replace("{session}", "{session_id}")]["get"]["responses"]["400"]
    codes = {
        e["value"]["error"]["code"]
        for e in example["content"]["application/json"]["examples"].values()
    }
    reply = httpx.get(
        stack.api.url + path.format(session=unique("s")),
        params=query,
        headers=auth(unique("hd")),
        timeout=10,
    )
    assert reply.status_code == 400, reply.text
    answered = reply.json()["error"]["code"]
    assert codes == {answered}, f"document's 400 example: {codes}; the api answers {answered}"
