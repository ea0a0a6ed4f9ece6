"""The README's page code in a real Chromium, through the failures it promises to handle: a
resume refused after a long absence made good from history, and a reconnect with a fresh
token. A TCP proxy stands for the ingress, so the page's network can drop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Route

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from tests.e2e.clients import auth, connect, events_until, final_of, send, token, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy
from tests.e2e.ingress_proxy import Proxy
from tests.e2e.test_browser import KEEP_SOCKETS, browser, page_port, readme_page_code
from tests.e2e.test_history import postgres

pytestmark = pytest.mark.e2e

__all__ = ["browser", "page_port", "postgres"]  # fixtures used here

LEEWAY = 10  # services.core.auth.LEEWAY_SECONDS, as README states it

# Waiting in the page for a condition (bounded): events arrive in the page, not in Python.
HELPERS = """
window.until = async (test, ms = 20000) => {
  const end = Date.now() + ms;
  while (!test() && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  return test();
};
window.acks = () => events.filter((e) => e.type === "connection.ack");
"""


@pytest.fixture(scope="module")
def persisted(
    e2e_redis: RedisServer,
    postgres: PostgresServer,
    page_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    """Pages of http://127.0.0.1:<page_port> admitted; history on; a log of 10 events, so a
    long answer trims what a page away from it had not seen."""
    with deploy(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        database_url=postgres.url(),
        allowed_origins=f"http://127.0.0.1:{page_port}",
        default_tier="pro",  # the README's page streams
        session_log_maxlen="10",
        **FAST_EXECUTOR,
    ) as deployed:
        yield deployed


@pytest.fixture
async def ingress() -> AsyncIterator[Proxy]:
    proxy = Proxy()
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def readme_page(
    browser: Browser, page_port: int, api_url: str, ws_url: str, tenant: str, session: str
) -> Page:
    """A page running the README's code against `api_url`/`ws_url`; it keeps every socket it
    opens in `sockets`, every event shown in `events`, every message shown in `messages`."""
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{page_port}/")
    await page.add_script_tag(content=KEEP_SOCKETS)
    code = readme_page_code(api_url, ws_url, tenant, session)
    await page.add_script_tag(content=code + HELPERS)
    return page


async def chat_elsewhere(api_url: str, ws_url: str, tenant: str, session: str) -> str:
    """A long streamed answer (more events than the log keeps) sent and received on another
    device; returns its task id once its messages are in history."""
    ws, _ = await connect(ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        body = {"message": "from my phone", "stream": True, "session_id": session,
                "context": {"simulate": {"repeat": 40}}}  # fmt: skip
        task_id: str = (await send(http, api_url, tenant, body)).json()["task_id"]
        await events_until(ws, final_of(task_id))
        await ws.close()
        deadline = time.monotonic() + 20
        while True:  # the writer's commit: nothing to await from here
            reply = await http.get(
                f"{api_url}/api/sessions/{session}/messages", headers=auth(tenant)
            )
            found = reply.json().get("messages", []) if reply.status_code == 200 else []
            if any(m["task_id"] == task_id and m["role"] == "assistant" for m in found):
                return task_id
            assert time.monotonic() < deadline, "the answer never reached history"
            await asyncio.sleep(0.1)


async def away_while_another_device_chats(
    page: Page, ingress: Proxy, deployment: Deployment, tenant: str, session: str
) -> dict[str, Any]:
    """The page's network drops (its socket retries every second, in vain) while the user
    chats on another device; then it comes back. Returns the missed task and what the page
    showed from history."""
    ingress.down()
    assert await page.evaluate("until(() => sockets[0].readyState === WebSocket.CLOSED)")
    api = deployment.api
    missed = await chat_elsewhere(api.url, api.ws_url, tenant, session)
    ingress.up(api.port or 0)
    shown: dict[str, Any] = await page.evaluate(
        """async (task) => {
          const mine = () => messages.filter((m) => m.task_id === task);
          await until(() => mine().length === 2);
          const ack = acks()[acks().length - 1];
          return {resumed: ack.data.resumed, roles: mine().map((m) => m.role),
                  tasks: [...new Set(messages.map((m) => m.task_id))]};
        }""",
        missed,
    )
    shown["missed"] = missed
    return shown


async def test_a_page_told_resumed_false_shows_what_it_missed_from_history(
    persisted: Deployment, browser: Browser, page_port: int, ingress: Proxy
) -> None:
    """The page had seen an answer; while it was away another answer trimmed the log. Its
    resume is refused (`resumed: false`): README's code asks history for what ended after the
    last id it saw. It overwrote that id with the ack's (the log's newest) and history after
    it had nothing: the missed answer never reached the page."""
    tenant, session = unique("t"), unique("s")
    ingress.up(persisted.api.port or 0)
    page = await readme_page(browser, page_port, ingress.url, ingress.ws_url, tenant, session)
    seen = await page.evaluate(
        """async (t) => {
          connect(t);
          await until(() => acks().length === 1);
          const sent = await send(t, "seen on the page");
          await until(() => events.some(
            (e) => e.type === "chat.response" && e.task_id === sent.task_id));
          return sent.task_id;
        }""",
        token(tenant),
    )
    shown = await away_while_another_device_chats(page, ingress, persisted, tenant, session)
    assert shown["resumed"] is False
    assert shown["roles"] == ["user", "assistant"]
    assert shown["tasks"] == [shown["missed"]]  # not the answer it had seen
    assert seen != shown["missed"]


async def test_a_page_that_saw_only_the_join_mark_gets_the_missed_answer(
    persisted: Deployment, browser: Browser, page_port: int, ingress: Proxy
) -> None:
    """A page that joined an empty session holds a join mark (`<ms>-18446744073709551615`)
    as its last id: history refused it (400), so its missed answer could not be had."""
    tenant, session = unique("t"), unique("s")
    ingress.up(persisted.api.port or 0)
    page = await readme_page(browser, page_port, ingress.url, ingress.ws_url, tenant, session)
    await page.evaluate("(t) => { connect(t); return until(() => acks().length === 1); }",
                        token(tenant))  # fmt: skip
    assert (await page.evaluate("lastId")).endswith("-18446744073709551615")
    shown = await away_while_another_device_chats(page, ingress, persisted, tenant, session)
    assert shown["resumed"] is False
    assert shown["roles"] == ["user", "assistant"]
    assert shown["tasks"] == [shown["missed"]]


async def test_a_page_reconnecting_with_a_fresh_token_holds_one_socket(
    persisted: Deployment, browser: Browser, page_port: int
) -> None:
    """README: after its token's exp a socket's `chat.send` gets `chat.error unauthorized`;
    reconnect with a fresh token. README's `connect` kept no handle on its socket: after
    `connect(fresh)` the page held two sockets of the session and showed every event twice."""
    tenant, session = unique("t"), unique("s")
    api = persisted.api
    page = await readme_page(browser, page_port, api.url, api.ws_url, tenant, session)
    old = token(tenant, ttl=2 - LEEWAY)  # its leeway ends in about two seconds
    expires_at = time.time() + 2
    assert await page.evaluate("(t) => { connect(t); return until(() => acks().length === 1); }",
                               old)  # fmt: skip
    refused = await page.evaluate(
        """async (wait) => {
          await new Promise((r) => setTimeout(r, wait));  // the token's expiry: no event
          sockets[0].send(JSON.stringify({type: "chat.send", data: {message: "hi"}}));
          await until(() => events.some((e) => e.type === "chat.error"));
          return events.find((e) => e.type === "chat.error").data.code;
        }""",
        int((expires_at - time.time() + 1.0) * 1000),
    )
    assert refused == "unauthorized"
    seen = await page.evaluate(
        """async (t) => {
          connect(t);
          await until(() => acks().length === 2);
          const sent = await send(t, "after a fresh token");
          const isAnswer = (e) => e.type === "chat.response" && e.task_id === sent.task_id;
          await until(() => events.some(isAnswer));
          return {
            open: sockets.filter((s) => s.readyState === WebSocket.OPEN).length,
            closed: sockets[0].readyState === WebSocket.CLOSED,
            ids: events.filter((e) => e.task_id === sent.task_id).map((e) => e.id),
          };
        }""",
        token(tenant),
    )
    assert seen["open"] == 1, seen
    assert seen["closed"], seen  # the first socket was closed by connect(), not left open
    assert len(seen["ids"]) == len(set(seen["ids"])), seen


async def test_a_page_catching_up_from_history_does_not_show_a_live_answer_twice(
    persisted: Deployment, browser: Browser, page_port: int, ingress: Proxy
) -> None:
    """README's `missed` asked history for every task that ended after the page's last id,
    while the new socket was already live: an answer that ended meanwhile came on the socket
    and again from history (shown twice). It keeps to what ended by the ack's id. Here the
    page's history request is held until such an answer was shown live and persisted."""
    tenant, session = unique("t"), unique("s")
    api = persisted.api
    ingress.up(api.port or 0)
    page = await readme_page(browser, page_port, ingress.url, ingress.ws_url, tenant, session)
    await page.evaluate("(t) => { connect(t); return until(() => acks().length === 1); }",
                        token(tenant))  # fmt: skip
    release = asyncio.Event()

    async def hold(route: Route) -> None:
        await release.wait()
        await route.continue_()

    await page.route("**/api/sessions/**", hold)
    ingress.down()
    assert await page.evaluate("until(() => sockets[0].readyState === WebSocket.CLOSED)")
    missed = await chat_elsewhere(api.url, api.ws_url, tenant, session)
    ingress.up(api.port or 0)
    resumed = await page.evaluate("until(() => acks().length === 2).then(() => acks()[1])")
    assert resumed["data"]["resumed"] is False  # so `missed` asks history (held for now)
    live = await chat_elsewhere(api.url, api.ws_url, tenant, session)
    assert await page.evaluate(
        "(task) => until(() => events.some("
        "(e) => e.type === 'chat.response' && e.task_id === task))",
        live,
    )
    release.set()
    tasks = await page.evaluate(
        """async (task) => {
          await until(() => messages.filter((m) => m.task_id === task).length === 2);
          return [...new Set(messages.map((m) => m.task_id))];
        }""",
        missed,
    )
    assert tasks == [missed], {"missed": missed, "live": live, "shown from history": tasks}


