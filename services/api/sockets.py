"""The session socket `WS /ws/{tenant_id}/{session_id}`: auth, resume, and client frames.

Served by a plain ASGI handler placed in front of Litestar (`services.api.app.Api`): an idle
socket holds only uvicorn's protocol, one coroutine of ours waiting on `receive` and its
`ClientConnection`, with no framework objects (request, headers, middleware frames) per socket.

A browser cannot set headers on a WebSocket, so the token comes in `Sec-WebSocket-Protocol`
(`["orchestrator.v1", "bearer.<jwt>"]`, answered with `orchestrator.v1` only) or `?token=`.
A cross-site page is refused before the handshake completes (Origin check); every other
refusal completes the handshake and closes with a code and reason the client can act on:
1008 policy (auth, bad ids), 1013 try again later (pod full), 1012 restarting (draining).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

import msgspec
from litestar.config.cors import CORSConfig
from opentelemetry.trace import SpanKind

from services.api import metrics
from services.api.connections import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_RESTART,
    CLOSE_TRY_AGAIN,
    ClientConnection,
    Message,
    Send,
)
from services.api.models import SendRequest, SocketCancel
from services.api.runtime import Runtime
from services.api.session_log import REPLAY_PAGE, RESUME_GAP, join_point, read_page, read_since
from services.core import events, telemetry
from services.core.auth import Principal
from services.core.errors import BadRequest, OrchestratorError, Unauthorized, Unavailable
from services.core.ids import is_valid_id, new_id
from services.core.logs import log_context
from services.core.lone_surrogates import decode_repaired, is_surrogate_error
from services.core.redis_client import REDIS_DOWN, REDIS_REFUSING, REFUSING_WORDS

log = logging.getLogger(__name__)

SUBPROTOCOL = "orchestrator.v1"
BEARER_PREFIX = "bearer."
PATH_PREFIX = "/ws/"
CLIENT_ACTIONS = frozenset({"chat.send", "chat.cancel"})  # frame types that act (a span each)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

_RECEIVED = metrics.websocket_messages.labels("in")


class ClientFrame(msgspec.Struct):
    type: str
    data: dict[str, Any] | None = None


_frame_decoder = msgspec.json.Decoder(ClientFrame)


class _DroppedData(msgspec.Struct):
    request_id: str | None = None


class _DroppedFrame(msgspec.Struct):
    """What a frame dropped over the frame budget is read for: which request to refuse.
    msgspec skips every other field without building it."""

    type: str = ""
    data: _DroppedData | None = None


_dropped_decoder = msgspec.json.Decoder(_DroppedFrame)


def socket_ids(path: str) -> tuple[str, str] | None:
    """`(tenant_id, session_id)` of a `/ws/{tenant_id}/{session_id}` path, else None."""
    if not path.startswith(PATH_PREFIX):
        return None
    rest = path[len(PATH_PREFIX) :].removesuffix("/")
    tenant_id, slash, session_id = rest.partition("/")
    if not slash or "/" in session_id:
        return None
    return tenant_id, session_id


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name.lower() == wanted:
            text: str = value.decode("latin-1")
            return text
    return None


def _query(scope: Scope, wanted: str) -> str | None:
    """The first value of a query parameter (parsed only when asked for: rarely)."""
    query: bytes = scope.get("query_string") or b""
    if not query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name == wanted:
            return value
    return None


def _offered_token(scope: Scope) -> tuple[str | None, bool]:
    """The token and whether the client speaks our subprotocol (so we must select it)."""
    offered: list[str] = list(scope.get("subprotocols") or [])
    token = next((p[len(BEARER_PREFIX) :] for p in offered if p.startswith(BEARER_PREFIX)), None)
    if token is None:
        token = _query(scope, "token")
    return token, SUBPROTOCOL in offered


@functools.lru_cache(maxsize=4)
def _cors_rule(allowed: tuple[str, ...]) -> CORSConfig:
    return CORSConfig(allow_origins=list(allowed))


def _origin_allowed(runtime: Runtime, origin: str | None) -> bool:
    """Decided by the rule the CORS layer applies to REST (Litestar's CORSConfig): `*` admits
    any origin, and a `*` inside an entry (`https://*.example.com`) any text there."""
    if origin is None:
        return True
    allowed = runtime.settings.allowed_origins
    return bool(allowed) and _cors_rule(tuple(allowed)).is_origin_allowed(origin)


async def _refuse(send: Send, speaks_v1: bool, code: int, reason: str) -> None:
    metrics.websocket_refusals.labels(reason.split(":")[0]).inc()
    await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL if speaks_v1 else None})
    await send({"type": "websocket.close", "code": code, "reason": reason[:120]})


class Admitted(NamedTuple):
    """A handshake that passed every check, its socket counted against the tenant's quota."""

    principal: Principal
    connection_id: str
    speaks_v1: bool
    # Where the socket starts: the client's `last_event_id`, or for a new socket where the
    # session's log stood before the handshake completed (`joined_at`).
    last_event_id: str | None
    joined_at: str | None


async def _admit(
    runtime: Runtime, scope: Scope, send: Send, tenant_id: str, session_id: str
) -> Admitted | None:
    """Every check before the handshake completes, or None (refused)."""
    if not _origin_allowed(runtime, _header(scope, b"origin")):
        metrics.websocket_refusals.labels("origin").inc()
        await send(
            {"type": "websocket.close", "code": CLOSE_POLICY, "reason": "origin not allowed"}
        )
        return None
    token, speaks_v1 = _offered_token(scope)
    if not is_valid_id(tenant_id) or not is_valid_id(session_id):
        await _refuse(send, speaks_v1, CLOSE_POLICY, "invalid_id: [A-Za-z0-9_-]{1,64}")
        return None
    if token is None:
        await _refuse(send, speaks_v1, CLOSE_POLICY, "unauthorized: no token")
        return None
    try:
        principal = runtime.verifier.verify(token)
    except Unavailable as exc:  # its key may be read in a moment: a retry, not a sign-in
        await _refuse(send, speaks_v1, CLOSE_TRY_AGAIN, f"unavailable: {exc.message}")
        return None
    except OrchestratorError as exc:
        await _refuse(send, speaks_v1, CLOSE_POLICY, f"unauthorized: {exc.message}")
        return None
    if principal.tenant_id != tenant_id:
        await _refuse(send, speaks_v1, CLOSE_POLICY, "forbidden: tenant does not match token")
        return None
    if runtime.draining:
        await _refuse(send, speaks_v1, CLOSE_RESTART, "draining: reconnect")
        return None
    if runtime.hub.count() + runtime.admitting >= runtime.settings.max_websocket_connections:
        await _refuse(send, speaks_v1, CLOSE_TRY_AGAIN, "pod_full: try again later")
        return None
    runtime.admitting += 1  # given back by the caller once attached (or by a refusal below)
    try:
        admitted = await _admit_tenant(
            runtime, scope, send, speaks_v1, tenant_id, session_id, principal
        )
    except BaseException:
        runtime.admitting -= 1
        raise
    if admitted is None:
        runtime.admitting -= 1
    elif runtime.draining:
        runtime.admitting -= 1
        await _refuse_drained(runtime, send, tenant_id, admitted.connection_id, speaks_v1)
        return None
    return admitted


async def _refuse_drained(
    runtime: Runtime, send: Send, tenant_id: str, connection_id: str, speaks_v1: bool
) -> None:
    """Refuse a handshake the drain started under (it waited on Redis past the first check).

    Accepted, it would attach after the drain's look at the pod's sockets and stay open on a
    pod about to stop. Nothing awaits between this check and the accept, so no socket slips
    through after it. Its tenant socket reservation is given back as the handler's would be.
    """
    try:
        await _refuse(send, speaks_v1, CLOSE_RESTART, "draining: reconnect")
    finally:
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):  # it expires by itself
            await runtime.admission.sockets.release(tenant_id, connection_id)


