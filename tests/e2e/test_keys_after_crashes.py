"""Members that sorted sets and groups gain per socket, per worker and per task are removed
also after a crash (SIGKILL of an api holding sockets, of a worker, of the executor
mid-task), as README "Tenancy" (sockets), "Reliability" and "Redis keys" say."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.clients import connect, events_until, final_of, send, unique
from tests.e2e.conftest import new_stack, redis_client
from tests.e2e.keyspace import until

pytestmark = pytest.mark.e2e


@pytest.fixture
def server() -> Iterator[RedisServer]:
    redis = RedisServer().start()
    yield redis
    redis.cleanup()


async def _names(redis: Redis, stream: str, group: str) -> dict[str, int]:
    try:
        found = await redis.xinfo_consumers(stream, group)
    except Exception:
        return {}
    return {
        (c["name"].decode() if isinstance(c["name"], bytes) else c["name"]): int(c["pending"])
        for c in found
    }


async def test_a_killed_apis_sockets_leave_the_tenants_count_within_connection_ttl(
    server: RedisServer, tmp_path: Path
) -> None:
    """Guard. README "Tenancy": a pod that dies stops counting after CONNECTION_TTL_SECONDS
    (here 3 s): its members of `{tn:T}:sockets` go, and the key with them."""
    redis = redis_client(server)
    stack = new_stack(server, tmp_path / "logs", connection_ttl_seconds="3")
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        tenant = unique("t")
        held = [(await connect(api.ws_url, tenant, unique("s")))[0] for _ in range(3)]
        assert await redis.zcard(keys.tenant_sockets(tenant)) == 3
        stack.stop_child(api, signal.SIGKILL)

        async def gone() -> bool:
            return not await redis.exists(keys.tenant_sockets(tenant))

        await until(gone, "the dead pod's sockets to stop counting", timeout=6, step=0.1)
        for ws in held:
            ws.transport.abort()
    finally:
        stack.stop()
        await redis.aclose()


async def test_a_killed_workers_heartbeat_goes_and_its_tasks_deadlines_end(
    server: RedisServer, tmp_path: Path
) -> None:
    """Guard. A SIGKILLed worker's member of `{workers}:heartbeats` is removed by the live one
    once its lease ran out, and the tasks that were streaming through its partitions end,
    their deadlines leaving `{cb:N}:deadlines` (README: "the set holds only unfinished
    tasks")."""
    redis = redis_client(server)
    stack = new_stack(
        server, tmp_path / "logs", partition_lease_seconds="1", executor_chunk_delay_ms="2"
    )
    try:
        api = stack.start_api()
        doomed = stack.start("worker", pod_name="doomed-worker")
        stack.start("executor")
        stack.wait_ready(api)
        await until(
            lambda: _member(redis, "doomed-worker"), "the first worker's heartbeat", timeout=10
        )
        stack.start("worker", pod_name="next-worker")
        await until(lambda: _member(redis, "next-worker"), "the second heartbeat", timeout=10)
        tenant = unique("t")
        slow = {"simulate": {"chunk_delay_ms": 100, "repeat": 3}}
        sockets, tasks = [], []
        async with httpx.AsyncClient() as http:
            for _ in range(6):
                session = unique("s")
                ws, _ = await connect(api.ws_url, tenant, session)
                body = {"message": "one two three", "stream": True, "session_id": session,
                        "context": slow}  # fmt: skip
                reply = await send(http, api.url, tenant, body)
                assert reply.status_code == 202, reply.text
                sockets.append(ws)
                tasks.append(reply.json()["task_id"])
            await events_until(sockets[0], lambda e: e["type"] == "chat.chunk")
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
            for ws, task_id in zip(sockets, tasks, strict=True):
                done = await events_until(ws, final_of(task_id))
                assert done[-1]["type"] == "chat.response", done[-1]
                await ws.close()

        async def clean() -> bool:
            beats = await redis.zrange(keys.WORKER_HEARTBEATS, 0, -1)
            deadlines = [await redis.zcard(keys.partition_deadlines(p)) for p in range(8)]
            return b"doomed-worker" not in beats and not any(deadlines)

        await until(clean, "the dead worker's heartbeat and the ended deadlines", timeout=10)
    finally:
        stack.stop()
        await redis.aclose()


async def _member(redis: Redis, name: str) -> bool:
    return await redis.zscore(keys.WORKER_HEARTBEATS, name) is not None


async def test_an_executor_killed_mid_task_leaves_nothing_pending_once_its_task_ended(
    server: RedisServer, tmp_path: Path
) -> None:
    """Guard. The executor holding a task is SIGKILLed mid-stream; another takes the entry
    over (EXECUTOR_RECLAIM_IDLE_SECONDS, here 1 s) and answers. Once the task ended nothing is
    left pending in the `aes` group (a pending entry holds its stream up to MAXLEN), the
    action's entry is released, and the deadline is gone."""
    redis = redis_client(server)
    stack = new_stack(
        server, tmp_path / "logs", executor_reclaim_idle_seconds="1", executor_chunk_delay_ms="2"
    )
    try:
        api = stack.start_api()
        stack.start("worker")
        doomed = stack.start("executor", pod_name="doomed-executor")
        stack.wait_ready(api)
        tenant, session = unique("t"), unique("s")
        async with httpx.AsyncClient() as http:
            ws, _ = await connect(api.ws_url, tenant, session)
            body = {"message": "one two three four", "stream": True, "session_id": session,
                    "context": {"simulate": {"chunk_delay_ms": 150, "repeat": 3}}}  # fmt: skip
            reply = await send(http, api.url, tenant, body)
            task_id = reply.json()["task_id"]
            await events_until(ws, lambda e: e["type"] == "chat.chunk")
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(timeout=10)
            stack.start("executor", pod_name="next-executor")
            done = await events_until(ws, final_of(task_id))
            assert done[-1]["type"] == "chat.response", done[-1]
            await ws.close()
        stream = keys.aes_stream("high")  # the default tier here: enterprise

        async def released() -> bool:
            pending = await _names(redis, stream, keys.AES_GROUP)
            deadlines = [await redis.zcard(keys.partition_deadlines(p)) for p in range(8)]
            return (
                not any(pending.values()) and await redis.xlen(stream) == 0 and not any(deadlines)
            )

        await until(released, "the action's entry to be acknowledged and released", timeout=12)
    finally:
        stack.stop()
        await redis.aclose()