async def test_the_readme_code_fetches_what_a_resume_gap_lost_once_the_next_event_bounds_it(
    browser: Browser, page_port: int, tmp_path: Path
) -> None:
    """README: an `error` `resume_gap` on an open socket means, like `resumed: false`, that
    tasks which ended in between are only in history. The README's code fetched history only
    for an ack with `resumed: false`: a page told of a gap showed it and fetched nothing.
    Redis restarting without its data under an open socket gives the gap; the page's code now
    calls `missed` from its cursor up to (not through) the next event's id."""
    redis = RedisServer().start()
    try:
        with deploy(
            redis,
            tmp_path / "logs",
            allowed_origins=f"http://127.0.0.1:{page_port}",
            default_tier="pro",
            **FAST_EXECUTOR,
        ) as deployed:
            api, tenant, session = deployed.api, unique("t"), unique("s")
            signed = token(tenant)
            page = await readme_page(browser, page_port, api.url, api.ws_url, tenant, session)
            await page.add_script_tag(  # what the page asks of history, recorded
                content="window.asked = []; missed = (...args) => { asked.push(args); };"
            )
            await page.evaluate("(t) => connect(t)", signed)
            assert await page.evaluate("until(() => acks().length === 1)")
            first = (await page.evaluate("(t) => send(t, 'before')", signed))["task_id"]
            assert await page.evaluate(
                "(id) => until(() => events.some((e) => e.task_id === id && "
                "e.type === 'chat.response'))",
                first,
            )
            cursor = await page.evaluate("lastId")
            redis.stop()  # Redis comes back without its data (no persistence)
            redis.start()
            assert await page.evaluate(
                "until(() => events.some((e) => e.data && e.data.code === 'resume_gap'))"
            )
            assert await page.evaluate("asked") == []  # bounded by the next event, not yet
            after = await page.evaluate("(t) => send(t, 'after')", signed)
            assert await page.evaluate(
                "(id) => until(() => events.some((e) => e.task_id === id && "
                "e.type === 'chat.response'))",
                after["task_id"],
            )
            nxt = await page.evaluate(
                "(id) => events.find((e) => e.task_id === id).id", after["task_id"]
            )
            assert await page.evaluate("asked") == [[signed, cursor, nxt, False]]
    finally:
        redis.cleanup()