async def _admit_tenant(
    runtime: Runtime,
    scope: Scope,
    send: Send,
    speaks_v1: bool,
    tenant_id: str,
    session_id: str,
    principal: Principal,
) -> Admitted | None:
    """The rest of the handshake, holding a slot of the pod: the resume id, the tenant's
    socket limit, and a new socket's place in the session's log."""
    last_event_id = _query(scope, "last_event_id")
    if last_event_id is not None:
        try:
            events.parse_event_id(last_event_id)
        except ValueError:
            await _refuse(send, speaks_v1, CLOSE_POLICY, "invalid last_event_id")
            return None
    connection_id = new_id()
    try:
        quota = await runtime.admission.quota(tenant_id)
        admitted, joined_at = await _take_slot_and_join(
            runtime, tenant_id, session_id, connection_id, quota.limits.max_connections,
            fresh=last_event_id is None,
        )  # fmt: skip
    except OrchestratorError as exc:  # a 503 (an unreadable quota record) is ours: try again
        close = CLOSE_TRY_AGAIN if exc.status == 503 else CLOSE_POLICY
        await _refuse(send, speaks_v1, close, f"{exc.code}: {exc.message}")
        return None
    except (*REDIS_DOWN, *REDIS_REFUSING):  # refusing: out of memory, a demoted primary
        await _refuse(send, speaks_v1, CLOSE_TRY_AGAIN, "unavailable: try again later")
        return None
    if not admitted:
        await _refuse(
            send,
            speaks_v1,
            CLOSE_POLICY,
            f"connection_limit: {quota.tier} tier allows {quota.limits.max_connections} sockets",
        )
        return None
    return Admitted(principal, connection_id, speaks_v1, last_event_id, joined_at)


