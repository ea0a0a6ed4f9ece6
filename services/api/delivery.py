"""Delivery to the sockets this pod holds: one sharded pub/sub subscription per live session.

The worker (or the api itself, for its own events) appends each session event to the session
log and publishes it on the session's channel in one script, so the channel carries events in
log order with their log ids. This pod subscribes to a session's channel while it holds at
least one socket of that session, and fans each frame out to those sockets without decoding
it. Any pod may hold any session: stickiness only improves locality.

Joining is gap-free: the channel subscription is confirmed before the log is read, live events
arriving meanwhile are held by the connection, and held events at or below the last event
sent from the log are dropped (`ClientConnection.go_live`). A socket whose subscription is
lost while it is being set up is not told before its `connection.ack` and is not released by
its set-up: it stays held and is caught up from where its replay ended (`SessionHub.go_live`).

Subscriptions travel on lanes: one pub/sub connection to a single server (or to the primary
behind Sentinel), and on Redis Cluster one per node, since a sharded channel is served only by
the node of its slot. When a lane fails, the sockets whose sessions live on it are held and
told; on a single server the connection is re-established and redis-py resubscribes it; on a
cluster the lane is dropped and its channels are subscribed again wherever the refreshed slot
map puts them (the same node once it is back, or the replica promoted in its place). Either
way the held sockets are then caught up from their session logs, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.api.connections import CLOSE_INTERNAL, ClientConnection, traced_frame
from services.api.session_log import (
    DEFAULT_LOG_TTL_MS,
    REPLAY_PAGE,
    RESUME_GAP,
    read_page,
    read_since,
)
from services.core import keys, telemetry
from services.core.delivery_lag import LagClock
from services.core.events import ERROR, frame, frame_id, frame_with_id
from services.core.redis_client import (
    REDIS_DOWN,
    REDIS_REFUSING,
    ClusterClient,
    as_cluster_outage,
)
from services.core.task_stop import cancel_and_wait

log = logging.getLogger(__name__)
_LAG = LagClock("api")  # live events only: a replay from the log is not a delivery's lag

WATCH_INTERVAL_SECONDS = 0.5  # how often a lane's watchdog looks at it
PING_IDLE_SECONDS = 2.0  # ping the subscription after this long without any message
PONG_TIMEOUT_SECONDS = 3.0  # no answer by then: Redis is unreachable
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
RECONNECT_MIN_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 2.0
_INTERRUPTED = {"code": "unavailable", "message": "delivery interrupted, resuming"}


class _Lane:
    """One pub/sub connection: the only one on a single server, one per node on a cluster."""

    def __init__(self, name: str, pubsub: PubSub, client: Redis | None = None) -> None:
        self.name = name
        self.pubsub = pubsub
        self.client = client  # the lane's own client on its node (cluster), closed with it
        self.channels: set[str] = set()
        self.reader: asyncio.Task[None] | None = None
        self.heard = 0.0  # loop time of the last sign of life (any message)
        self.pinged: float | None = None  # when the watchdog pinged, until the answer

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()


def _resubscribed_after_a_drop(message: dict[str, Any], lane: _Lane) -> bool:
    """A subscription confirmation counting 1 on a lane that already has live channels: the
    first confirmation of a new connection, which redis-py made and subscribed by itself.
    (On a live connection the count is the connection's subscriptions so far: 1 only for a
    lane's first channel. The expected confirmations are consumed by the same count.)"""
    return message["type"] == "ssubscribe" and message["data"] == 1 and bool(lane.channels)


def _tracked(pubsub: PubSub, channel: str) -> Any:
    """The key redis-py keeps a shard channel under (bytes, unless the client decodes)."""
    return pubsub.encoder.decode(pubsub.encoder.encode(channel))


async def _send_as_is(pubsub: PubSub, *command: str) -> None:
    """Send a (un)subscription on a lane's connection as it is, never reconnecting it here.

    redis-py reconnects a pub/sub connection from whichever coroutine finds it broken. The
    lane's reader does; a (un)subscription from a socket's handler did too, at the same
    moment: two coroutines read the new connection's handshake at once (RuntimeError: read()
    called while another coroutine is already waiting), and the reader that hit it died."""
    connection = pubsub.connection
    if connection is None or not connection.is_connected:
        raise RedisConnectionError("the subscription connection is being remade")
    await connection.send_command(*command, check_health=False)


async def _forget(pubsub: PubSub, channel: str) -> None:
    """Stop `channel`'s subscription for good: out of redis-py's list first (its reconnect
    subscribes every channel in it again, and an unsubscription lost to a dropped connection
    left the channel subscribed for the life of the pod), then unsubscribed if the connection
    is up (a connection being remade comes back without it)."""
    pubsub.shard_channels.pop(_tracked(pubsub, channel), None)
    try:
        await _send_as_is(pubsub, "SUNSUBSCRIBE", channel)
    except Exception as exc:  # the next connection has no such subscription
        log.debug("unsubscribing %s: %r", channel, exc)


class SessionHub:
    """Subscriptions and fan-out for every socket on this pod."""

    def __init__(self, redis: Redis, pod_id: str, *, log_ttl_ms: int = DEFAULT_LOG_TTL_MS) -> None:
        self._redis = redis
        self._log_ttl_ms = log_ttl_ms  # the session logs' ttl, for the catch-up's resumes
        self._cluster = redis if isinstance(redis, ClusterClient) else None
        self._pod_channel = f"{{pod:{pod_id}}}:control"
        self._sessions: dict[str, set[ClientConnection]] = defaultdict(set)
        self._tenants: dict[str, set[ClientConnection]] = defaultdict(set)
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._lanes: dict[str, _Lane] = {}
        self._lane_of: dict[str, _Lane] = {}  # subscribed channel -> its lane
        self._homeless: set[str] = set()  # cluster: channels of a lost lane, to subscribe again
        self._changed = asyncio.Event()  # pulsed when a channel's subscription is restored
        self._closing: set[asyncio.Task[None]] = set()
        self._resync: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None  # the pod channel, Redis away at start
        self._outage = False
        self._stalled: set[ClientConnection] = set()  # held since an outage, to catch up
        self._setting_up: set[ClientConnection] = set()  # attached, not yet given their replay
        self.connections: set[ClientConnection] = set()

    async def start(self) -> None:
        """Hold one subscription so a reader has a connection to wait on. Redis away at start
        does not stop the api (it would crash-loop until Redis is back): it starts not ready,
        sockets are refused with 1013 until they can subscribe, and this subscription is made
        in the background once Redis answers."""
        try:
            await self._subscribe(self._pod_channel)
        except REDIS_DOWN as exc:
            log.warning("delivery: redis unavailable at start (%r); subscribing later", exc)
            self._starting = asyncio.get_running_loop().create_task(self._subscribe_later())

    async def _subscribe_later(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        while True:
            await asyncio.sleep(delay)
            try:
                async with self._lock:
                    await self._subscribe(self._pod_channel)
            except REDIS_DOWN:
                delay = min(RECONNECT_MAX_SECONDS, delay * 2)
                continue
            log.info("delivery: subscribed after redis came back")
            return

    async def stop(self) -> None:
        tasks = [lane.reader for lane in self._lanes.values() if lane.reader is not None]
        tasks += [task for task in (self._resync, self._starting) if task is not None]
        await cancel_and_wait(*tasks)
        for lane in list(self._lanes.values()):
            await lane.close()
        self._lanes.clear()
        if self._closing:
            await asyncio.wait(self._closing)

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
        self._setting_up.add(conn)
        async with self._lock:
            for channel, table in ((session, self._sessions), (tenant, self._tenants)):
                table[channel].add(conn)
                if channel not in self._lane_of and channel not in self._homeless:
                    await self._subscribe(channel)
        await self._until_live(session)

    def go_live(self, conn: ClientConnection, sent_up_to: str) -> None:
        """End a socket's set-up (its ack and replay are queued, up to `sent_up_to`).

        A socket whose subscription was lost meanwhile stays held: events published while it
        was down may be missing from both its replay and the channel, and a live event after
        the reconnect would move its cursor past them. It is told now (after its ack) and
        caught up from `sent_up_to` like every other held socket.
        """
        self._setting_up.discard(conn)
        if conn not in self._stalled:
            conn.go_live(sent_up_to)
            return
        conn.last_event_id = sent_up_to
        conn.push(frame(sent_up_to, ERROR, _INTERRUPTED))
        catching_up = self._resync is not None and not self._resync.done()
        if not catching_up and not self._outage and self._due(conn):
            # The outage ended while this socket was being set up, and its catch-up passed
            # it over (see `_due`): nothing else will release it.
            self._resync = asyncio.get_running_loop().create_task(self._catch_up())

    async def detach(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self._setting_up.discard(conn)
        session = keys.session_channel(conn.tenant_id, conn.session_id)
        tenant = keys.tenant_channel(conn.tenant_id)
        async with self._lock:
            emptied = []
            for channel, table in ((session, self._sessions), (tenant, self._tenants)):
                members = table.get(channel)
                if members is None:
                    continue
                members.discard(conn)  # both tables before any await: a cut detach keeps none
                if not members:
                    del table[channel]
                    emptied.append(channel)
            for channel in emptied:
                await self._unsubscribe(channel)

    async def _until_live(self, channel: str) -> None:
        """Wait (bounded) while the channel's subscription is being restored after an outage:
        a socket that read its log before that would miss what is published in between."""
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                while channel not in self._lane_of or self._outage:
                    await self._changed.wait()
        except TimeoutError as exc:
            raise RedisTimeoutError(f"the subscription to {channel} is not restored") from exc

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _lane_for(self, channel: str) -> _Lane:
        """The lane that can subscribe to `channel` (made on first use)."""
        cluster = self._cluster
        if cluster is None:
            lane = self._lanes.get("redis")
            if lane is None:
                lane = self._lanes["redis"] = _Lane("redis", self._redis.pubsub())
            return lane
        await cluster.initialize()  # learns the slot map once; a no-op afterwards
        node = cluster.get_node_from_key(channel)
        if node is None:
            raise RedisClusterException(f"no node serves the slot of {channel}")
        lane = self._lanes.get(node.name)
        if lane is None:
            client, pubsub = cluster.node_pubsub(node)
            lane = self._lanes[node.name] = _Lane(node.name, pubsub, client)
        return lane

    async def _subscribe(self, channel: str) -> None:
        lane = await self._lane_for(channel)
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = confirmed
        try:
            if lane.reader is None:  # a new lane: this coroutine alone uses its connection
                await lane.pubsub.ssubscribe(channel)
            else:
                await _send_as_is(lane.pubsub, "SSUBSCRIBE", channel)
                lane.pubsub.shard_channels[_tracked(lane.pubsub, channel)] = None
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                if lane.reader is None:  # a new lane: read the confirmation ourselves
                    while not confirmed.done():
                        message = await lane.pubsub.get_message(timeout=1.0)
                        if message is not None:
                            self._dispatch(message)
                await confirmed
        except BaseException as exc:
            # Not subscribed as far as the hub knows: not by redis-py either (it subscribed
            # the channel again at its next reconnect, for the life of the pod).
            await _forget(lane.pubsub, channel)
            if isinstance(exc, TimeoutError):  # Redis frozen or unreachable: refused
                unconfirmed = f"no confirmation of the subscription to {channel}"
                raise RedisTimeoutError(unconfirmed) from exc
            raise
        finally:
            if self._confirmations.get(channel) is confirmed:
                del self._confirmations[channel]
        lane.channels.add(channel)
        self._lane_of[channel] = lane
        self._homeless.discard(channel)
        if lane.reader is None:
            lane.reader = asyncio.get_running_loop().create_task(self._read_forever(lane))
        self._pulse()

    async def _unsubscribe(self, channel: str) -> None:
        self._homeless.discard(channel)
        lane = self._lane_of.pop(channel, None)
        if lane is None:
            return
        lane.channels.discard(channel)
        await _forget(lane.pubsub, channel)

    async def _read_forever(self, lane: _Lane) -> None:
        watchdog = asyncio.get_running_loop().create_task(self._watch(lane))
        try:
            await self._read(lane)
        finally:
            watchdog.cancel()

    async def _read(self, lane: _Lane) -> None:
        """Read the lane's messages with no timeout per read: an asyncio timer per message
        was a sixth of the api's CPU when delivering thousands of events a second. Silence
        is `_watch`'s business."""
        pubsub = lane.pubsub
        loop = asyncio.get_running_loop()
        delay = RECONNECT_MIN_SECONDS
        lane.heard, lane.pinged = loop.time(), None
        while True:
            try:
                message = await pubsub.get_message(timeout=None)
                lane.heard, lane.pinged = loop.time(), None
            except REDIS_DOWN:
                if self._cluster is not None:
                    self._lose(lane)
                    return
                delay = await self._reconnect_after_a_loss(lane, delay)
                continue
            except REDIS_REFUSING:
                # The watchdog's PING answered with an error (MISCONF: Redis refuses even a
                # PING while its snapshots fail): the connection lives, and it raised out of
                # here, killing the lane, so every new socket was refused 1013 for good.
                lane.heard, lane.pinged = loop.time(), None
                continue
            except Exception as exc:
                if self._cluster is None:
                    # Ending here left the pod deaf for good, in silence, with readiness 200
                    # (every later subscription waited for a confirmation nobody read). As a
                    # lost connection: hold and tell the sockets, reconnect, catch up.
                    log.warning("delivery subscription failed; reconnecting", exc_info=exc)
                    delay = await self._reconnect_after_a_loss(lane, delay)
                    continue
                # A node's lane must not die in silence (say, a reply from a node that is
                # rejoining the cluster): treat it as lost, its channels are subscribed again.
                if as_cluster_outage(exc) is None:
                    log.exception("delivery subscription on %s failed", lane.name)
                else:  # a transport race while the node reconnects, MOVED mid-reshard
                    log.warning("delivery subscription on %s lost: %r", lane.name, exc)
                self._lose(lane)
                return
            if message is not None and _resubscribed_after_a_drop(message, lane):
                # redis-py's retry made the connection again and subscribed its channels by
                # itself (the connection dropped while Redis stayed up: a proxy's idle
                # timeout, CLIENT KILL, a subscriber over its output buffer limit), and no
                # error reached this loop: what was published in between is only in the logs.
                log.warning("delivery subscription on %s dropped and remade", lane.name)
                if self._cluster is not None:
                    self._lose(lane)
                    return
                if not self._outage:
                    self._begin_outage()
            if self._outage:  # reconnected and resubscribed by redis-py
                delay = RECONNECT_MIN_SECONDS
                self._outage = False
                self._pulse()
                self._resync = loop.create_task(self._catch_up())
            if message is not None:
                try:
                    self._dispatch(message)
                except Exception:
                    # One message this pod cannot read (published on a session's channel by
                    # something else than our scripts: a frame without its id first) ended
                    # the reader: the pod delivered nothing more, in silence, readiness 200.
                    log.warning("delivery: a message on %s dropped", lane.name, exc_info=True)

    async def _reconnect_after_a_loss(self, lane: _Lane, delay: float) -> float:
        """One server's lane lost its connection: hold and tell the sockets (once per outage),
        drop the connection for the next read to remake, and back off; the next delay."""
        if not self._outage:
            self._begin_outage()
        await self._reconnect_later(lane.pubsub)
        lane.heard, lane.pinged = asyncio.get_running_loop().time(), None
        await asyncio.sleep(delay)
        return min(RECONNECT_MAX_SECONDS, delay * 2)

    async def _watch(self, lane: _Lane) -> None:
        """Ping a lane that has been silent, and give it up when the ping goes unanswered.

        A frozen or unreachable Redis keeps the connection open and says nothing; without
        this the sockets would wait in silence for ever. Giving up starts the same recovery
        as a lost connection (hold and tell the sockets, reconnect, catch up from the logs),
        so nothing published while the connection was dead goes missing even if redis-py's
        own retry then reconnects at once.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            now = loop.time()
            if lane.pinged is None:
                if now - lane.heard > PING_IDLE_SECONDS:
                    lane.pinged = now
                    # On the connection as it is: redis-py's `ping()` remade a broken one from
                    # this task while the reader remade it too (see `_send_as_is`). A
                    # connection being remade gets no ping: its silence is timed all the same.
                    with contextlib.suppress(TimeoutError, *REDIS_DOWN):
                        async with asyncio.timeout(PONG_TIMEOUT_SECONDS):
                            await _send_as_is(lane.pubsub, "PING")
                continue
            if now - lane.pinged <= PONG_TIMEOUT_SECONDS:
                continue
            log.warning("no answer to a ping on the subscription %s", lane.name)
            lane.pinged, lane.heard = None, now
            if self._cluster is not None:
                self._lose(lane)
                if lane.reader is not None:
                    lane.reader.cancel()  # also ends this task
                return
            if not self._outage:
                self._begin_outage()
            await self._reconnect_later(lane.pubsub)  # the blocked read fails and reconnects

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
        if self._resync is not None:  # a catch-up in progress starts over after this outage
            self._resync.cancel()
            self._resync = None
        for conn in list(self.connections):
            self._stall(conn)

    def _stall(self, conn: ClientConnection) -> None:
        """Hold and tell a socket, to be caught up; one being set up is told by `go_live`
        (nothing may precede its `connection.ack`)."""
        self._stalled.add(conn)
        if conn not in self._setting_up:
            conn.hold()
            conn.push(frame(conn.last_event_id, ERROR, _INTERRUPTED))

    def _lose(self, lane: _Lane) -> None:
        """A cluster node's lane failed: hold and tell the sockets of its sessions, drop the
        lane, and subscribe its channels again wherever the slot map then puts them."""
        log.warning("delivery subscription on %s lost; resubscribing its channels", lane.name)
        if self._lanes.get(lane.name) is lane:
            del self._lanes[lane.name]
        for channel in list(lane.channels):
            self._evict(channel)
        closing = asyncio.get_running_loop().create_task(lane.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        self._restart_rehome()

    def _evict(self, channel: str) -> None:
        """`channel` is no longer subscribed: hold and tell its sockets until it is again."""
        lane = self._lane_of.pop(channel, None)
        if lane is not None:
            lane.channels.discard(channel)
        self._homeless.add(channel)
        for conn in self._sessions.get(channel, ()):
            self._stall(conn)

    def _restart_rehome(self) -> None:
        if self._resync is not None:  # a catch-up in progress starts over after this loss
            self._resync.cancel()
        self._resync = asyncio.get_running_loop().create_task(self._rehome())

    def _due(self, conn: ClientConnection) -> bool:
        """A held socket that can be caught up now (or dropped: it is gone). Not one being
        set up: its replay is still being read, and `go_live` hands it over when it is done."""
        if conn in self._setting_up:
            return False
        if self._cluster is None or conn.closed or conn not in self.connections:
            return True
        return keys.session_channel(conn.tenant_id, conn.session_id) in self._lane_of

    def _wanted(self, channel: str) -> bool:
        return (
            channel == self._pod_channel
            or bool(self._sessions.get(channel))
            or bool(self._tenants.get(channel))
        )

    async def _rehome(self) -> None:
        """Subscribe the channels of lost lanes again wherever the refreshed slot map puts them
        (with backoff), catching up each held socket as soon as its session's channel is back.

        A node that is still down is skipped for the round after its first failure, so that the
        channels of the other nodes (and their sockets) do not wait for it.
        """
        assert self._cluster is not None
        delay = RECONNECT_MIN_SECONDS
        while True:
            await asyncio.sleep(delay)
            with contextlib.suppress(*REDIS_DOWN, RedisClusterException):
                await self._cluster.nodes_manager.initialize()
            down: set[str] = set()
            async with self._lock:
                for channel in sorted(self._homeless):
                    if not self._wanted(channel):
                        self._homeless.discard(channel)
                        continue
                    node = ""
                    try:
                        node = (await self._lane_for(channel)).name
                        if node not in down:
                            await self._subscribe(channel)
                    except Exception as exc:  # whatever it is, this task must not die of it
                        down.add(node)
                        quiet = isinstance(exc, (*REDIS_DOWN, RedisClusterException))
                        log.log(
                            logging.INFO if quiet else logging.WARNING,
                            "delivery resubscription of %s not possible yet: %r",
                            channel,
                            exc,
                        )
            self._pulse()
            await self._catch_up()
            if not self._homeless:
                return
            log.info(
                "delivery: %d channels not subscribed again yet, %d sockets held",
                len(self._homeless),
                len(self._stalled),
            )
            delay = min(RECONNECT_MAX_SECONDS, delay * 2)

    async def _catch_up(self) -> None:
        """After a reconnect, re-read each held socket's session log from its last event.

        Every held socket is released, whatever it takes: a socket left held would wait in
        silence for ever. A read that fails is retried with backoff (a new outage cancels this
        task and starts another when it ends).
        """
        if self._stalled:
            log.info("delivery subscription restored; catching up %d sockets", len(self._stalled))
        delay = RECONNECT_MIN_SECONDS
        while True:
            # On a cluster, a socket whose session's channel is not subscribed again yet (its
            # node still lost) waits for a later round of `_rehome`.
            conn = next((held for held in self._stalled if self._due(held)), None)
            if conn is None:
                return
            if conn.closed or conn not in self.connections:
                self._stalled.discard(conn)
                continue
            try:
                await self._replay_to(conn)
            except REDIS_DOWN:  # retried from the last page it got (`conn.last_event_id`)
                await asyncio.sleep(delay)
                delay = min(RECONNECT_MAX_SECONDS, delay * 2)
                continue
            except Exception:  # never leave a socket held in silence: it reconnects and resumes
                log.exception(
                    "catch-up of a socket failed; closing it",
                    extra={"tenant_id": conn.tenant_id, "session_id": conn.session_id},
                )
                conn.close_soon(CLOSE_INTERNAL, "internal error: reconnect")
                self._stalled.discard(conn)
                continue
            if not self._due(conn):
                # Its channel was lost again while its log was being read. That loss cancels
                # this task, but a cancel is only seen at the next await: released now, the
                # socket would take live events again with its channel unsubscribed.
                continue
            conn.go_live(conn.last_event_id)
            self._stalled.discard(conn)

    async def _replay_to(self, conn: ClientConnection) -> None:
        """The held socket's events since `conn.last_event_id`, REPLAY_PAGE at a time (as a
        resume reads them: a log of `SESSION_LOG_MAXLEN` events in one read held the event
        loop and the api's memory for every other client), its cursor moved after each."""
        # `partial`: what the log still holds after a gap is delivered too.
        replay = await read_since(
            self._redis,
            conn.tenant_id,
            conn.session_id,
            conn.last_event_id,
            partial=True,
            log_ttl_ms=self._log_ttl_ms,
            page=REPLAY_PAGE,
        )
        if replay.resumed is False:
            self._tell_gap(conn, replay.cursor)
        for event_id, body in replay.events:
            conn.push(frame_with_id(event_id, body))
        conn.last_event_id = replay.cursor
        more = replay.more
        while more and not conn.closed:
            page = await read_page(self._redis, conn.tenant_id, conn.session_id, conn.last_event_id)
            if page.gap:  # trimmed past the cursor between two pages (a busy, capped log)
                self._tell_gap(conn, page.events[0][0] if page.events else conn.last_event_id)
            for event_id, body in page.events:
                conn.push(frame_with_id(event_id, body))
                conn.last_event_id = event_id
            more = page.more

    @staticmethod
    def _tell_gap(conn: ClientConnection, log_cursor: str) -> None:
        """Events were trimmed, expired or lost with Redis's data: say so, then deliver what
        remains (newer than the socket's cursor, in log order)."""
        conn.push(frame(conn.last_event_id, ERROR, RESUME_GAP))
        log.warning(
            "events lost for a socket after an outage",
            extra={"tenant_id": conn.tenant_id, "session_id": conn.session_id,
                   "after": conn.last_event_id, "log_cursor": log_cursor},
        )  # fmt: skip

    def _deliver_traced(
        self, channel: str, members: set[ClientConnection], parent: str, text: str
    ) -> None:
        """Continue the message's trace on the delivery hop: a CONSUMER span for the channel
        and, per socket, a `websocket send` span that ends when the frame is written."""
        event_id = frame_id(text)
        with telemetry.consumer(
            channel,
            {"traceparent": parent},
            message_id=event_id,
            template=keys.SESSION_CHANNEL_TEMPLATE,
            sockets=len(members),
        ):
            _LAG.since(event_id, exemplar=telemetry.exemplar())
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
                _LAG.since(event_id)
                for conn in members:
                    conn.deliver(event_id, text)
                return
            members = self._tenants.get(channel)
            if members:  # a tenant broadcast
                for conn in members:
                    conn.broadcast(text)
        elif kind == "ssubscribe":
            confirmed = self._confirmations.pop(channel, None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        elif kind == "sunsubscribe" and channel in self._lane_of:
            # Not asked for by us (`_unsubscribe` forgets the channel first): the node no
            # longer serves the channel's slot (resharding, a restarted node rejoining).
            # Without this its sockets would wait in silence; subscribe it where it now lives.
            log.warning("delivery: %s unsubscribed by its node; resubscribing", channel)
            self._evict(channel)
            self._restart_rehome()
