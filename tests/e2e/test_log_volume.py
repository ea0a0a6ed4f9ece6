"""What a client, without any token, can make an api write to its log, and what its lines
name (DESIGN §7: JSON lines with the tenant and session where known)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import lone_api, new_stack
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


def test_a_refused_send_names_its_tenant_and_session(tmp_path: Path) -> None:
    """A verified tenant's send for a named session meets Redis down: the 503's line had the
    trace id but not whose send it was, though both were known."""
    redis = RedisServer().start()
    stack = new_stack(redis, tmp_path / "logs")
    try:
        child = stack.start_api()
        stack.wait_ready(child)
        tenant, session = unique("t"), unique("s")
        redis.stop()
        with httpx.Client(base_url=child.url, timeout=15) as http:
            body = {"session_id": session, "message": "hello"}
            reply = http.post("/api/chat/send", headers=auth(tenant), json=body)
        assert reply.status_code == 503, reply.text
        [line] = [line for line in log_lines(child) if "redis unavailable" in line]
        record = json.loads(line)
        assert (record.get("tenant_id"), record.get("session_id")) == (tenant, session), record
    finally:
        stack.stop()
        redis.cleanup()
