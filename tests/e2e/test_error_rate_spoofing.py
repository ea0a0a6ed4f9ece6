"""An anonymous client must not be able to make the api's 5xx error rate (the metric behind the
critical alert `OrchestratorHighErrorRate`) say that the api is failing.

Each case below is a refusal the client itself caused (it hung up mid-upload, went silent, or
sent a broken chunked body); none is a fault of the api, and none needs a token.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e

SEND_500 = re.compile(
    r'^orchestrator_http_requests_total\{[^}]*path="/api/chat/send",status_code="500"\} (\S+)$',
    re.M,
)
HEAD = b"POST /api/chat/send HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    redis = RedisServer().start()
    try:
        # A short body timeout keeps the silent-client case under the test's budget.
        with lone_api(
            redis, tmp_path_factory.mktemp("logs"), http_head_timeout_seconds="2"
        ) as child:
            yield child
    finally:
        redis.cleanup()


def send_500s(api: Child) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{api.metrics_port}/metrics", timeout=5)
    found = SEND_500.search(text.read().decode())
    return float(found.group(1)) if found else 0.0


def exchange(api: Child, data: bytes, *, hang_up: bool = False, wait: float = 5.0) -> bytes:
    """Send raw bytes; hang up at once (`hang_up`) or read the answer until the api closes."""
    assert api.port is not None
    with socket.create_connection(("127.0.0.1", api.port), timeout=wait) as conn:
        conn.sendall(data)
        if hang_up:
            return b""
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
        return answer


def settled(api: Child, before: float) -> float:
    """The counter once the api has finished with the request (it records after the fact)."""
    deadline = time.monotonic() + 3
    value = send_500s(api)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        value = send_500s(api)
    return value - before


def test_an_upload_the_client_abandons_is_not_counted_as_a_server_error(api: Child) -> None:
    """A phone that loses its network mid-upload (or a script that hangs up) is the client's
    doing: the api answers nobody. Expected: no `status_code="500"` in
    orchestrator_http_requests_total. Observed: each abandoned upload adds one 500 (Litestar
    raises InternalServerException "client disconnected prematurely" while reading the body),
    so ten anonymous connections a second keep the critical OrchestratorHighErrorRate firing."""
    before = send_500s(api)
    for _ in range(3):
        exchange(api, HEAD + b'Content-Length: 1000\r\n\r\n{"message"', hang_up=True)
    assert settled(api, before) == 0, "abandoned uploads were counted as 500s"


def test_a_broken_chunked_body_answered_400_is_not_counted_as_500(api: Child) -> None:
    """The client gets `400 bad_request` (its chunked body is not HTTP), so the metric should
    say 400. Observed: the client reads 400 while orchestrator_http_requests_total records a
    500 for the same request: an anonymous client writes server errors into the dashboard."""
    before = send_500s(api)
    answer = exchange(api, HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"mes\r\nZZ\r\n')
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert settled(api, before) == 0, "a 400 given to the client was recorded as a 500"


def test_a_body_timeout_answered_408_is_not_counted_as_500(api: Child) -> None:
    """README: no byte of the body for HTTP_HEAD_TIMEOUT_SECONDS is `408 request_timeout`, a
    client fault. Expected: the metric records 408 (or nothing). Observed: the client reads
    408 and the metric records a 500."""
    before = send_500s(api)
    answer = exchange(api, HEAD + b'Content-Length: 1000\r\n\r\n{"message"', wait=6)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert settled(api, before) == 0, "a 408 given to the client was recorded as a 500"
