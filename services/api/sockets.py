"""The session socket `WS /ws/{tenant_id}/{session_id}`: auth, resume, and client frames.

A browser cannot set headers on a WebSocket, so the token comes in `Sec-WebSocket-Protocol`
(`["orchestrator.v1", "bearer.<jwt>"]`, answered with `orchestrator.v1` only) or `?token=`.
A cross-site page is refused before the handshake completes (Origin check); every other
refusal completes the handshake and closes with a code and reason the client can act on:
1008 policy (auth, bad ids), 1013 try again later (pod full), 1012 restarting (draining).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import msgspec
from litestar import WebSocket, websocket
from opentelemetry.trace import SpanKind

from services.api import metrics
from services.api.connections import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_RESTART,
    CLOSE_TRY_AGAIN,
    ClientConnection,
)
from services.api.models import SendRequest, TaskRequest
from services.api.runtime import Runtime
from services.api.session_log import read_since
from services.core import events, telemetry
from services.core.auth import Principal
from services.core.errors import BadRequest, OrchestratorError
from services.core.ids import is_valid_id, new_id
from services.core.logs import log_context
from services.core.redis_client import REDIS_DOWN

log = logging.getLogger(__name__)

SUBPROTOCOL = "orchestrator.v1"
BEARER_PREFIX = "bearer."

AnySocket = WebSocket[Any, Any, Any]


class ClientFrame(msgspec.Struct):
    type: str
    data: dict[str, Any] | None = None


_frame_decoder = msgspec.json.Decoder(ClientFrame)


def _offered_token(socket: AnySocket) -> tuple[str | None, bool]:
    """The token and whether the client speaks our subprotocol (so we must select it)."""
    offered: list[str] = list(socket.scope.get("subprotocols") or [])
    token = next((p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)), None)
    if token is None:
        token = socket.query_params.get("token")
    return token, SUBPROTOCOL in offered


def _origin_allowed(runtime: Runtime, origin: str | None) -> bool:
    if origin is None:
        return True
    return origin in runtime.settings.allowed_origins


async def _refuse(socket: AnySocket, speaks_v1: bool, code: int, reason: str) -> None:
    metrics.websocket_refusals.labels(reason.split(":")[0]).inc()
    await socket.accept(subprotocols=SUBPROTOCOL if speaks_v1 else None)
    await socket.close(code=code, reason=reason[:120])


@websocket("/ws/{tenant_id:str}/{session_id:str}")
async def session_socket(socket: AnySocket, tenant_id: str, session_id: str) -> None:
    runtime: Runtime = socket.app.state.runtime
    if not _origin_allowed(runtime, socket.headers.get("origin")):
        metrics.websocket_refusals.labels("origin").inc()
        await socket.close(code=CLOSE_POLICY, reason="origin not allowed")
        return
    token, speaks_v1 = _offered_token(socket)
    if not is_valid_id(tenant_id) or not is_valid_id(session_id):
        await _refuse(socket, speaks_v1, CLOSE_POLICY, "invalid_id: [A-Za-z0-9_-]{1,64}")
        return
    if token is None:
        await _refuse(socket, speaks_v1, CLOSE_POLICY, "unauthorized: no token")
        return
    try:
        principal = runtime.verifier.verify(token)
    except OrchestratorError as exc:
        await _refuse(socket, speaks_v1, CLOSE_POLICY, f"unauthorized: {exc.message}")
        return
    if principal.tenant_id != tenant_id:
        await _refuse(socket, speaks_v1, CLOSE_POLICY, "forbidden: tenant does not match token")
        return
    if runtime.draining:
        await _refuse(socket, speaks_v1, CLOSE_RESTART, "draining: reconnect")
        return
    if runtime.hub.count() >= runtime.settings.max_websocket_connections:
        await _refuse(socket, speaks_v1, CLOSE_TRY_AGAIN, "pod_full: try again later")
        return
    connection_id = new_id()
    try:
        quota = await runtime.admission.quota(tenant_id)
        admitted, _ = await runtime.admission.sockets.acquire(
            tenant_id, connection_id, quota.limits.max_connections
        )
    except OrchestratorError as exc:
        await _refuse(socket, speaks_v1, CLOSE_POLICY, f"{exc.code}: {exc.message}")
        return
    except REDIS_DOWN:
        await _refuse(socket, speaks_v1, CLOSE_TRY_AGAIN, "unavailable: try again later")
        return
    if not admitted:
        await _refuse(
            socket,
            speaks_v1,
            CLOSE_POLICY,
            f"connection_limit: {quota.tier} tier allows {quota.limits.max_connections} sockets",
        )
        return
    last_event_id = socket.query_params.get("last_event_id")
    if last_event_id is not None:
        try:
            events.parse_event_id(last_event_id)
        except ValueError:
            await _refuse(socket, speaks_v1, CLOSE_POLICY, "invalid last_event_id")
            return

    try:
        await socket.accept(subprotocols=SUBPROTOCOL if speaks_v1 else None)
        await _serve(socket, runtime, principal, session_id, last_event_id, connection_id)
    finally:
        with contextlib.suppress(*REDIS_DOWN):
            await runtime.admission.sockets.release(tenant_id, connection_id)


async def _serve(
    socket: AnySocket,
    runtime: Runtime,
    principal: Principal,
    session_id: str,
    last_event_id: str | None,
    connection_id: str,
) -> None:
    send = socket.send

    async def send_text(text: str) -> None:
        await send({"type": "websocket.send", "text": text, "bytes": None})

    async def close(code: int, reason: str) -> None:
        await socket.close(code=code, reason=reason)

    conn = ClientConnection(
        connection_id=connection_id,
        tenant_id=principal.tenant_id,
        session_id=session_id,
        user_id=principal.user_id,
        send=send_text,
        close=close,
        limit=runtime.settings.websocket_send_queue,
    )
    metrics.websocket_connections.inc()
    try:
        with log_context(tenant_id=principal.tenant_id, session_id=session_id):
            await _run_connection(socket, runtime, principal, conn, session_id, last_event_id)
    finally:
        metrics.websocket_connections.dec()
        conn.closed = True
        await runtime.hub.detach(conn)


async def _run_connection(
    socket: AnySocket,
    runtime: Runtime,
    principal: Principal,
    conn: ClientConnection,
    session_id: str,
    last_event_id: str | None,
) -> None:
    try:
        await runtime.hub.attach(conn)
        replay = await read_since(runtime.redis, principal.tenant_id, session_id, last_event_id)
        conn.push(
            events.frame(
                replay.cursor,
                events.CONNECTION_ACK,
                {
                    "connection_id": conn.connection_id,
                    "tenant_id": principal.tenant_id,
                    "session_id": session_id,
                    "resumed": replay.resumed,
                    "last_event_id": replay.cursor,
                },
            )
        )
        sent_up_to = replay.cursor
        for event_id, body in replay.events:
            conn.push(events.frame_with_id(event_id, body))
            sent_up_to = event_id
        conn.go_live(sent_up_to)
        await _receive_frames(socket, runtime, principal, conn)
    except REDIS_DOWN:
        conn.close_soon(CLOSE_TRY_AGAIN, "redis unavailable: try again later")
    except Exception:
        log.exception("socket handler failed")
        conn.close_soon(CLOSE_INTERNAL, "internal error")


async def _receive_frames(
    socket: AnySocket, runtime: Runtime, principal: Principal, conn: ClientConnection
) -> None:
    receive = socket.receive
    max_bytes = runtime.settings.max_frame_bytes
    budget = FrameBudget(runtime.settings.websocket_frames_per_second)
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        metrics.websocket_messages.labels("in").inc()
        if not budget.take():
            if budget.should_warn():
                _error(conn, "frame_rate_exceeded", "too many frames; some were dropped")
            continue
        text = message.get("text")
        if text is None:
            _error(conn, "unsupported_frame", "send JSON text frames")
            continue
        if len(text) > max_bytes:
            _error(conn, "frame_too_large", f"frames are limited to {max_bytes} bytes")
            continue
        try:
            frame = _frame_decoder.decode(text)
        except msgspec.ValidationError as exc:  # a subclass of DecodeError: test it first
            _error(conn, "invalid_frame", str(exc))
            continue
        except msgspec.DecodeError:
            _error(conn, "malformed_json", "frame is not valid JSON")
            continue
        await _handle_frame(runtime, principal, conn, frame)


async def _handle_frame(
    runtime: Runtime, principal: Principal, conn: ClientConnection, frame: ClientFrame
) -> None:
    if frame.type == "ping":
        conn.push(events.frame(conn.last_event_id, events.PONG, {}))
        return
    data = frame.data or {}
    request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
    with telemetry.tracer().start_as_current_span(
        f"WS {frame.type}",
        kind=SpanKind.SERVER,
        attributes={
            "network.protocol.name": "websocket",
            "orchestrator.tenant_id": conn.tenant_id,
            "orchestrator.session_id": conn.session_id,
        },
    ):
        await _handle_request(runtime, principal, conn, frame, data, request_id)


async def _handle_request(
    runtime: Runtime,
    principal: Principal,
    conn: ClientConnection,
    frame: ClientFrame,
    data: dict[str, Any],
    request_id: str | None,
) -> None:
    try:
        if frame.type == "chat.send":
            request = msgspec.convert(data, SendRequest)
            if request.session_id not in (None, conn.session_id):
                raise BadRequest("session_id in the frame differs from the socket's session")
            await runtime.chat.send(
                principal,
                request,
                session_id=conn.session_id,
                agent_id=request.agent_id or runtime.settings.default_agent,
            )
            # Nothing to answer here: the task's events (with `request_id`) reach every
            # socket of the session through its log.
        elif frame.type == "chat.cancel":
            cancel = msgspec.convert(data, TaskRequest)
            await runtime.chat.cancel(principal, cancel.task_id)
        else:
            _error(conn, "unknown_type", f"unknown frame type {frame.type!r}")
    except msgspec.ValidationError as exc:
        _chat_error(conn, "validation_error", str(exc), {}, request_id)
    except OrchestratorError as exc:
        _chat_error(conn, exc.code, exc.message, exc.details, request_id)
    except REDIS_DOWN:
        _chat_error(conn, "unavailable", "redis unavailable, retry", {}, request_id)


class FrameBudget:
    """A token bucket per socket: `rate` frames per second, bursts of twice that.

    A flood is dropped frame by frame (with at most one `error` per second about it), so one
    client cannot keep the event loop busy for everybody else.
    """

    __slots__ = ("_allowance", "_burst", "_last", "_last_warning", "_rate")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._burst = max(1.0, 2 * rate)
        self._allowance = self._burst
        self._last = time.monotonic()
        self._last_warning = 0.0

    def take(self) -> bool:
        now = time.monotonic()
        self._allowance = min(self._burst, self._allowance + (now - self._last) * self._rate)
        self._last = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    def should_warn(self) -> bool:
        now = time.monotonic()
        if now - self._last_warning < 1:
            return False
        self._last_warning = now
        return True


def _error(conn: ClientConnection, code: str, message: str) -> None:
    conn.push(events.frame(conn.last_event_id, events.ERROR, {"code": code, "message": message}))


def _chat_error(
    conn: ClientConnection,
    code: str,
    message: str,
    details: dict[str, Any],
    request_id: str | None,
) -> None:
    data: dict[str, Any] = {"code": code, "message": message, "details": details}
    if request_id is not None:
        data["request_id"] = request_id
    conn.push(events.frame(conn.last_event_id, events.CHAT_ERROR, data))
