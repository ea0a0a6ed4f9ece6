"""What a client, without any token, can make an api write to its log, and what its lines
name (DESIGN §7: JSON lines with the tenant and session where known)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from services.core import keys
from tests.e2e.clients import auth, connect, events_until, final_of, next_event, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy, lone_api, new_stack, redis_client
from tests.e2e.test_http_error_shape import exchange

pytestmark = pytest.mark.e2e


@pytest.fixture
def api(e2e_redis: RedisServer, tmp_path: Path) -> Iterator[Child]:
    """An api of its own: a fresh log file per test."""
    with lone_api(e2e_redis, tmp_path / "logs") as child:
        yield child


def log_lines(child: Child) -> list[str]:
    """The complete lines the child wrote so far. Each request's lines are written before
    its answer, so a request whose answer was read has all of them in the file."""
    assert child.log_path is not None
    return child.log_path.read_text(errors="replace").split("\n")[:-1]


def about_bad_requests(lines: list[str]) -> list[str]:
    return [line for line in lines if "invalid http request" in line.lower()]


def test_one_malformed_request_is_one_line(api: Child) -> None:
    """uvicorn logs "Invalid HTTP request received." and the api's 400 writer logged it
    again."""
    assert api.port is not None
    assert exchange(api.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert len(about_bad_requests(log_lines(api))) == 1, log_lines(api)


def test_a_flood_of_malformed_requests_is_not_a_line_each(api: Child) -> None:
    """300 unparsable requests wrote 600 warnings: a client sending 5 bytes a connection
    decided how much the api logs. 20 a minute of each kind, then a count."""
    assert api.port is not None
    for _ in range(300):
        assert exchange(api.port, b"X\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert 1 <= len(about_bad_requests(log_lines(api))) <= 21


def test_bad_bodies_without_a_token_write_no_traceback(api: Child) -> None:
    """Bodies of 1 000 `[` without a token: each wrote a warning with its stack trace (2 KB
    of log for 1 KB of input)."""
    before = sum(len(line) + 1 for line in log_lines(api))
    with httpx.Client(base_url=api.url, timeout=10) as http:
        for _ in range(20):
            reply = http.post(
                "/api/chat/send", content=b"[" * 1000, headers={"content-type": "application/json"}
            )
            assert reply.status_code == 400, reply.text
    lines = log_lines(api)
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]
    assert not [record for record in records if "exc" in record]
    assert sum(len(line) + 1 for line in lines) - before < 20 * 1000 / 4


def test_a_refused_send_names_its_tenant_session_and_proxy_request_id(tmp_path: Path) -> None:
    """A verified tenant's send for a named session meets Redis down: the 503's line had the
    trace id but not whose send it was, though both were known; nor the proxy's X-Request-ID,
    which leads to the ingress's access log line. A header that could forge log content (a
    control character, or too long) is not bound."""
    redis = RedisServer().start()
    stack = new_stack(redis, tmp_path / "logs")
    try:
        child = stack.start_api()
        stack.wait_ready(child)
        tenant, session = unique("t"), unique("s")
        redis.stop()
        sent = {"3f2a9c1e7b": "3f2a9c1e7b", "x" * 129: None, "a\u0085b": None}
        with httpx.Client(base_url=child.url, timeout=15) as http:
            for proxy_id in sent:
                body = {"session_id": session, "message": "hello"}
                headers = {**auth(tenant), "X-Request-ID": proxy_id.encode("latin-1")}
                reply = http.post("/api/chat/send", headers=headers, json=body)
                assert reply.status_code == 503, reply.text
        lines = [line for line in log_lines(child) if "redis unavailable" in line]
        records = [json.loads(line) for line in lines]
        assert [record.get("x_request_id") for record in records] == list(sent.values()), records
        for record in records:
            assert (record.get("tenant_id"), record.get("session_id")) == (tenant, session), record
    finally:
        stack.stop()
        redis.cleanup()


async def test_a_socket_told_its_events_were_lost_is_logged_with_its_tenant(
    tmp_path: Path,
) -> None:
    """Redis comes back empty under an open socket: the client gets `resume_gap` and the api
    warns. The warning named the session but not the tenant (ids are unique per tenant
    only, so an SRE could not tell whose events were lost)."""
    redis = RedisServer().start()
    try:
        with deploy(redis, tmp_path / "logs", **FAST_EXECUTOR) as deployed:
            child = deployed.api
            tenant, session = unique("t"), unique("s")
            ws, _ = await connect(child.ws_url, tenant, session)
            async with httpx.AsyncClient(timeout=15) as http:
                body = {"message": "hi", "session_id": session}
                reply = await send(http, child.url, tenant, body)
            assert reply.status_code == 202, reply.text
            await events_until(ws, final_of(reply.json()["task_id"]))
            redis.stop()
            notice = await next_event(ws, timeout=15)
            assert notice["data"]["code"] == "unavailable", notice
            redis.start()  # empty: the session's log is gone
            gap = await next_event(ws, timeout=30)
            assert gap["data"]["code"] == "resume_gap", gap
            await ws.close()
            [line] = [line for line in log_lines(child) if "events lost for a socket" in line]
        record = json.loads(line)
        assert (record.get("tenant_id"), record.get("session_id")) == (tenant, session), record
    finally:
        redis.cleanup()


async def test_a_failed_socket_count_refresh_names_its_tenant_and_keeps_its_stack(
    tmp_path: Path,
) -> None:
    """The refresh of a tenant's socket count fails in a way nobody foresaw (here: its key
    holds another type): the warning was the exception's repr alone, neither whose count nor
    where it failed."""
    redis = RedisServer().start()
    stack = new_stack(redis, tmp_path / "logs", connection_ttl_seconds="3")
    try:
        child = stack.start_api()
        stack.wait_ready(child)
        tenant = unique("t")
        ws, _ = await connect(child.ws_url, tenant, unique("s"))
        async with redis_client(redis) as admin:
            await admin.set(keys.tenant_sockets(tenant), "not a sorted set")
            deadline = time.monotonic() + 15  # refreshed every second (a third of the ttl)
            while not (found := _lines_about(child, "refreshing the socket count")):
                assert time.monotonic() < deadline, log_lines(child)
                await asyncio.sleep(0.1)
        await ws.close()
        record = json.loads(found[0])
        assert record.get("tenant_id") == tenant, record
        assert "WRONGTYPE" in record.get("exc", ""), record
    finally:
        stack.stop()
        redis.cleanup()


def _lines_about(child: Child, words: str) -> list[str]:
    return [line for line in log_lines(child) if words in line]
