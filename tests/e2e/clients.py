"""Real clients for the end-to-end tests: httpx for REST, `websockets` for sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import websockets
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from websockets.asyncio.client import ClientConnection

from services.core import keys
from services.core.auth import issue_token
from services.core.ids import new_id
from services.core.settings import load_settings

SECRET = "e2e-secret-" + "x" * 32
EVENT_TIMEOUT = 20.0

Event = dict[str, Any]


def token(tenant: str, user: str = "user-1", ttl: int = 600, secret: str = SECRET) -> str:
    settings = load_settings(jwt_secret=secret)
    return issue_token(settings, tenant_id=tenant, user_id=user, ttl_seconds=ttl)


def auth(tenant: str, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(tenant, **kwargs)}"}


def unique(prefix: str) -> str:
    return f"{prefix}-{new_id()[:10]}"


async def connect(
    ws_base: str,
    tenant: str,
    session: str,
    *,
    bearer: str | None = None,
    last_event_id: str | None = None,
    origin: str | None = None,
) -> tuple[ClientConnection, Event]:
    """Open a session socket the way a browser does (token in the subprotocol); return the ack."""
    url = f"{ws_base}/ws/{tenant}/{session}"
    if last_event_id is not None:
        url += f"?last_event_id={last_event_id}"
    ws = await websockets.connect(
        url,
        subprotocols=["orchestrator.v1", f"bearer.{bearer or token(tenant)}"],  # type: ignore[list-item]
        origin=origin,  # type: ignore[arg-type]
        open_timeout=10,
    )
    ack = await next_event(ws)
    assert ack["type"] == "connection.ack", ack
    return ws, ack


async def next_event(ws: ClientConnection, timeout: float = EVENT_TIMEOUT) -> Event:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    event: Event = json.loads(raw)
    return event


async def events_until(
    ws: ClientConnection, done: Callable[[Event], bool], timeout: float = EVENT_TIMEOUT
) -> list[Event]:
    """Every event up to and including the first one for which `done` is true."""
    received: list[Event] = []
    async with asyncio.timeout(timeout):
        while True:
            event = await next_event(ws, timeout)
            received.append(event)
            if done(event):
                return received


def final_of(task_id: str) -> Callable[[Event], bool]:
    final = {"chat.response", "chat.error", "chat.cancelled"}
    return lambda e: e.get("task_id") == task_id and e["type"] in final


async def send(
    http: httpx.AsyncClient, base: str, tenant: str, body: dict[str, Any], **headers: str
) -> httpx.Response:
    return await http.post(
        f"{base}/api/chat/send", json=body, headers={**auth(tenant), **headers}, timeout=10
    )


async def enqueued(redis: Redis) -> int:
    """Actions ever added to the AES streams: XLEN would drop as the worker trims consumed
    entries (every 5 s), so a test comparing two lengths could see fewer, not "none added"."""
    added = 0
    for priority in keys.PRIORITIES:
        try:
            info = await redis.xinfo_stream(keys.aes_stream(priority))
        except ResponseError:  # no such stream yet
            continue
        added += int(info["entries-added"])
    return added
