"""A real browser (Debian's Chromium, driven by Playwright) on a page of an allowed origin.

What only a browser checks: the CORS preflight of a send with `Authorization`, which response
headers a page may read (`RateLimit-*`, `Retry-After`, `Idempotent-Replayed`), error bodies a
page can read on a refusal, the socket's subprotocol handshake, and that a page of another
origin gets neither the REST API nor a socket. The page is served from 127.0.0.1 (Chromium
keeps `about:blank` pages off loopback); `localhost` on the same port is the foreign origin.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

from services.cli.embedded import RedisServer, free_port
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import token, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy, redis_client

pytestmark = pytest.mark.e2e

# Without the networking flags Chromium tries Google's hosts at start and is refused by this
# machine's closed network; as root it needs --no-sandbox.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FREE_PER_SESSION = 10  # the free tier's requests per minute per session
PRO_PER_SESSION = 60  # the pro tier's (`make dev`'s demo tenant, whose tier streams)
PAGE_SECONDS = 60  # the longest a page's script may take


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.fail(
            "no Chromium for the browser tests: install Debian's 'chromium' (`make test` and "
            ".ci/run do) or set CHROMIUM to a Chrome or Chromium binary"
        )
    return path


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>chat</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def page_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def allowed(
    e2e_redis: RedisServer, page_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """A deployment that admits pages of http://127.0.0.1:<page_port> only; free tier."""
    with deploy(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        allowed_origins=f"http://127.0.0.1:{page_port}",
        default_tier="free",
        **FAST_EXECUTOR,
    ) as deployed:
        yield deployed


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path(), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, origin: str) -> Page:
    page = await browser.new_page()
    await page.goto(origin + "/")
    return page


async def run_in(page: Page, script: str, arg: Any) -> Any:
    """`page.evaluate`, bounded: a script waiting for an event that never comes fails this
    test with its own error, not the whole run's timeout with nothing said."""
    return await asyncio.wait_for(page.evaluate(script, arg), PAGE_SECONDS)


# Runs in the page: a socket, then a send by REST; what the page could see of both.
CHAT = """
async ({api, ws, tenant, session, token}) => {
  const sock = new WebSocket(
    `${ws}/ws/${tenant}/${session}`, ["orchestrator.v1", "bearer." + token]
  );
  const types = [];
  let answer = null;
  const answered = new Promise((resolve, reject) => {
    sock.onmessage = (m) => {
      const event = JSON.parse(m.data);
      types.push(event.type);
      if (event.type === "chat.response") { answer = event; resolve(); }
    };
    sock.onerror = () => reject(new Error("socket error"));
    sock.onclose = (e) => reject(new Error(`socket closed ${e.code} ${e.reason}; saw ${types}`));
    setTimeout(() => reject(new Error(`no chat.response in 30 s; saw ${types}`)), 30000);
  });
  // On a failure, what the API says of the task: was it answered (and the socket missed it),
  // or is it still waiting (an executor or worker that did not take it)?
  const withTask = async (error, taskId) => {
    const task = await fetch(`${api}/api/chat/tasks/${taskId}`, {
      headers: {"Authorization": "Bearer " + token},
    });
    return new Error(`${error.message}; the task: ${task.status} ${await task.text()}`);
  };
  await new Promise((resolve, reject) => {
    sock.onopen = resolve;
    sock.onerror = () => reject(new Error("socket refused"));
  });
  const send = () => fetch(`${api}/api/chat/send`, {
    method: "POST",
    headers: {
      "Authorization": "Bearer " + token,
      "Content-Type": "application/json",
      "Idempotency-Key": session,
    },
    body: JSON.stringify({message: "hello from a browser", session_id: session}),
  });
  const first = await send();
  const sent = await first.json();
  if (first.status !== 202) throw new Error(`send: ${first.status} ${JSON.stringify(sent)}`);
  try {
    await answered;
  } catch (error) {
    throw await withTask(error, sent.task_id);
  }
  const again = await send();
  const result = {
    protocol: sock.protocol,
    status: first.status,
    task_id: sent.task_id,
    limit: first.headers.get("RateLimit-Limit"),
    remaining: first.headers.get("RateLimit-Remaining"),
    reset: first.headers.get("RateLimit-Reset"),
    replayed: again.headers.get("Idempotent-Replayed"),
    replayed_task: (await again.json()).task_id,
    types: types,
    answer_task: answer.task_id,
  };
  sock.close();
  return result;
}
"""

# Runs in the page: sends until refused; the refusal as the page sees it.
REFUSALS = """
async ({api, session, token, count}) => {
  const send = (auth) => fetch(`${api}/api/chat/send`, {
    method: "POST",
    headers: {"Authorization": auth, "Content-Type": "application/json"},
    body: JSON.stringify({message: "again", session_id: session}),
  });
  const statuses = [];
  let refused = null;
  for (let i = 0; i < count; i++) {
    const reply = await send("Bearer " + token);
    statuses.push(reply.status);
    if (reply.status === 429) {
      const code = (await reply.json()).error.code;
      refused = {retry_after: reply.headers.get("Retry-After"), code};
      break;
    }
    await reply.json();
  }
  const forged = await send("Bearer not.a.jwt");
  const code = (await forged.json()).error.code;
  return {statuses, refused, forged: {status: forged.status, code}};
}
"""

