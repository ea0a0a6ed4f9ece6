"""Retries, drain and resume on real processes: the client sees one answer and loses nothing."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from services.cli.embedded import RedisServer
from tests.e2e.clients import Event, auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, new_stack

pytestmark = pytest.mark.e2e


async def test_a_retryable_failure_is_retried_and_the_client_sees_one_answer(
    deployment: Deployment,
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, deployment.api.url, tenant,
            {"message": "third time lucky", "stream": True, "session_id": session,
             "context": {"simulate": {"fail_attempts": 2}}},
        )  # fmt: skip
        task_id = reply.json()["task_id"]
        events = await events_until(ws, final_of(task_id))
        state = await http.get(
            f"{deployment.api.url}/api/chat/tasks/{task_id}", headers=auth(tenant)
        )
    statuses = [
        (e["data"]["status"], e["data"]["attempt"]) for e in events if e["type"] == "chat.status"
    ]
    assert statuses == [("processing", 1), ("queued", 2), ("queued", 3)]
    answers = [e for e in events if e["type"] == "chat.response"]
    assert len(answers) == 1
    assert "third time lucky" in answers[0]["data"]["content"]
    assert not [e for e in events if e["type"] == "chat.error"]
    assert state.json()["status"] == "completed"
    assert state.json()["attempt"] == 3
    await ws.close()


@pytest.mark.parametrize(
    ("simulate", "attempts"),
    [({"fail_attempts": 10}, 3), ({"fail_attempts": 1, "retryable": False}, 1)],
    ids=["exhausted", "not-retryable"],
)
async def test_a_task_that_keeps_failing_ends_failed_and_the_client_is_told(
    deployment: Deployment, simulate: dict[str, object], attempts: int
) -> None:
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(deployment.api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, deployment.api.url, tenant,
            {"message": "doomed", "session_id": session, "context": {"simulate": simulate}},
        )  # fmt: skip
        task_id = reply.json()["task_id"]
        events = await events_until(ws, final_of(task_id))
        state = await http.get(
            f"{deployment.api.url}/api/chat/tasks/{task_id}", headers=auth(tenant)
        )
    assert events[-1]["type"] == "chat.error"
    assert events[-1]["data"]["attempts"] == attempts
    assert events[-1]["data"]["details"] == {"attempts": attempts}  # README: errors have details
    assert state.json()["status"] == "failed"
    assert state.json()["error"]["code"] == "execution_failed"
    await ws.close()


async def test_sigterm_drains_sockets_with_1012_and_clients_resume_elsewhere(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stack = new_stack(
        e2e_redis, tmp_path_factory.mktemp("logs"), drain_seconds="1.5", **FAST_EXECUTOR
    )
    try:
        leaving, staying = stack.start_api(), stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(leaving, staying)
        tenant = unique("t")
        sessions = [unique("s") for _ in range(5)]
        sockets = [(await connect(leaving.ws_url, tenant, s))[0] for s in sessions]
        slow = {"simulate": {"chunk_delay_ms": 30, "repeat": 8}}
        async with httpx.AsyncClient() as http:
            tasks = [
                (await send(http, staying.url, tenant,
                            {"message": f"long {s}", "stream": True, "session_id": s,
                             "context": slow})).json()["task_id"]
                for s in sessions
            ]  # fmt: skip

            seen: dict[str, list[Event]] = {s: [] for s in sessions}

            async def follow(session: str, ws: object) -> int:
                try:
                    while True:
                        seen[session] += await events_until(ws, lambda e: True)  # type: ignore[arg-type]
                except ConnectionClosed as closed:
                    return closed.rcvd.code if closed.rcvd is not None else -1

            followers = [
                asyncio.create_task(follow(s, ws)) for s, ws in zip(sessions, sockets, strict=True)
            ]
            await asyncio.sleep(0.1)
            leaving.process.send_signal(signal.SIGTERM)
            ready = await http.get(f"{leaving.url}/health/ready")
            assert ready.status_code == 503
            codes = await asyncio.gather(*followers)
            assert codes == [1012] * len(sessions)
            # uvicorn re-raises the signal after its graceful shutdown (exit status 143).
            assert leaving.process.wait(timeout=15) in (0, -signal.SIGTERM)
            assert "stopped after draining" in leaving.output()

            for session, task_id in zip(sessions, tasks, strict=True):
                last = seen[session][-1]["id"] if seen[session] else "0-0"
                ws, ack = await connect(staying.ws_url, tenant, session, last_event_id=last)
                assert ack["data"]["resumed"] is True
                done = any(final_of(task_id)(e) for e in seen[session])
                rest = [] if done else await events_until(ws, final_of(task_id))
                events = [e for e in seen[session] + rest if e.get("task_id") == task_id]
                ids = [e["id"] for e in events]
                assert len(ids) == len(set(ids)), "no event twice"
                chunks = [e["data"]["seq"] for e in events if e["type"] == "chat.chunk"]
                assert chunks == list(range(1, len(chunks) + 1)), "no event lost"
                assert events[-1]["type"] == "chat.response"
                await ws.close()
    finally:
        stack.stop()


async def test_a_stalled_task_times_out_at_its_deadline_and_late_callbacks_are_dropped(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from redis.asyncio import Redis

    from services.core import keys
    from services.core.actions import ACTION_FIELD, ExecutionCompleted, encode_action
    from services.core.quotas import QuotaStore
    from services.core.settings import load_settings

    stack = new_stack(e2e_redis, tmp_path_factory.mktemp("logs"), **FAST_EXECUTOR)
    redis = Redis.from_url(e2e_redis.url)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        tenant, session = unique("t"), unique("s")
        store = QuotaStore(redis, load_settings())
        await store.set(tenant, "pro", {"taskTimeoutSeconds": 1})
        ws, _ = await connect(api.ws_url, tenant, session)
        async with httpx.AsyncClient() as http:
            reply = await send(
                http, api.url, tenant,
                {"message": "never answered", "session_id": session,
                 "context": {"simulate": {"stall": True}}},
            )  # fmt: skip
            task_id = reply.json()["task_id"]
            events = await events_until(ws, final_of(task_id), timeout=10)
            assert events[-1]["type"] == "chat.error"
            assert events[-1]["data"]["code"] == "timed_out"
            late = ExecutionCompleted(
                attempt=1, tenant_id=tenant, session_id=session, task_id=task_id, content="too late"
            )
            partition = keys.partition_of(tenant, session, 8)
            await redis.xadd(keys.callback_stream(partition), {ACTION_FIELD: encode_action(late)})
            marker = await send(http, api.url, tenant, {"message": "after", "session_id": session})
            after = await events_until(ws, final_of(marker.json()["task_id"]))
            assert not [e for e in after if e.get("task_id") == task_id], "late answer dropped"
            state = await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
            assert state.json()["status"] == "timed_out"
        await ws.close()
    finally:
        await redis.aclose()
        stack.stop()