async def _take_slot_and_join(
    runtime: Runtime,
    tenant_id: str,
    session_id: str,
    connection_id: str,
    limit: int,
    *,
    fresh: bool,
) -> tuple[bool, str | None]:
    """The tenant's socket slot (admitted or not) and, for an admitted new socket, where the
    session's log stands (`joined_at`, `session_log.join_point`: one small script).

    The join point is taken before the handshake completes: a page that sends its message as
    soon as the socket opens gets its answer, even when the send and the answer are in the
    log before the socket is subscribed (a new socket starting at its subscription missed both
    on a busy machine, and waited for ever). A slot taken while the join read failed is given
    back before the failure is raised."""
    admitted, _ = await runtime.admission.sockets.acquire(tenant_id, connection_id, limit)
    if not admitted or not fresh:
        return admitted, None
    try:
        return True, await join_point(runtime.redis, tenant_id, session_id)
    except (*REDIS_DOWN, *REDIS_REFUSING):
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):  # it expires by itself
            await runtime.admission.sockets.release(tenant_id, connection_id)
        raise


async def session_socket(
    runtime: Runtime,
    scope: Scope,
    receive: Receive,
    send: Send,
    tenant_id: str,
    session_id: str,
) -> None:
    """The ASGI handler of one session socket, from the handshake to the end.

    One coroutine for the socket's whole life (set-up and frame handling are awaited from it
    and return), so an idle socket costs one frame of ours.
    """
    if (await receive())["type"] != "websocket.connect":
        return
    admitted = await _admit(runtime, scope, send, tenant_id, session_id)
    if admitted is None:
        return
    principal, connection_id, speaks_v1, last_event_id, joined_at = admitted
    del admitted
    reserved = True  # a slot of the pod (`Runtime.admitting`) until the hub counts the socket
    try:
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL if speaks_v1 else None})
        conn = ClientConnection(
            connection_id=connection_id,
            tenant_id=principal.tenant_id,
            session_id=session_id,
            user_id=principal.user_id,
            send=send,
            limit=runtime.settings.websocket_send_queue,
            char_limit=runtime.settings.websocket_send_queue_chars,
        )
        metrics.websocket_connections.inc()
        try:
            runtime.admitting -= 1  # `_set_up` attaches before it awaits anything
            reserved = False
            await _set_up(runtime, conn, last_event_id, joined_at)
            budget: FrameBudget | None = None  # made at the first frame: idle sockets send none
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    break
                _RECEIVED.inc()
                if budget is None:
                    budget = FrameBudget(runtime.settings.websocket_frames_per_second)
                if not budget.take():
                    _drop(conn, budget, message.get("text"), runtime.settings.max_frame_bytes)
                    continue
                text = message.get("text")
                if text is None:
                    _error(conn, "unsupported_frame", "send JSON text frames")
                    continue
                max_bytes = runtime.settings.max_frame_bytes
                # A character is up to 4 bytes: count bytes unless the frame is ASCII.
                if len(text) > max_bytes or (not text.isascii() and len(text.encode()) > max_bytes):
                    _error(conn, "frame_too_large", f"frames are limited to {max_bytes} bytes")
                    continue
                try:
                    frame = _decode_frame(text)
                except msgspec.ValidationError as exc:  # a DecodeError subclass: test it first
                    _error(conn, "invalid_frame", str(exc))
                    continue
                except (msgspec.DecodeError, RecursionError):  # nested deeper than the stack
                    _error(conn, "malformed_json", "frame is not valid JSON")
                    continue
                await _handle_frame(runtime, principal, conn, frame)
        except REDIS_DOWN:
            conn.close_soon(CLOSE_TRY_AGAIN, "redis unavailable: try again later")
        except Exception:
            with log_context(tenant_id=principal.tenant_id, session_id=session_id):
                log.exception("socket handler failed")
            conn.close_soon(CLOSE_INTERNAL, "internal error")
        finally:
            metrics.websocket_connections.dec()
            conn.closed = True
            await runtime.hub.detach(conn)
            await conn.closing()  # a close we started goes out before the handler returns
    finally:
        if reserved:  # the accept failed: the socket never reached the hub
            runtime.admitting -= 1
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):  # it expires by itself
            await runtime.admission.sockets.release(tenant_id, connection_id)


