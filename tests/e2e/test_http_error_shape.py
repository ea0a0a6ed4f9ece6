"""README "Client API": "Errors have one shape everywhere: {"error": {"code", "message",
"details"}} (one exception: a CORS preflight from an origin not allowed ... plain-text 400)".

The page code of the README relies on it: `if (!r.ok) throw new Error((await r.json())
.error.message)`. The refusals of the HTTP layer (services/api/http_protocol.py) are plain
text: a request body that falls silent (408 "Request body too slow"), a head over
HTTP_MAX_HEAD_BYTES (400), more than 100 header fields (400)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from services.cli.embedded import RedisServer
from tests.e2e.conftest import Deployment, deploy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quick_head(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    logs = tmp_path_factory.mktemp("logs")
    with deploy(e2e_redis, logs, http_head_timeout_seconds="1") as deployed:
        yield deployed


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(data)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply


HEADERS_101 = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
CASES = {
    "body_silent_408": (
        b"POST /api/chat/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    ),
    "head_too_large_400": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
    + b"a" * 70_000
    + b"\r\n\r\n",
    "too_many_fields_400": b"GET /health HTTP/1.1\r\nHost: x\r\n" + HEADERS_101 + b"\r\n",
}


@pytest.mark.parametrize("case", list(CASES))
def test_http_layer_refusals_have_the_error_shape(quick_head: Deployment, case: str) -> None:
    assert quick_head.api.port is not None
    reply = exchange(quick_head.api.port, CASES[case])
    head, _, body = reply.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode()
    assert status.split(" ")[1] in ("400", "408"), reply[:300]
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        pytest.fail(f"{status}: body {body[:100]!r} is not {{'error': {{...}}}}\n{head.decode()}")
    assert set(error) == {"code", "message", "details"}, error
