"""The reference executor behind a fault proxy (its Redis connections go silent, or Redis
itself is frozen for a few seconds) while clients chat through an api on a healthy Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from services.cli.embedded import RedisServer
from tests.e2e.clients import Event, connect, next_event, send, unique
from tests.e2e.conftest import new_stack
from tests.faults.conftest import FaultProxy

pytestmark = pytest.mark.e2e

SESSIONS = 4
# ~40 words paced 100 ms apart: each answer streams for about 4 s.
LONG_ANSWER = {"simulate": {"chunk_delay_ms": 100, "repeat": 8}}
# The executor's Redis client gives up on a silent connection after `socket_timeout`
# (WORKER_SLEEP_SECONDS + 2 s = 3 s here) and reconnects with backoff; what is left of each
# answer takes under 4 s. 20 s is generous.
RESUME_WITHIN_SECONDS = 20.0


async def _stream_answers(
    api_url: str, ws_url: str, fault: object
) -> tuple[list[list[Event]], float, list[str]]:
    """Start SESSIONS streaming answers, apply `fault` once each has sent its first chunk,
    then collect every socket's events up to its final event (bounded)."""
    tenant = unique("t")
    sockets = [await connect(ws_url, tenant, unique("s")) for _ in range(SESSIONS)]
    events: list[list[Event]] = [[] for _ in sockets]
    async with httpx.AsyncClient(timeout=30) as http:
        for _, ack in sockets:
            reply = await send(
                http, api_url, tenant,
                {"message": "tell me", "stream": True, "session_id": ack["data"]["session_id"],
                 "context": LONG_ANSWER},
            )  # fmt: skip
            assert reply.status_code == 202, reply.text
    for n, (ws, _) in enumerate(sockets):
        while True:  # each answer is streaming
            event = await next_event(ws)
            events[n].append(event)
            if event["type"] == "chat.chunk":
                break
    await fault()  # type: ignore[operator]
    started = time.monotonic()
    unfinished: list[str] = []

    async def rest(n: int) -> None:
        ws = sockets[n][0]
        try:
            async with asyncio.timeout(RESUME_WITHIN_SECONDS):
                while True:
                    event = await next_event(ws, timeout=RESUME_WITHIN_SECONDS)
                    events[n].append(event)
                    if event["type"] in ("chat.response", "chat.error", "chat.cancelled"):
                        return
        except TimeoutError:
            chunks = [e for e in events[n] if e["type"] == "chat.chunk"]
            unfinished.append(
                f"session {n}: no final event {RESUME_WITHIN_SECONDS:g} s after the fault; "
                f"last chunk seq {chunks[-1]['data']['seq'] if chunks else None}"
            )

    await asyncio.gather(*(rest(n) for n in range(SESSIONS)))
    for ws, _ in sockets:
        await ws.close()
    return events, time.monotonic() - started, unfinished


async def test_answers_in_flight_resume_soon_after_the_executors_redis_connections_go_silent(
    own_redis: RedisServer, redis_proxy: FaultProxy, tmp_path: Path
) -> None:
    """README (Redis faults): "every process reconnects with backoff by itself". The executor
    notices a silent connection after `socket_timeout` (3 s here) and its new connections
    work at once. But a chunk's XADD that timed out ended the whole run as "interrupted"
    (services/executor/main.py `_execute`: `except REDIS_DOWN`), and the entry, no longer in
    `running`, stopped having its claim refreshed: nothing ran it again until the executor's
    own dead-executor reclaim finds it idle for EXECUTOR_RECLAIM_IDLE_SECONDS (30 s), checked
    every 15 s. Every streaming answer in flight froze 30-45 s for a 3 s network fault (and
    a free-tier task, 60 s deadline, could time out for it). It is answered again at once now."""
    stack = new_stack(own_redis, tmp_path / "logs")
    try:
        api = stack.start_api()
        stack.start("worker")
        executor = stack.start("executor", redis_url=redis_proxy.redis_url)
        stack.wait_ready(api)

        async def silence() -> None:
            assert await redis_proxy.command("silent") > 0

        events, _, unfinished = await _stream_answers(api.url, api.ws_url, silence)
        assert not unfinished, (unfinished, executor.output(2000))
        for session in events:
            finals = [e for e in session if e["type"] == "chat.response"]
            assert len(finals) == 1, [e["type"] for e in session]
            seqs = [e["data"]["seq"] for e in session if e["type"] == "chat.chunk"]
            assert seqs == list(range(1, len(seqs) + 1)), seqs
    finally:
        stack.stop()


async def test_answers_in_flight_resume_soon_after_redis_was_frozen_for_four_seconds(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """The same with every process on Redis directly and Redis frozen (SIGSTOP) for 4 s, as a
    stuck host or a long fork would: once Redis answers again, the api, the worker and the
    executor all reconnect within seconds, yet the answers that were streaming stayed frozen
    until the executor's dead-executor reclaim (30-45 s later)."""
    assert own_redis.process is not None
    stack = new_stack(own_redis, tmp_path / "logs")
    try:
        api = stack.start_api()
        stack.start("worker")
        executor = stack.start("executor")
        stack.wait_ready(api)

        async def freeze() -> None:
            os.kill(own_redis.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            try:
                await asyncio.sleep(4)  # the fault's length is the point: nothing to await
            finally:
                os.kill(own_redis.process.pid, signal.SIGCONT)  # type: ignore[union-attr]

        events, _, unfinished = await _stream_answers(api.url, api.ws_url, freeze)
        assert not unfinished, (unfinished, executor.output(2000))
        for session in events:
            assert [e["type"] for e in session if e["type"].startswith("chat.r")] == [
                "chat.response"
            ]
    finally:
        stack.stop()
