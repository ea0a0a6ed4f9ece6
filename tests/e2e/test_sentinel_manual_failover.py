"""An SRE's Sentinel installation (passwords on the primary and on the sentinels) through a
manual failover (`SENTINEL FAILOVER mymaster`: the primary hands over to its in-sync replica)
and through the loss of the primary: README "Redis topologies", "Reliability". Written by the
Sentinel review.

After `SENTINEL FAILOVER` the sentinels promote the replica at once (~0.2 s) and name it
(~1 s), but demote the old primary only when they next look at it (~10 s here). Until then
both servers are primaries, and what is written to the old one is discarded when it resyncs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.exceptions import ReadOnlyError

from services.cli.stack import LocalStack
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import new_stack
from tests.e2e.secured_sentinel import (
    PRIMARY_PASSWORD,
    SENTINEL_PASSWORD,
    SecuredSentinel,
    command,
)

pytestmark = pytest.mark.e2e

# The sentinels are asked every 0.5 s (services/core/redis_client.py): a generous bound.
MOVE_SECONDS = 5.0


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SecuredSentinel]:
    deployment = SecuredSentinel(down_after_ms=1000, failover_timeout_ms=5000).start()
    yield deployment
    deployment.cleanup()


def start_stack(sentinel: SecuredSentinel, log_dir: Path, apis: int = 1, **extra: str) -> Any:
    stack = new_stack(
        sentinel, log_dir, executor_chunk_delay_ms="15", partition_lease_seconds="3",
        executor_reclaim_idle_seconds="2", **extra,
    )  # fmt: skip
    started = [stack.start_api() for _ in range(apis)]
    stack.start("worker")
    stack.start("worker")
    stack.start("executor")
    stack.wait_ready(*started)
    return stack, started


def no_secret_in_logs(stack: LocalStack) -> None:
    for child in stack.children:
        text = child.output(10**7)
        for secret in (PRIMARY_PASSWORD, SENTINEL_PASSWORD):
            assert secret not in text, f"{child.role} logged a password:\n{text[-2000:]}"
        assert '"CRITICAL"' not in text, f"{child.role} stopped on an error:\n{text[-3000:]}"


class HealthWatch:
    """Polls /health/ready and /health/detailed of an api every 0.1 s, recording answers."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.seen: list[tuple[float, str, int | str, Any]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=8) as http:
            while not self._stop.is_set():
                for path in ("/health/ready", "/health/detailed"):
                    started = time.monotonic()
                    try:
                        reply = await http.get(self.base + path)
                        body: Any = reply.json() if reply.content else None
                        self.seen.append((started, path, reply.status_code, body))
                    except (httpx.HTTPError, ValueError) as exc:
                        self.seen.append((started, path, type(exc).__name__, None))
                await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def test_sockets_follow_the_new_primary_live_new_and_resumed(
    sentinel: SecuredSentinel, tmp_path: Path
) -> None:
    """README: the api's pub/sub follows the promoted primary: a socket open across the
    failover gets the events of a message sent after it (caught up from the log if need be),
    a socket opened after it gets live events, and a resume from a cursor taken before the
    failover replays exactly what followed it."""
    stack, (api,) = start_stack(sentinel, tmp_path / "logs")
    try:
        tenant, session = unique("p"), unique("s")
        async with httpx.AsyncClient(timeout=10) as http:
            ws, _ = await connect(api.ws_url, tenant, session)
            body = {"message": "before", "stream": True, "session_id": session}
            reply = await send(http, api.url, tenant, body)
            before = await events_until(ws, final_of(reply.json()["task_id"]))
            cursor = before[-1]["id"]
            old = await asyncio.to_thread(sentinel.failover)
            await asyncio.to_thread(sentinel.wait_failover, old)
            await asyncio.to_thread(sentinel.wait_replica_in_sync, old)
            # Sends may be refused (503) for a moment after the promotion; retry as a client.
            body = {"message": "after", "stream": True, "session_id": session}
            deadline = time.monotonic() + 15
            while True:
                reply = await send(http, api.url, tenant, body, **{"Idempotency-Key": "k-after"})
                if reply.status_code == 202 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert reply.status_code == 202, reply.text
            print(f"\nsend accepted {time.monotonic() - deadline + 15:.2f} s after the failover")
            task = reply.json()["task_id"]
            live = await events_until(ws, final_of(task), timeout=15)
            answer = [e for e in live if e.get("task_id") == task]
            assert answer[-1]["type"] == "chat.response", live
            assert answer[-1]["data"]["content"].endswith("You said: after"), live
            # A socket opened after the failover, then a third message to see it live.
            fresh, _ = await connect(api.ws_url, tenant, session)
            reply = await send(http, api.url, tenant, {"message": "third", "session_id": session})
            assert reply.status_code == 202, reply.text
            third = reply.json()["task_id"]
            on_fresh = await events_until(fresh, final_of(third), timeout=15)
            on_old = await events_until(ws, final_of(third), timeout=15)
            assert [e["id"] for e in on_fresh] == [e["id"] for e in on_old]
            # A resume from before the failover: exactly the events after the cursor.
            resumed, ack = await connect(api.ws_url, tenant, session, last_event_id=cursor)
            assert ack["data"]["resumed"] is True, ack
            replay = await events_until(resumed, final_of(third), timeout=15)
            expected = [e["id"] for e in [*live, *on_old] if e["type"] != "error"]
            assert [e["id"] for e in replay] == expected
            for socket in (ws, fresh, resumed):
                await socket.close()
            # The task's state reads back from the new primary.
            state = await http.get(f"{api.url}/api/chat/tasks/{task}", headers=auth(tenant))
            assert state.json()["status"] == "completed", state.text
        stack.check_alive()
        no_secret_in_logs(stack)
    finally:
        stack.stop()


