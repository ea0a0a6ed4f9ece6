"""A pod's subscription connection dropped while Redis stays up (a proxy's idle timeout, a
network blip, Redis closing a subscriber over its `client-output-buffer-limit pubsub`,
`CLIENT KILL`): redis-py's retry made it again and subscribed its channels by itself inside
the read, the api never saw the loss, and what was published in between never reached the
socket: no `error`, no catch-up, and the socket's cursor moved past the lost events, so not
even a resume got them back (chunks lost on every run, sometimes the final answer: a tab
waiting for ever). README (Reliability, Redis faults) promises an `error` `unavailable` and a
catch-up from the session log: nothing lost, only delayed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import LocalCluster, LocalRedis, RedisServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, new_stack, redis_client

pytestmark = pytest.mark.e2e

FINAL_STATES = ("completed", "failed", "cancelled", "timed_out")


@pytest.fixture(params=["standalone", "cluster"])
def topology(
    request: pytest.FixtureRequest, e2e_redis: RedisServer, redis_cluster: LocalCluster
) -> LocalRedis:
    return e2e_redis if request.param == "standalone" else redis_cluster


@pytest.fixture
def pod(topology: LocalRedis, tmp_path: Path) -> Iterator[tuple[LocalStack, Child]]:
    stack = new_stack(topology, tmp_path / "logs", **FAST_EXECUTOR)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        yield stack, api
    finally:
        stack.stop()


def node_ports(topology: LocalRedis) -> list[int]:
    return topology.ports if isinstance(topology, LocalCluster) else [topology.port]


async def drop_subscribers(ports: list[int], stop: asyncio.Event) -> int:
    """Close every subscriber connection of every node, again and again, until `stop`."""
    nodes = [Redis(host="127.0.0.1", port=port) for port in ports]
    dropped = 0
    try:
        while not stop.is_set():
            for node in nodes:
                dropped += int(await node.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
            await asyncio.sleep(0.05)  # a drop every 50 ms, whatever else happens
    finally:
        for node in nodes:
            await node.aclose()
    return dropped


async def test_a_socket_gets_every_event_while_its_pod_s_subscription_keeps_dropping(
    pod: tuple[LocalStack, Child], topology: LocalRedis
) -> None:
    _, api = pod
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    redis = redis_client(topology)
    stop = asyncio.Event()
    dropping: asyncio.Task[int] | None = None
    try:
        async with httpx.AsyncClient() as http:
            reply = await send(
                http,
                api.url,
                tenant,
                {
                    "message": "a long answer",
                    "stream": True,
                    "session_id": session,
                    "context": {"simulate": {"repeat": 40, "chunk_delay_ms": 5}},
                },
            )
            task = reply.json()["task_id"]
            dropping = asyncio.create_task(drop_subscribers(node_ports(topology), stop))
            async with asyncio.timeout(60):
                while (
                    await http.get(f"{api.url}/api/chat/tasks/{task}", headers=auth(tenant))
                ).json()["status"] not in FINAL_STATES:
                    await asyncio.sleep(0.05)
        stop.set()
        dropped = await dropping
        got = await events_until(ws, final_of(task), 30)
        logged = [entry for entry, _ in await redis.xrange(keys.session_log(tenant, session))]
        delivered = [event for event in got if event["type"] != "error"]
        assert dropped > 0
        assert [event["id"] for event in delivered] == [entry.decode() for entry in logged], (
            f"{len(delivered)} of {len(logged)} events after {dropped} dropped subscriptions"
        )
        chunks = [event["data"]["seq"] for event in delivered if event["type"] == "chat.chunk"]
        assert chunks == list(range(1, len(chunks) + 1))
    finally:
        stop.set()
        if dropping is not None:
            await asyncio.gather(dropping, return_exceptions=True)
        await redis.aclose()
        await ws.close()