async def _set_up(
    runtime: Runtime,
    conn: ClientConnection,
    last_event_id: str | None,
    joined_at: str | None = None,
) -> None:
    """Subscribe, then send the ack and the events since `last_event_id` (a new socket: since
    `joined_at`, what reached the log while it was being set up), then go live."""
    await runtime.hub.attach(conn)
    start = last_event_id if last_event_id is not None else joined_at
    replay = await read_since(
        runtime.redis,
        conn.tenant_id,
        conn.session_id,
        start,
        # A new socket is given whatever came after its join, even if the log went meanwhile.
        partial=last_event_id is None,
        log_ttl_ms=runtime.settings.session_log_ttl_seconds * 1000,
        page=REPLAY_PAGE,
    )
    # The ack goes out before the replayed events, so its id is where the client stands
    # before them: a client keeping `lastId = frame.id` whose socket drops between the ack
    # and the replay resumes from there, not past events it never received.
    before = start if replay.events and start is not None else replay.cursor
    conn.push(
        events.frame(
            before,
            events.CONNECTION_ACK,
            {
                "connection_id": conn.connection_id,
                "tenant_id": conn.tenant_id,
                "session_id": conn.session_id,
                "resumed": replay.resumed if last_event_id is not None else None,
                "last_event_id": before,
            },
        )
    )
    sent_up_to = replay.cursor
    for event_id, body in replay.events:
        conn.push(events.frame_with_id(event_id, body))
        sent_up_to = event_id
    more = replay.more
    while more and not conn.closed:
        page = await read_page(runtime.redis, conn.tenant_id, conn.session_id, sent_up_to)
        if page.gap:
            conn.push(events.frame(sent_up_to, events.ERROR, RESUME_GAP))
        for event_id, body in page.events:
            conn.push(events.frame_with_id(event_id, body))
            sent_up_to = event_id
        more = page.more
    runtime.hub.go_live(conn, sent_up_to)