# Runs in a page of a foreign origin: what it gets of the API and of a socket.
FOREIGN = """
async ({api, ws, tenant, session, token}) => {
  let rest;
  try {
    await fetch(`${api}/api/chat/send`, {
      method: "POST",
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
      body: JSON.stringify({message: "from elsewhere", session_id: session}),
    });
    rest = "readable";
  } catch (error) {
    rest = "blocked";
  }
  const socket = await new Promise((resolve) => {
    const sock = new WebSocket(
      `${ws}/ws/${tenant}/${session}`, ["orchestrator.v1", "bearer." + token]
    );
    sock.onopen = () => { sock.close(); resolve("open"); };
    sock.onclose = (event) => resolve(`closed ${event.code}`);
  });
  return {rest, socket};
}
"""


# Runs in the page: a socket opened with `protocols`; how it ended, as the page sees it.
CLOSED = """
async ({ws, tenant, session, protocols}) => new Promise((resolve) => {
  const sock = new WebSocket(`${ws}/ws/${tenant}/${session}`, protocols);
  sock.onclose = (event) => resolve({code: event.code, reason: event.reason});
})
"""


def endpoints(deployment: Deployment, tenant: str) -> dict[str, str]:
    return {
        "api": deployment.api.url,
        "ws": deployment.api.ws_url,
        "tenant": tenant,
        "token": token(tenant),
    }


async def test_a_page_of_an_allowed_origin_chats_and_reads_the_rate_limit_headers(
    allowed: Deployment, browser: Browser, page_port: int
) -> None:
    tenant = unique("t")
    page = await open_page(browser, f"http://127.0.0.1:{page_port}")
    seen = await run_in(page, CHAT, {**endpoints(allowed, tenant), "session": unique("s")})
    assert seen["protocol"] == "orchestrator.v1"
    assert seen["status"] == 202
    assert seen["types"][0] == "connection.ack"
    assert seen["types"][-1] == "chat.response"
    assert seen["answer_task"] == seen["task_id"]
    assert seen["limit"] == str(FREE_PER_SESSION)
    assert seen["remaining"] == str(FREE_PER_SESSION - 1)
    assert seen["reset"] is not None
    assert int(seen["reset"]) > 0
    assert seen["replayed"] == "true"
    assert seen["replayed_task"] == seen["task_id"]


async def test_a_page_reads_the_refusals_retry_after_and_error_bodies(
    allowed: Deployment, browser: Browser, page_port: int
) -> None:
    tenant = unique("t")
    page = await open_page(browser, f"http://127.0.0.1:{page_port}")
    seen = await run_in(
        page,
        REFUSALS,
        {**endpoints(allowed, tenant), "session": unique("s"), "count": FREE_PER_SESSION + 1},
    )
    assert seen["statuses"] == [202] * FREE_PER_SESSION + [429]
    assert seen["refused"]["code"] == "rate_limited"
    assert int(seen["refused"]["retry_after"]) >= 1
    assert seen["forged"] == {"status": 401, "code": "unauthorized"}


async def test_a_page_of_another_origin_gets_neither_the_api_nor_a_socket(
    allowed: Deployment, browser: Browser, page_port: int
) -> None:
    tenant = unique("t")
    page = await open_page(browser, f"http://localhost:{page_port}")
    seen = await run_in(page, FOREIGN, {**endpoints(allowed, tenant), "session": unique("s")})
    assert seen["rest"] == "blocked"
    assert seen["socket"] == "closed 1006"  # refused with 403 before the handshake


