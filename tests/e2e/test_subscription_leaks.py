"""An api pod's pub/sub subscriptions after sockets closed while Redis was frozen.

The SRE's view (README "Reliability", Redis faults: "sockets stay open ... every process
reconnects with backoff by itself"): once every socket of a session has closed, the pod holds
nothing for that session. The pod kept, for the rest of its life, a subscription (and an
entry in redis-py's `PubSub.shard_channels`) for every session whose last socket closed while
the subscription connection was frozen or being remade: redis-py subscribed it again at each
reconnect; and a handler's unsubscription reconnecting the connection at the same moment as
the lane's reader made both read at once, which could end the reader and leave the pod deaf.
Found by the soak review.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from services.cli.embedded import RedisServer, free_port
from services.cli.stack import Child
from tests.e2e.clients import auth, connect, next_event
from tests.e2e.conftest import lone_api, redis_client

TENANT = "soak-sub"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test freezes (SIGSTOP) and thaws; never a shared one."""
    server = RedisServer(port=free_port()).start()
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.cleanup()


async def _until(check, timeout: float = 10.0, every: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll `check()` (async) until it returns a truthy value; return the last value."""
    value = None
    async with asyncio.timeout(timeout):
        while True:
            value = await check()
            if value:
                return value
            await asyncio.sleep(every)


async def test_sessions_closed_during_a_redis_freeze_stay_subscribed_for_ever(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Expected: after Redis thaws and every socket has closed, the api is subscribed to no
    session channel (`/ws/stats` says 0 sessions), so `SPUBLISH` on those channels reaches
    0 subscribers. It was: the 20 sessions whose sockets closed during the freeze are still
    subscribed (SPUBLISH answers 1 each), although the hub forgot them: the hub's
    `_unsubscribe` (services/api/delivery.py:271-278) sends SUNSUBSCRIBE on the frozen
    connection, its confirmation never comes, and redis-py's reconnect (`PubSub.on_connect`)
    clears the pending unsubscriptions and subscribes every `shard_channels` entry again. One
    subscription per such session, for the life of the pod: each later event of those
    sessions is shipped to the pod and dropped."""
    sessions = [f"sess-{i}" for i in range(30)]
    with lone_api(own_redis, tmp_path / "logs") as api:
        async with httpx.AsyncClient(timeout=10) as http:

            async def stats() -> dict:  # type: ignore[type-arg]
                answer = await http.get(f"{api.url}/ws/stats", headers=auth(TENANT))
                return answer.json()  # type: ignore[no-any-return]

            sockets = [(await connect(api.ws_url, TENANT, s))[0] for s in sessions]
            kept, leaving = sockets[:10], sockets[10:]
            assert own_redis.process is not None
            os.kill(own_redis.process.pid, signal.SIGSTOP)  # frozen: connections stay open
            try:
                for ws in leaving:
                    await ws.close()
                await _until(lambda: _connections_are(stats, 10))
                # The api's watchdog gives the frozen subscription up and tells the sockets.
                event = await next_event(kept[0], timeout=15)
                assert event["type"] == "error", event
            finally:
                os.kill(own_redis.process.pid, signal.SIGCONT)
            redis = redis_client(own_redis)
            try:
                live = [f"{{s:{TENANT}:{s}}}:events" for s in sessions[:10]]

                async def resubscribed() -> bool:
                    return all(n == 1 for n in await _subscribers(redis, live))

                await _until(resubscribed)
                for ws in kept:
                    await ws.close()
                await _until(lambda: _connections_are(stats, 0))
                assert (await stats())["sessions"] == 0

                async def unsubscribed() -> bool:
                    return all(n == 0 for n in await _subscribers(redis, live))

                await _until(unsubscribed)  # the sockets closed after the thaw: released
                gone = [f"{{s:{TENANT}:{s}}}:events" for s in sessions[10:]]
                receivers = {
                    channel: int(await redis.execute_command("SPUBLISH", channel, "{}"))
                    for channel in gone
                }
                subscribed = sorted(c for c, n in receivers.items() if n)
                channels = await redis.execute_command("PUBSUB SHARDCHANNELS")
            finally:
                await redis.aclose()
    assert subscribed == [], (
        f"{len(subscribed)} of {len(gone)} sessions closed during the freeze are still "
        f"subscribed by the api (which counts 0 sessions); PUBSUB SHARDCHANNELS: "
        f"{sorted(c.decode() for c in channels)}"
    )


async def _connect_retrying(ws_base: str, tenant: str, session: str):  # type: ignore[no-untyped-def]
    """A client's connect: a 1013 (try again later) is retried, as README says clients do."""
    for _ in range(3):
        try:
            return (await connect(ws_base, tenant, session))[0]
        except websockets.ConnectionClosedError as exc:
            if exc.rcvd is None or exc.rcvd.code != 1013:
                raise
            await asyncio.sleep(0.25)
    raise AssertionError(f"{session}: refused 1013 three times in a row (15 s)")


async def _drop_as_clients_leave(
    api: Child, redis: Redis, rounds: int, per_round: int, others: int = 0
) -> list[str]:
    """`rounds` times: open `per_round` sockets on sessions of their own, then kill the api's
    subscription connection (CLIENT KILL TYPE pubsub) while their clients close them. Returns
    the session channels still subscribed once the hub holds no session but the `others`
    sockets' (5 s allowed)."""
    leaked: list[str] = []
    async with httpx.AsyncClient(timeout=10) as http:

        async def hub_empty() -> bool:
            answer = (await http.get(f"{api.url}/ws/stats", headers=auth(TENANT))).json()
            return bool(answer["connections"] == others and answer["sessions"] == others)

        for round_ in range(rounds):
            sessions = [f"drop{round_}-{i}" for i in range(per_round)]
            sockets = [await _connect_retrying(api.ws_url, TENANT, s) for s in sessions]
            channels = [f"{{s:{TENANT}:{s}}}:events" for s in sessions]
            assert await _subscribers(redis, channels) == [1] * per_round
            await asyncio.gather(
                redis.execute_command("CLIENT KILL TYPE pubsub"),
                *(ws.close() for ws in sockets),
            )
            await _until(hub_empty)

            async def released(channels: list[str] = channels) -> bool:
                return not any(await _subscribers(redis, channels))

            try:
                await _until(released, timeout=5.0)
            except TimeoutError:
                counts = await _subscribers(redis, channels)
                leaked += [c for c, n in zip(channels, counts, strict=True) if n]
    return leaked


async def test_sessions_closed_as_the_subscription_drops_stay_subscribed_with_redis_up(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """README "Reliability": an api's subscription connection that drops while Redis stays up
    (a proxy's idle timeout, a subscriber over `client-output-buffer-limit pubsub`, CLIENT
    KILL) is handled like an outage. Expected: sockets whose clients leave at that moment are
    released like any other; once the hub holds no session (`/ws/stats` sessions 0) the pod
    is subscribed to none of theirs. It was: sessions whose last socket closed as the
    connection dropped stay subscribed on Redis (SPUBLISH on the channel answers 1), for the
    life of the pod: the SUNSUBSCRIBE of `SessionHub._unsubscribe` (services/api/
    delivery.py:271-278) races redis-py's reconnect, whose `PubSub.on_connect` clears the
    pending unsubscriptions and subscribes every `PubSub.shard_channels` entry again."""
    rounds, per_round = 3, 20
    with lone_api(own_redis, tmp_path / "logs") as api:
        redis = redis_client(own_redis)
        try:
            leaked = await _drop_as_clients_leave(api, redis, rounds, per_round)
            receivers = [int(await redis.execute_command("SPUBLISH", c, "{}")) for c in leaked]
        finally:
            await redis.aclose()
    assert leaked == [], (
        f"{len(leaked)} of {rounds * per_round} sessions whose sockets closed as the "
        f"subscription dropped are still subscribed by an api holding 0 sessions "
        f"(SPUBLISH receivers: {receivers[:10]}): {leaked[:5]}..."
    )


async def test_a_socket_closing_as_the_subscription_drops_fails_its_handler(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Expected (README "Logs": only what an SRE must act on is an error): a client leaving
    while the subscription connection is being remade is an ordinary close. It was: its
    handler dies with `RuntimeError: read() called while another coroutine is already waiting
    for incoming data` (uvicorn's "Exception in ASGI application", level ERROR): the hub's
    SUNSUBSCRIBE reconnects the PubSub connection while the lane's reader task is reading it
    (services/api/delivery.py:278, only REDIS_DOWN is caught), and the exception leaves
    `SessionHub.detach` (delivery.py:199-213) half done: the socket's tenant-channel entry
    (`_tenants`) keeps the closed ClientConnection (and its uvicorn protocol) and the tenant's
    broadcast channel stays subscribed; `conn.closing()` in sockets.py:371 is skipped."""
    with lone_api(own_redis, tmp_path / "logs") as api:
        redis = redis_client(own_redis)
        try:
            await _drop_as_clients_leave(api, redis, rounds=3, per_round=20)
        finally:
            await redis.aclose()
        log = api.output(tail=10_000_000)
    failures = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and '"level":"ERROR"' in line
    ]
    summary = [(f["msg"].strip(), (f.get("exc") or "").strip().splitlines()[-1:]) for f in failures]
    assert failures == [], f"{len(failures)} socket handlers failed: {summary[:3]}"


async def _subscribers(redis, channels: list[str]) -> list[int]:  # type: ignore[no-untyped-def]
    """PUBSUB SHARDNUMSUB's count for each channel (redis-py answers pairs)."""
    reply = await redis.execute_command("PUBSUB SHARDNUMSUB", *channels)
    if reply and isinstance(reply[0], (list, tuple)):
        return [int(n) for _, n in reply]
    return [int(n) for n in reply[1::2]]


async def _connections_are(stats, n: int) -> bool:  # type: ignore[no-untyped-def]
    return bool((await stats())["connections"] == n)


async def test_the_pod_keeps_delivering_after_subscription_drops_as_clients_leave(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Expected (README "Reliability": a dropped subscription connection is remade and the
    sockets caught up; "every process reconnects with backoff by itself"): after each drop an
    open socket still gets the events published on its session's channel. It was (in some
    of the rounds, so the test tries up to 8): the lane's reader task dies on the same race as
    above (`RuntimeError: read() called while another coroutine is already waiting for
    incoming data` from redis-py while `_unsubscribe`'s SUNSUBSCRIBE reconnects the PubSub),
    and on a single server `SessionHub._read` re-raises every non-Redis error
    (services/api/delivery.py:316-318): the reader and its watchdog end without a log line,
    the pod delivers nothing to any socket any more, every new socket is refused 1013 after
    waiting 5 s for a subscription confirmation nobody reads, and `/health/ready` stays 200."""
    deaf_after = None
    with lone_api(own_redis, tmp_path / "logs") as api:
        redis = redis_client(own_redis)
        try:
            stayer = await _connect_retrying(api.ws_url, "soak-stay", "stayer")
            channel = "{s:soak-stay:stayer}:events"
            for round_ in range(8):
                await _drop_as_clients_leave(api, redis, rounds=1, per_round=40, others=1)
                event_id = f"9999999999999-{round_}"

                # A frame on the stayer's channel, as the worker publishes one.
                async def delivered(event_id: str = event_id) -> bool:
                    await redis.execute_command(
                        "SPUBLISH", channel, f'{{"id":"{event_id}","type":"message","data":{{}}}}'
                    )
                    try:
                        while True:
                            event = await next_event(stayer, timeout=0.5)
                            if event["id"] == event_id:
                                return True
                    except TimeoutError:
                        return False

                try:
                    await _until(delivered, timeout=8.0)
                except TimeoutError:
                    deaf_after = round_ + 1
                    break
            ready = (await httpx.AsyncClient().get(f"{api.url}/health/ready")).status_code
        finally:
            await redis.aclose()
        log = api.output(tail=100_000)
    assert deaf_after is None, (
        f"after {deaf_after} subscription drops the pod delivers nothing to its open socket "
        f"(/health/ready: {ready}); api log tail:\n{log[-1500:]}"
    )