async def _handle_frame(
    runtime: Runtime, principal: Principal, conn: ClientConnection, frame: ClientFrame
) -> None:
    if frame.type == "ping":
        conn.push(events.frame(conn.last_event_id, events.PONG, {}))
        return
    data = frame.data or {}
    request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else None
    with (
        log_context(tenant_id=conn.tenant_id, session_id=conn.session_id),
        telemetry.tracer().start_as_current_span(
            # A client chooses `type`: a span name must stay of a few known values (OTel),
            # not whatever text (up to MAX_FRAME_BYTES) a frame carries.
            f"WS {frame.type}" if frame.type in CLIENT_ACTIONS else "WS unknown",
            kind=SpanKind.SERVER,
            attributes={
                "network.protocol.name": "websocket",
                "orchestrator.tenant_id": conn.tenant_id,
                "orchestrator.session_id": conn.session_id,
            },
        ),
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
        if frame.type in CLIENT_ACTIONS and principal.expired():
            # The socket keeps delivering what it subscribed to; acting needs a valid token.
            raise Unauthorized("token expired: reconnect with a fresh token to send or cancel")
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
            cancel = msgspec.convert(data, SocketCancel)
            await runtime.chat.cancel(principal, cancel.task_id, session_id=conn.session_id)
        else:
            shown = frame.type if len(frame.type) <= 64 else frame.type[:64] + "..."
            _error(conn, "unknown_type", f"unknown frame type {shown!r}")
    except msgspec.ValidationError as exc:
        _chat_error(conn, "validation_error", str(exc), {}, request_id)
    except RecursionError:  # decoded near the stack's end, too deep to encode again
        _chat_error(conn, "malformed_json", "frame is nested too deeply", {}, request_id)
    except OrchestratorError as exc:
        _chat_error(conn, exc.code, exc.message, exc.details, request_id)
    except REDIS_DOWN:
        _chat_error(conn, "unavailable", "redis unavailable, retry", {}, request_id)
    except REDIS_REFUSING:
        _chat_error(conn, "unavailable", REFUSING_WORDS, {}, request_id)


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

    def retry_in_ms(self) -> int:
        """When the next frame will be taken (the allowance back at one)."""
        return max(1, math.ceil((1 - self._allowance) / self._rate * 1000))

    def should_warn(self) -> bool:
        now = time.monotonic()
        if now - self._last_warning < 1:
            return False
        self._last_warning = now
        return True


def _decode_frame(text: str) -> ClientFrame:
    """The frame; one whose strings hold a lone UTF-16 surrogate (a message cut through an
    emoji) is read with each made U+FFFD, as the REST body is (services/api/json_request.py)."""
    try:
        return _frame_decoder.decode(text)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as refused:
        if not is_surrogate_error(refused):
            raise
        try:
            value = decode_repaired(text)
        except ValueError:
            raise refused from None
        return msgspec.convert(value, ClientFrame)


def _drop(conn: ClientConnection, budget: FrameBudget, text: str | None, max_bytes: int) -> None:
    """A frame over the budget is not acted on. A `chat.send` or `chat.cancel` is refused by
    its `request_id` (`chat.error` `rate_limited`, `details.scope` `frames`), as any other
    refused request: a client flushing its queue or a user pasting several messages learnt
    only that "some" frames were dropped, not which. Anything else gets the `error` event at
    most once a second."""
    dropped = None
    if text is not None and len(text) <= max_bytes:  # a larger one is refused unread anyway
        with contextlib.suppress(msgspec.DecodeError, RecursionError):
            dropped = _dropped_decoder.decode(text)
    if dropped is not None and dropped.type in CLIENT_ACTIONS:
        retry_in_ms = budget.retry_in_ms()
        _chat_error(
            conn,
            "rate_limited",
            f"too many frames: this {dropped.type} was dropped; send it again in {retry_in_ms} ms",
            {"scope": "frames", "retry_in_ms": retry_in_ms},
            dropped.data.request_id if dropped.data else None,
        )
    elif budget.should_warn():
        _error(conn, "frame_rate_exceeded", "too many frames; some were dropped")


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
