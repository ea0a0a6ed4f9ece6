"""A delivery subscription lost while a socket is being set up (real Redis, the real set-up).

The socket must get its `connection.ack` first, be told of the interruption after it, and
receive every event of its session once, in order: those in its replay, those published
while the subscription was down (in the log only), and live ones after the reconnect.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from services.api import delivery, sockets
from services.api.connections import ClientConnection
from services.api.delivery import SessionHub
from services.api.runtime import Runtime
from services.api.session_log import REPLAY_PAGE, Page, Replay, read_page, read_since
from services.core import events, keys
from services.core.settings import load_settings

TENANT, SESSION = "acme", "s1"
CHANNEL = keys.session_channel(TENANT, SESSION)


class Socket:
    """The socket's ASGI side: the frames it was sent, in order."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.send":
                self.frames.append(json.loads(message["text"].split("\n", 1)[-1]))
                self.arrived.set()

        self.conn = ClientConnection(
            connection_id="c1",
            tenant_id=TENANT,
            session_id=SESSION,
            user_id="u",
            send=send,
            limit=100,
        )

    def messages(self) -> list[int]:
        return [f["data"]["n"] for f in self.frames if f["type"] == events.MESSAGE]

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not done():
                self.arrived.clear()
                await self.arrived.wait()


async def append(redis: Redis, n: int, *, publish: bool) -> None:
    """Event `n` in the session's log; published too unless it is one the channel missed."""
    body = events.event_body(events.MESSAGE, {"n": n})
    event_id = await redis.xadd(keys.session_log(TENANT, SESSION), {"e": body})
    if publish:
        await redis.spublish(CHANNEL, '{"id":"' + event_id.decode() + '",' + body)


class SubscriptionLostAfterAttach(SessionHub):
    """Kills the hub's pub/sub connection once a socket's subscription is confirmed, and
    returns when the hub has noticed (the outage begins during the socket's set-up)."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis, "outage-test")
        self.redis = redis

    async def attach(self, conn: ClientConnection) -> None:
        await super().attach(conn)
        await self.redis.client_kill_filter(_type="pubsub")
        async with asyncio.timeout(5):
            while not self._outage:  # the hub signals the end of an outage, not its start
                await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    "outage_ends_during_set_up", [False, True], ids=["ends-after", "ends-during"]
)
async def test_a_socket_set_up_during_an_outage_gets_its_ack_first_and_every_event_once(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, outage_ends_during_set_up: bool
) -> None:
    hub = SubscriptionLostAfterAttach(redis)
    await hub.start()

    async def replay_then_miss_one(*args: Any, **kwargs: Any) -> Replay:
        """The set-up's log read; event 2 is then published while the subscription is
        down, so neither the replay nor the channel carries it."""
        replay = await read_since(*args, **kwargs)
        assert hub._outage
        await append(redis, 2, publish=True)
        if outage_ends_during_set_up:  # the hub's own catch-up runs before the set-up ends
            await hub._until_live(CHANNEL)
        return replay

    monkeypatch.setattr(sockets, "read_since", replay_then_miss_one)
    socket = Socket()
    try:
        await append(redis, 1, publish=True)
        runtime = cast(Runtime, SimpleNamespace(hub=hub, redis=redis, settings=load_settings()))
        await sockets._set_up(runtime, socket.conn, events.NO_EVENT_ID)  # resume: all of it
        await hub._until_live(CHANNEL)
        await append(redis, 3, publish=True)  # live, after the reconnect
        await socket.until(lambda: 3 in socket.messages())

        assert socket.frames[0]["type"] == events.CONNECTION_ACK
        assert socket.messages() == [1, 2, 3]
        notices = [f["data"]["code"] for f in socket.frames if f["type"] == events.ERROR]
        assert notices == ["unavailable"]
        ids = [f["id"] for f in socket.frames if f["type"] == events.MESSAGE]
        assert ids == sorted(ids, key=events.parse_event_id)
        assert socket.conn.last_event_id == ids[-1]
    finally:
        await hub.stop()


class LogGrewDuringTheOutage(SessionHub):
    """`missed` events reach the session's log but not its channel (down) just before the
    hub's catch-up reads the log."""

    def __init__(self, redis: Redis, missed: int) -> None:
        super().__init__(redis, "outage-test")
        self.redis, self.missed = redis, missed

    async def _catch_up(self) -> None:
        if self._stalled:
            log = keys.session_log(TENANT, SESSION)
            async with self.redis.pipeline(transaction=False) as pipe:
                for n in range(1, self.missed + 1):
                    pipe.xadd(log, {"e": events.event_body(events.MESSAGE, {"n": n})})
                await pipe.execute()
        await super()._catch_up()


async def test_a_catch_up_reads_a_long_log_a_page_at_a_time(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live socket misses more than two pages of events while the subscription is down:
    the catch-up read them all at once (`SESSION_LOG_MAXLEN` allows millions, held in the
    api's memory and its event loop), as a resume no longer does. Every one arrives once, in
    order, then the live ones."""
    missed = 2 * REPLAY_PAGE + 500
    hub = LogGrewDuringTheOutage(redis, missed)
    read_sizes: list[int] = []
    real_since = delivery.read_since

    async def since(*args: Any, **kwargs: Any) -> Replay:
        replay = await real_since(*args, **kwargs)
        read_sizes.append(len(replay.events))
        return replay

    async def page(*args: Any, **kwargs: Any) -> Page:
        read = await read_page(*args, **kwargs)
        read_sizes.append(len(read.events))
        return read

    monkeypatch.setattr(delivery, "read_since", since)
    monkeypatch.setattr(delivery, "read_page", page, raising=False)
    await hub.start()
    socket = Socket()
    try:
        runtime = cast(Runtime, SimpleNamespace(hub=hub, redis=redis, settings=load_settings()))
        await sockets._set_up(runtime, socket.conn, None)  # a fresh join, live at once
        await redis.client_kill_filter(_type="pubsub")
        await socket.until(lambda: missed in socket.messages())
        await hub._until_live(CHANNEL)
        await append(redis, missed + 1, publish=True)
        await socket.until(lambda: missed + 1 in socket.messages())
    finally:
        await hub.stop()
    assert socket.messages() == list(range(1, missed + 2))
    notices = [f["data"]["code"] for f in socket.frames if f["type"] == events.ERROR]
    assert notices == ["unavailable"]
    assert sum(read_sizes) == missed, read_sizes
    assert max(read_sizes) <= REPLAY_PAGE, read_sizes
