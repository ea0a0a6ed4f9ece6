"""Delivery to the sockets this pod holds: one sharded pub/sub subscription per live session.

The worker (or the api itself, for its own events) appends each session event to the session
log and publishes it on the session's channel in one script, so the channel carries events in
log order with their log ids. This pod subscribes to a session's channel while it holds at
least one socket of that session, and fans each frame out to those sockets without decoding
it. Any pod may hold any session: stickiness only improves locality.

Joining is gap-free: the channel subscription is confirmed before the log is read, live events
arriving meanwhile are held by the connection, and held events at or below the last event
sent from the log are dropped (`ClientConnection.go_live`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.api.connections import ClientConnection, traced_frame
from services.api.session_log import read_since
from services.core import keys, telemetry
from services.core.events import ERROR, frame, frame_id, frame_with_id
from services.core.redis_client import REDIS_DOWN

log = logging.getLogger(__name__)

READ_TIMEOUT_SECONDS = 1.0
PING_IDLE_SECONDS = 2.0  # ping the subscription after this long without any message
PONG_TIMEOUT_SECONDS = 3.0  # no answer by then: Redis is unreachable
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 2.0


class SessionHub:
    """Subscriptions and fan-out for every socket on this pod."""

    def __init__(self, redis: Redis, pod_id: str) -> None:
        self._redis = redis
        self._pod_channel = f"{{pod:{pod_id}}}:control"
        self._sessions: dict[str, set[ClientConnection]] = defaultdict(set)
        self._tenants: dict[str, set[ClientConnection]] = defaultdict(set)
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._resync: asyncio.Task[None] | None = None
        self._outage = False
        self.connections: set[ClientConnection] = set()

    async def start(self) -> None:
        self._pubsub = self._redis.pubsub()
        # Always hold one subscription so the reader has a connection to wait on.
        await self._subscribe(self._pod_channel)
        self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    def count(self) -> int:
        return len(self.connections)

    def session_count(self) -> int:
        return len(self._sessions)

    def per_tenant(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for conn in self.connections:
            counts[conn.tenant_id] += 1
        return dict(counts)

    async def attach(self, conn: ClientConnection) -> None:
        """Register a socket; returns once its session's live events are flowing to it."""
        session = keys.session_channel(conn.tenant_id, conn.session_id)
        tenant = keys.tenant_channel(conn.tenant_id)
        self.connections.add(conn)
        async with self._lock:
            for channel, table in ((session, self._sessions), (tenant, self._tenants)):
                first = not table.get(channel)
                table[channel].add(conn)
                if first:
                    await self._subscribe(channel)

    async def detach(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        session = keys.session_channel(conn.tenant_id, conn.session_id)
        tenant = keys.tenant_channel(conn.tenant_id)
        async with self._lock:
            for channel, table in ((session, self._sessions), (tenant, self._tenants)):
                members = table.get(channel)
                if members is None:
                    continue
                members.discard(conn)
                if not members:
                    del table[channel]
                    await self._unsubscribe(channel)

    async def _subscribe(self, channel: str) -> None:
        assert self._pubsub is not None
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = confirmed
        try:
            await self._pubsub.ssubscribe(channel)
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                if self._reader is None:  # during start(), read the confirmation ourselves
                    while not confirmed.done():
                        message = await self._pubsub.get_message(timeout=1.0)
                        if message is not None:
                            self._dispatch(message)
                await confirmed
        except TimeoutError as exc:  # Redis frozen or unreachable: the socket is refused
            raise RedisTimeoutError(f"no confirmation of the subscription to {channel}") from exc
        finally:
            if self._confirmations.get(channel) is confirmed:
                del self._confirmations[channel]

    async def _unsubscribe(self, channel: str) -> None:
        assert self._pubsub is not None
        with contextlib.suppress(*REDIS_DOWN):
            await self._pubsub.sunsubscribe(channel)

    async def _read_forever(self) -> None:
        assert self._pubsub is not None
        pubsub = self._pubsub
        loop = asyncio.get_running_loop()
        delay = RECONNECT_MIN_SECONDS
        heard = loop.time()  # when the subscription last gave any sign of life
        pinged: float | None = None  # when we pinged it, while waiting for the answer
        while True:
            try:
                message = await pubsub.get_message(timeout=READ_TIMEOUT_SECONDS)
                now = loop.time()
                if message is not None:
                    heard, pinged = now, None
                elif pinged is not None and now - pinged > PONG_TIMEOUT_SECONDS:
                    # A frozen or unreachable Redis keeps the connection open and says
                    # nothing; without this the sockets would wait in silence for ever.
                    raise RedisTimeoutError("no answer to a ping on the subscription")
                elif pinged is None and now - heard > PING_IDLE_SECONDS:
                    await pubsub.ping()
                    pinged = now
            except REDIS_DOWN:
                if not self._outage:
                    self._begin_outage()
                await self._reconnect_later(pubsub)
                heard, pinged = loop.time(), None
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX_SECONDS, delay * 2)
                continue
            if self._outage:  # reconnected and resubscribed by redis-py
                delay = RECONNECT_MIN_SECONDS
                self._outage = False
                self._resync = loop.create_task(self._catch_up())
            if message is not None:
                self._dispatch(message)

    @staticmethod
    async def _reconnect_later(pubsub: PubSub) -> None:
        """Drop the subscription's connection: the next read reconnects and resubscribes."""
        connection = pubsub.connection
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.disconnect()

    def _begin_outage(self) -> None:
        """Hold live events and tell every socket; nothing is lost, only delayed."""
        log.warning("delivery subscription lost; reconnecting")
        self._outage = True
        notice = {"code": "unavailable", "message": "delivery interrupted, resuming"}
        for conn in list(self.connections):
            conn.hold()
            conn.push(frame(conn.last_event_id, ERROR, notice))

    async def _catch_up(self) -> None:
        """After a reconnect, re-read each session's log from each socket's last event."""
        log.info("delivery subscription restored; catching up %d sockets", len(self.connections))
        for conn in list(self.connections):
            try:
                replay = await read_since(
                    self._redis, conn.tenant_id, conn.session_id, conn.last_event_id
                )
            except REDIS_DOWN:
                return  # the reader sees the outage again and will catch up once more
            sent_up_to = conn.last_event_id
            if replay.resumed is False:
                gap = {"code": "resume_gap", "message": "events were lost; fetch the task state"}
                conn.push(frame(replay.cursor, ERROR, gap))
                sent_up_to = replay.cursor
            for event_id, body in replay.events:
                conn.push(frame_with_id(event_id, body))
                sent_up_to = event_id
            conn.go_live(sent_up_to)

    def _deliver_traced(
        self, channel: str, members: set[ClientConnection], parent: str, text: str
    ) -> None:
        """Continue the message's trace on the delivery hop: a CONSUMER span for the channel
        and, per socket, a `websocket send` span that ends when the frame is written."""
        event_id = frame_id(text)
        with telemetry.consumer(
            channel, {"traceparent": parent}, message_id=event_id, sockets=len(members)
        ):
            for conn in members:
                span = telemetry.tracer().start_span(
                    "websocket send",
                    attributes={"network.protocol.name": "websocket", "event.id": event_id},
                )
                conn.deliver(event_id, traced_frame(text, span))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = message["channel"]
        if isinstance(channel, bytes):
            channel = channel.decode()
        if kind == "smessage":
            data = message["data"]
            text = data.decode() if isinstance(data, bytes) else data
            members = self._sessions.get(channel)
            if members:
                if text[0] != "{":  # "<traceparent>\n<frame>": a traced event, see tasks.py
                    self._deliver_traced(channel, members, *text.split("\n", 1))
                    return
                event_id = frame_id(text)
                for conn in members:
                    conn.deliver(event_id, text)
                return
            members = self._tenants.get(channel)
            if members:  # a tenant broadcast: not logged, so it carries each socket's cursor
                for conn in members:
                    conn.push(frame_with_id(conn.last_event_id, text))
        elif kind == "ssubscribe":
            confirmed = self._confirmations.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
