"""Trace context through a real nginx configured as the chart's ingress."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cli.otlp_sink import Receiver
from services.cli.stack import Child, LocalStack
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import traced
from tests.e2e.test_tracing import trace_of
from tests.ingress.nginx import Nginx

__all__ = ["traced"]

pytestmark = pytest.mark.e2e


@pytest.fixture
def traced_front(
    traced: tuple[LocalStack, Child, Receiver], tmp_path: Path
) -> Iterator[tuple[Nginx, Receiver]]:
    """nginx in front of the traced api (both of its upstreams are that one api)."""
    _, api, receiver = traced
    assert api.port is not None
    nginx = Nginx(tmp_path / "nginx", api.port, api.port).start()
    yield nginx, receiver
    nginx.stop()


async def test_a_frontends_traceparent_survives_the_ingress(
    traced_front: tuple[Nginx, Receiver],
) -> None:
    """Guard: a page that starts a trace (`traceparent`) finds the api's spans of its send in
    that trace when the send went through the ingress: nginx neither drops nor rewrites it
    (the `X-Request-ID` it adds is not used by the api: nothing relies on it)."""
    nginx, receiver = traced_front
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as http:
        reply = await http.post(
            "/api/chat/send",
            json={"message": "traced", "session_id": unique("s")},
            headers={**auth(unique("t")), "traceparent": f"00-{trace_id}-{parent}-01"},
        )
    assert reply.status_code == 202, reply.text
    spans = await trace_of(receiver, reply.json()["task_id"], {"agent-orchestrator-api"})
    assert {s.trace_id for s in spans} == {trace_id}