async def test_a_killed_primary_that_comes_back_is_a_replica_and_nothing_notices(
    sentinel: SecuredSentinel, tmp_path: Path
) -> None:
    """README: while Redis is unreachable readiness fails (503, promptly: a probe has a
    timeout), and every process follows the promoted replica by itself; the old primary,
    restarted, rejoins as a replica (READONLY to writes) and nobody writes to it: sends keep
    being answered, /health/ready and /health/detailed are 200 with redis `up`."""
    stack, (api,) = start_stack(sentinel, tmp_path / "logs")
    try:
        tenant, session = unique("k"), unique("s")
        watch = HealthWatch(api.url)
        async with httpx.AsyncClient(timeout=10) as http:
            ws, _ = await connect(api.ws_url, tenant, session)
            watch.start()
            victim = await asyncio.to_thread(sentinel.kill_primary)
            promoted = await asyncio.to_thread(sentinel.wait_failover, victim.port)
            await asyncio.to_thread(sentinel.restart, victim)
            await asyncio.to_thread(sentinel.wait_replica_in_sync, victim.port)
            with pytest.raises(ReadOnlyError):  # READONLY
                command(victim.port, PRIMARY_PASSWORD, "SET", "probe", "1")
            deadline = time.monotonic() + 15
            while True:
                body = {"message": "after the kill", "session_id": session}
                reply = await send(http, api.url, tenant, body, **{"Idempotency-Key": "k1"})
                if reply.status_code == 202 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert reply.status_code == 202, reply.text
            events = await events_until(ws, final_of(reply.json()["task_id"]), timeout=15)
            assert events[-1]["type"] == "chat.response", events
            ready = await http.get(api.url + "/health/ready")
            detailed = await http.get(api.url + "/health/detailed")
            await ws.close()
        await watch.stop()
        t0 = watch.seen[0][0]
        slow = []
        for n, (at, path, status, body) in enumerate(watch.seen):
            if status != 200:
                print(f"{at - t0:6.2f} {path} {status} {body}")
            following = watch.seen[n + 1][0] if n + 1 < len(watch.seen) else at
            if following - at > 3:
                slow.append((round(at - t0, 2), path, status, round(following - at, 2)))
        print(f"promoted after {promoted:.2f} s")
        assert ready.status_code == 200, ready.text
        assert detailed.status_code == 200, detailed.text
        assert detailed.json()["components"]["redis"]["status"] == "up"
        assert not slow, f"health answers that took over 3 s: {slow}"
        stack.check_alive()
        no_secret_in_logs(stack)
    finally:
        stack.stop()


def _our_clients(port: int) -> list[str]:
    """The product's connections to the server on `port` (redis-py's, not the sentinels' or
    the replica's link; not this query's own)."""
    listed = command(port, PRIMARY_PASSWORD, "CLIENT", "LIST")
    return [
        line for line in str(listed).splitlines()
        if "lib-name=redis-py" in line and "cmd=client|list" not in line
    ]  # fmt: skip


async def test_every_process_leaves_the_old_primary_and_nothing_after_is_lost(
    sentinel: SecuredSentinel, tmp_path: Path
) -> None:
    """Expected: once the sentinels name the promoted replica, every process moves to it
    within about a second (README), and a message answered then is kept: its task still
    `completed` and a resume from its answer exact after the old primary is demoted. The
    processes stayed on the old primary over the connections they had open (blocking reads,
    subscriptions, a warm pool: redis-py asks the sentinels only for a new connection) until
    the demotion ~10 s later, and everything written there was lost: the answered task read
    404 and the resume was refused."""
    stack, (api,) = start_stack(sentinel, tmp_path / "logs")
    try:
        tenant, session = unique("w"), unique("s")
        async with httpx.AsyncClient(timeout=10) as http:
            ws, _ = await connect(api.ws_url, tenant, session)
            reply = await send(http, api.url, tenant, {"message": "warm", "session_id": session})
            await events_until(ws, final_of(reply.json()["task_id"]))
            old = await asyncio.to_thread(sentinel.failover)
            await asyncio.to_thread(sentinel.wait_failover, old)
            named = time.monotonic()
            while left := _our_clients(old):
                assert time.monotonic() - named < MOVE_SECONDS, (
                    f"{len(left)} connections still on the old primary {MOVE_SECONDS} s after "
                    f"the sentinels named the new one (its role: {sentinel.role(old)}):\n"
                    + "\n".join(left[:5])
                )
                await asyncio.sleep(0.05)
            body = {"message": "after the move", "session_id": session}
            deadline = time.monotonic() + 15
            while (reply := await send(http, api.url, tenant, body)).status_code == 503:
                assert time.monotonic() < deadline, reply.text  # a 503 while reconnecting
                await asyncio.sleep(0.2)
            assert reply.status_code == 202, reply.text
            task = reply.json()["task_id"]
            events = await events_until(ws, final_of(task), timeout=15)
            assert events[-1]["type"] == "chat.response", events
            await asyncio.to_thread(sentinel.wait_replica_in_sync, old, 25)
            state = await http.get(f"{api.url}/api/chat/tasks/{task}", headers=auth(tenant))
            resumed, ack = await connect(
                api.ws_url, tenant, session, last_event_id=events[-1]["id"]
            )
            await resumed.close()
            await ws.close()
        assert state.status_code == 200, state.text
        assert state.json()["status"] == "completed", state.text
        assert ack["data"]["resumed"] is True, ack
        stack.check_alive()
    finally:
        stack.stop()
