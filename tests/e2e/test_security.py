"""Security: attacks by a client holding a valid token of one tenant, or no token at all,
against real processes (embedded Redis, uvicorn api, worker, executor)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from services.cli.embedded import RedisServer
from tests.e2e.clients import connect, next_event, unique
from tests.e2e.conftest import Deployment, new_stack

pytestmark = pytest.mark.e2e


async def test_a_deeply_nested_socket_send_gets_an_error_not_a_dropped_socket(
    deployment: Deployment,
) -> None:
    """A frame the decoder accepts, nested just below its depth limit, crashed the socket
    handler (RecursionError while encoding the action): the socket was closed with 1011
    ("internal error", which a client retries with the same frame) instead of the frame
    getting an `error`/`chat.error` event with the socket left open."""
    tenant = unique("t")
    outcomes: dict[int, str] = {}
    for depth in range(900, 1000):
        ws, _ = await connect(deployment.api.ws_url, tenant, unique("s"))
        nested = "[" * depth + "]" * depth
        await ws.send(
            '{"type": "chat.send", "data": {"message": "hi", "context": {"a": ' + nested + "}}}"
        )
        try:
            event = await next_event(ws, timeout=10)
            outcomes[depth] = f"{event['type']}:{event['data'].get('code')}"
            await ws.send(json.dumps({"type": "ping"}))
            while (await next_event(ws, timeout=10))["type"] != "pong":
                pass
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            outcomes[depth] = f"closed {code} {closed.rcvd.reason if closed.rcvd else ''}"
        finally:
            await ws.close()
        if outcomes[depth].startswith(("closed", "error:malformed")):
            break
    dropped = {d: o for d, o in outcomes.items() if o.startswith("closed")}
    log = deployment.api.output(200_000).splitlines()
    crash = [line for line in log if "socket handler failed" in line]
    assert not dropped, (
        f"sockets dropped by a nested frame: {dropped}; all: {outcomes}; "
        f"api log: {crash[-1][-600:] if crash else 'no crash logged'}"
    )


async def test_tokens_never_reach_the_logs_even_at_debug(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """DESIGN §3/§7: the api never writes a token, from either place, into a log line."""
    import websockets

    from tests.e2e.clients import auth, token

    stack = new_stack(e2e_redis, tmp_path_factory.mktemp("logs"), log_level="DEBUG")
    tenant, session = unique("t"), unique("s")
    good = token(tenant)
    forged = token(tenant, secret="not-the-server-secret-" + "y" * 20)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            await http.post("/api/chat/send", json={"message": "hi"}, headers=auth(tenant))
            await http.post(
                "/api/chat/send",
                json={"message": "hi"},
                headers={"Authorization": f"Bearer {forged}"},
            )
            await http.post(
                "/api/chat/send", content=b"{bad", headers={"Authorization": f"Bearer {good}"}
            )
        for bearer in (good, forged, good + "x"):
            try:
                async with websockets.connect(
                    f"{api.ws_url}/ws/{tenant}/{session}?token={bearer}", open_timeout=10
                ) as ws:
                    await asyncio.wait_for(ws.recv(), 10)
                    await ws.send('{"type": "chat.send", "data": {"message": "x"}}')
                    await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed:
                pass
    finally:
        stack.stop()
    logs = "\n".join(
        Path(c).read_text(errors="replace") for c in Path(stack.log_dir or ".").glob("*.log")
    )
    signature_parts = {good.split(".")[2], forged.split(".")[2]}
    leaked = [line[:300] for line in logs.splitlines() if any(p in line for p in signature_parts)]
    assert not leaked, leaked
