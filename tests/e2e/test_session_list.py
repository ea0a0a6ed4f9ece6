"""`GET /api/sessions` on real processes (uvicorn api, worker with its persistence writer,
executor, Redis, PostgreSQL): a chat client's sidebar, read from the history instead of the
browser's storage. Each answer is checked against the OpenAPI document the api serves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy, lone_api
from tests.e2e.test_openapi_bodies import untyped
from tests.e2e.test_openapi_document import fetch_document, violations

pytestmark = pytest.mark.e2e

LIST = "/api/sessions"
MESSAGES = "/api/sessions/{session_id}/messages"
PAGE_MAX = 10  # the test api's ORCHESTRATOR_HISTORY_PAGE_MAX
EMOJI = "\U0001f600"


@pytest.fixture(scope="module")
def stack(e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    postgres = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(postgres.url()))
        with deploy(
            e2e_redis,
            tmp_path_factory.mktemp("logs"),
            database_url=postgres.url(),
            history_page_max=str(PAGE_MAX),
            **FAST_EXECUTOR,
        ) as deployed:
            yield deployed
    finally:
        postgres.cleanup()


@pytest.fixture(scope="module")
def doc(stack: Deployment) -> dict[str, Any]:
    return fetch_document(stack.api.url)


def listed(
    stack: Deployment, doc: dict[str, Any], tenant: str, user: str, **params: Any
) -> httpx.Response:
    """GET /api/sessions as `user` of `tenant`; any answer must be one the document declares."""
    reply = httpx.get(
        f"{stack.api.url}{LIST}", params=params, headers=auth(tenant, user=user), timeout=10
    )
    assert violations(doc, "GET", LIST, reply) == []
    if reply.status_code == 200:
        schema = doc["paths"][LIST]["get"]["responses"]["200"]["content"]["application/json"]
        assert untyped(doc, schema["schema"], reply.json(), "body") == [], reply.text
    return reply


def chat(stack: Deployment, tenant: str, user: str, session: str, message: str) -> None:
    """One message of `user`, sent by REST and waited for until its session lists it with
    this message counted: the writer persists after the fact, and no event says when."""
    before = sessions_of(stack, tenant, user).get(session, {}).get("messages", 0)
    reply = httpx.post(
        f"{stack.api.url}/api/chat/send",
        json={"message": message, "session_id": session},
        headers=auth(tenant, user=user),
        timeout=10,
    )
    assert reply.status_code == 202, reply.text
    deadline = time.monotonic() + 20
    while sessions_of(stack, tenant, user).get(session, {}).get("messages", 0) <= before:
        assert time.monotonic() < deadline, f"{session} of {user} never listed"
        time.sleep(0.05)


def sessions_of(stack: Deployment, tenant: str, user: str) -> dict[str, dict[str, Any]]:
    reply = httpx.get(
        f"{stack.api.url}{LIST}",
        params={"limit": PAGE_MAX},
        headers=auth(tenant, user=user),
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return {item["session_id"]: item for item in reply.json()["sessions"]}


def test_each_user_lists_their_own_sessions_newest_first_with_titles(
    stack: Deployment, doc: dict[str, Any]
) -> None:
    """Two users of one tenant and the same user name in another tenant: each lists only
    the sessions they wrote in (the token's `sub` is the user), newest first, titled by their
    first message cut to 100 characters without splitting an emoji; pages follow the cursor;
    an erased session is gone."""
    tenant, other_tenant = unique("sl"), unique("sl")
    older, newer, bobs, elsewhere = (unique("s") for _ in range(4))
    long_first = "a" * 99 + EMOJI + " and the rest of a long first question"
    chat(stack, tenant, "alice", older, "first in older")
    chat(stack, tenant, "alice", newer, long_first)
    chat(stack, tenant, "alice", older, "second in older")  # older is now the newest
    chat(stack, tenant, "bob", bobs, "bob's own")
    chat(stack, tenant, "bob", older, "bob writes in alice's session too")
    chat(stack, other_tenant, "alice", elsewhere, "another tenant")

    page = listed(stack, doc, tenant, "alice").json()
    assert [s["session_id"] for s in page["sessions"]] == [older, newer]
    assert page["next_cursor"] is None
    first, second = page["sessions"]
    assert (first["title"], first["messages"]) == ("first in older", 2)
    assert (second["title"], second["messages"]) == ("a" * 99 + EMOJI, 1)
    times = [
        [datetime.fromisoformat(s[f"{k}_message_at"]) for k in ("first", "last")]
        for s in (first, second)
    ]
    assert times[0][0] < times[0][1]
    assert times[1][0] == times[1][1] < times[0][1]

    bob = listed(stack, doc, tenant, "bob").json()["sessions"]
    assert [(s["session_id"], s["title"]) for s in bob] == [
        (older, "bob writes in alice's session too"),
        (bobs, "bob's own"),
    ]
    assert [s["session_id"] for s in sessions_of(stack, other_tenant, "alice").values()] == [
        elsewhere
    ]
    assert sessions_of(stack, tenant, "carol") == {}

    one = listed(stack, doc, tenant, "alice", limit=1).json()
    assert [s["session_id"] for s in one["sessions"]] == [older]
    rest = listed(stack, doc, tenant, "alice", limit=1, cursor=one["next_cursor"]).json()
    assert [s["session_id"] for s in rest["sessions"]] == [newer]
    assert rest["next_cursor"] is None

    erased = httpx.delete(f"{stack.api.url}/api/sessions/{older}", headers=auth(tenant))
    assert erased.status_code == 200, erased.text
    assert list(sessions_of(stack, tenant, "alice")) == [newer]
    assert list(sessions_of(stack, tenant, "bob")) == [bobs]


def test_a_bad_limit_or_cursor_is_refused_as_the_history_refuses_its_own(
    stack: Deployment, doc: dict[str, Any]
) -> None:
    tenant = unique("sl")
    session = unique("s")
    chat(stack, tenant, "alice", session, "one")
    chat(stack, tenant, "alice", session, "two")
    chat(stack, tenant, "alice", unique("s"), "three")
    history = httpx.get(
        f"{stack.api.url}/api/sessions/{session}/messages",
        params={"limit": 1},
        headers=auth(tenant, user="alice"),
        timeout=10,
    )
    history_cursor = history.json()["next_cursor"]
    list_cursor = listed(stack, doc, tenant, "alice", limit=1).json()["next_cursor"]
    assert history_cursor
    assert list_cursor
    cases: list[tuple[dict[str, Any], dict[str, Any], int]] = [
        ({"limit": 0}, {"limit": 0}, 422),
        ({"limit": PAGE_MAX + 1}, {"limit": PAGE_MAX + 1}, 422),
        ({"limit": "many"}, {"limit": "many"}, 422),
        ({"cursor": "garbage"}, {"cursor": "garbage"}, 400),
        ({"cursor": history_cursor}, {"cursor": "v2.bm90IGEgY3Vyc29y"}, 400),
    ]
    for params, history_params, status in cases:
        reply = listed(stack, doc, tenant, "alice", **params)
        theirs = httpx.get(
            f"{stack.api.url}/api/sessions/{session}/messages",
            params=history_params,
            headers=auth(tenant, user="alice"),
            timeout=10,
        )
        assert (reply.status_code, theirs.status_code) == (status, status), params
        error, their_error = reply.json()["error"], theirs.json()["error"]
        assert error["code"] == their_error["code"], (reply.text, theirs.text)
        assert error["details"] == their_error["details"], (reply.text, theirs.text)
    wrong_way = httpx.get(
        f"{stack.api.url}/api/sessions/{session}/messages",
        params={"cursor": list_cursor},
        headers=auth(tenant, user="alice"),
        timeout=10,
    )
    assert wrong_way.status_code == 400, wrong_way.text
    assert listed(stack, doc, tenant, "alice", limit=PAGE_MAX).status_code == 200


def test_the_list_needs_a_token_of_the_tenant_it_names(
    stack: Deployment, doc: dict[str, Any]
) -> None:
    unauthenticated = httpx.get(f"{stack.api.url}{LIST}", timeout=10)
    assert unauthenticated.status_code == 401, unauthenticated.text
    assert violations(doc, "GET", LIST, unauthenticated) == []
    other = httpx.get(
        f"{stack.api.url}{LIST}", headers={**auth("t1"), "X-Tenant-ID": "t2"}, timeout=10
    )
    assert other.status_code == 403, other.text
    assert violations(doc, "GET", LIST, other) == []


def test_the_document_declares_the_list_and_its_limit_as_the_history_does(
    doc: dict[str, Any],
) -> None:
    operation = doc["paths"][LIST]["get"]
    assert set(operation["responses"]) == {"200", "400", "401", "403", "422", "429", "503"}
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/SessionList"}, schema

    def limit_of(path: str) -> dict[str, Any]:
        parameters = doc["paths"][path]["get"]["parameters"]
        (limit,) = [p for p in parameters if p["name"] == "limit"]
        return dict(limit)

    assert limit_of(LIST) == limit_of(MESSAGES)


def test_without_postgresql_the_list_is_503_persistence_not_configured(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    with lone_api(e2e_redis, tmp_path) as api:
        reply = httpx.get(f"{api.url}{LIST}", headers=auth(unique("sl")), timeout=10)
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "persistence_not_configured", reply.text
        assert violations(fetch_document(api.url), "GET", LIST, reply) == []


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