async def test_a_page_sees_why_its_socket_was_refused(
    allowed: Deployment, browser: Browser, page_port: int
) -> None:
    """Refusals after the Origin check complete the handshake and close with a code and a
    reason, so a page can tell "sign in again" from a network error (1006, no reason)."""
    tenant = unique("t")
    page = await open_page(browser, f"http://127.0.0.1:{page_port}")
    ends = {
        "forged token": (["orchestrator.v1", "bearer.not.a.jwt"], "unauthorized"),
        "no token": (["orchestrator.v1"], "unauthorized: no token"),
        "other tenant": (["orchestrator.v1", "bearer." + token(unique("t"))], "forbidden"),
    }
    for name, (protocols, reason) in ends.items():
        seen = await run_in(
            page, CLOSED, {"ws": allowed.api.ws_url, "tenant": tenant, "session": unique("s"),
                           "protocols": protocols},
        )  # fmt: skip
        assert seen["code"] == 1008, name
        assert seen["reason"].startswith(reason), (name, seen["reason"])


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_page_code(api_url: str, ws_url: str, tenant: str, session: str) -> str:
    """The README's code for a page (its first ```js block), pointed at this deployment."""
    block = re.search(r"```js\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md has no ```js block for pages"
    code = block.group(1)
    for old, new in (
        ("http://127.0.0.1:8000", api_url),
        ("ws://127.0.0.1:8000", ws_url),
        ('tenant = "demo"', f'tenant = "{tenant}"'),
        ('session = "my-session"', f'session = "{session}"'),
    ):
        assert old in code, f"the README's page code no longer has {old!r}"
        code = code.replace(old, new)
    # What the README leaves to the page: showing events and messages, signing in again.
    return (
        code
        + "\nconst events = []; function show(e) { events.push(e); }\n"
        + "const messages = []; function showMessage(m) { messages.push(m); }\n"
        + ("let signedOut = null; function signIn(reason) { signedOut = reason; }\n")
    )


# Loaded before the README's code: keeps every socket the page opens, so the test can drop one.
KEEP_SOCKETS = """
const sockets = [];
window.WebSocket = class extends WebSocket {
  constructor(...args) { super(...args); sockets.push(this); }
};
"""


async def test_the_readme_code_for_pages_chats_and_resumes(
    allowed: Deployment, browser: Browser, page_port: int, e2e_redis: RedisServer
) -> None:
    """The README's snippet, run as it is written: a send, its answer on the socket, the rate
    headers; a dropped socket reconnecting from `lastId` with what was sent meanwhile, nothing
    twice; and a socket refused for a bad token handed to `signIn`."""
    tenant, session = unique("t"), unique("s")
    redis = redis_client(e2e_redis)
    try:  # the README's page streams: the tier of `make dev`'s demo tenant, not the free one
        await QuotaStore(redis, load_settings()).set(tenant, "pro")
    finally:
        await redis.aclose()
    page = await open_page(browser, f"http://127.0.0.1:{page_port}")
    await page.add_script_tag(content=KEEP_SOCKETS)
    await page.add_script_tag(
        content=readme_page_code(allowed.api.url, allowed.api.ws_url, tenant, session)
    )
    seen = await run_in(
        page,
        """async (token) => {
          const until = async (test) => {
            for (let i = 0; i < 500 && !test(); i++) await new Promise((r) => setTimeout(r, 20));
            return test();
          };
          const acks = () => events.filter((e) => e.type === "connection.ack");
          const answer = (sent) => events.some(
            (e) => e.type === "chat.response" && e.task_id === sent.task_id);
          connect(token);
          await until(() => acks().length === 1);
          const sent = await send(token, "hello from the README");
          const answered = await until(() => answer(sent));
          sockets[0].close(4000, "dropped");  // not 1008: the snippet reconnects in a second
          await until(() => sockets[0].readyState === WebSocket.CLOSED);
          const away = await send(token, "while away");
          const resumedAnswer = await until(() => acks().length === 2 && answer(away));
          connect("not.a.jwt");
          await until(() => signedOut !== null);
          return {
            remaining: sent.remaining, answered, resumedAnswer, signedOut,
            resumed: acks()[1].data.resumed,
            ids: events.filter((e) => e.type !== "connection.ack").map((e) => e.id),
          };
        }""",
        token(tenant),
    )
    assert seen["answered"]
    assert seen["remaining"] == PRO_PER_SESSION - 1
    assert seen["resumedAnswer"]
    assert seen["resumed"] is True
    assert len(seen["ids"]) == len(set(seen["ids"]))  # nothing twice across the reconnect
    assert seen["signedOut"].startswith("unauthorized")


async def test_the_readme_code_reads_a_proxys_html_error_as_an_error(
    allowed: Deployment, browser: Browser, page_port: int
) -> None:
    """A proxy in front answers 502 with an HTML page while no api pod is reachable
    (tests/ingress): README's `send` parsed every error body as JSON and threw a SyntaxError
    ("Unexpected token '<'") instead of the error."""
    page = await open_page(browser, f"http://127.0.0.1:{page_port}")
    tenant = unique("t")
    await page.add_script_tag(
        content=readme_page_code(allowed.api.url, allowed.api.ws_url, tenant, unique("s"))
    )

    async def bad_gateway(route: Route) -> None:
        await route.fulfill(
            status=502,
            content_type="text/html",
            body="<html><body><h1>502 Bad Gateway</h1></body></html>",
            headers={"Access-Control-Allow-Origin": f"http://127.0.0.1:{page_port}"},
        )

    await page.route("**/api/chat/send", bad_gateway)
    thrown = await run_in(
        page,
        """async (t) => {
          try { await send(t, "hello"); return null; }
          catch (e) { return {name: e.name, message: e.message}; }
        }""",
        token(tenant),
    )
    assert thrown == {"name": "Error", "message": "HTTP 502"}
