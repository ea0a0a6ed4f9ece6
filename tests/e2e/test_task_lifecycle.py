"""A task's life as a chat UI built from README sees it: `chat.cancel` over REST and the
socket, `chat.send` over both, retries, timeouts and `Idempotency-Key` replays. Real api,
worker and executor processes (or a test AES answering from the contract)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import Event, auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy, new_stack
from tests.e2e.external_aes import Aes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lifecycle_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def stack(
    lifecycle_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """api, worker and the reference executor; retries wait about a second (room to act on a
    task while it is `queued` for its next attempt)."""
    with deploy(
        lifecycle_redis,
        tmp_path_factory.mktemp("logs"),
        retry_backoff_seconds="1.0",
        retry_backoff_max_seconds="1.0",
        **FAST_EXECUTOR,
    ) as deployed:
        yield deployed


@pytest.fixture(scope="module")
def aes_less(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Child, RedisServer]]:
    """api and worker on a Redis of their own, no executor: the test answers as an AES."""
    server = RedisServer().start()
    lone: LocalStack = new_stack(
        server,
        tmp_path_factory.mktemp("logs"),
        retry_backoff_seconds="0.05",
        retry_backoff_max_seconds="0.1",
    )
    try:
        api = lone.start_api()
        lone.start("worker")
        lone.wait_ready(api)
        yield api, server
    finally:
        lone.stop()
        server.cleanup()


SLOW = {"simulate": {"chunk_delay_ms": 40, "repeat": 20}}
FINAL = {"chat.response", "chat.error", "chat.cancelled"}


async def act(ws: ClientConnection, kind: str, data: dict[str, Any]) -> None:
    await ws.send(json.dumps({"type": kind, "data": data}))


async def until_pong(ws: ClientConnection) -> list[Event]:
    """Everything before the pong of a ping sent now: frames are handled one at a time, so
    every frame sent before it has been acted on and answered by then."""
    await ws.send(json.dumps({"type": "ping"}))
    return (await events_until(ws, lambda e: e["type"] == "pong", timeout=10))[:-1]


async def slow_task(http: httpx.AsyncClient, api: str, tenant: str, session: str) -> str:
    reply = await send(
        http, api, tenant,
        {"message": "a long answer", "stream": True, "session_id": session, "context": SLOW},
    )  # fmt: skip
    assert reply.status_code == 202, reply.text
    return str(reply.json()["task_id"])


async def test_a_socket_cancel_carrying_a_request_id_cancels_the_task(stack: Deployment) -> None:
    """README ("Socket hygiene") answers a dropped `chat.send` or `chat.cancel` "with its
    `request_id`", and the project's own tests send `chat.cancel` with one
    (test_auth_and_input): a UI tags its cancel with a `request_id` to match a refusal to the
    button that sent it, and expects the task cancelled (`chat.cancelled`). Instead the cancel
    is refused, `chat.error` `validation_error` "Object contains unknown field
    `request_id`", and the answer keeps streaming: the Stop button does nothing."""
    api = stack.api
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        task_id = await slow_task(http, api.url, tenant, session)
        await events_until(ws, lambda e: e["type"] == "chat.chunk" and e["task_id"] == task_id)
        await act(ws, "chat.cancel", {"task_id": task_id, "request_id": "stop-1"})
        seen = await events_until(
            ws, lambda e: final_of(task_id)(e) or e["type"] == "chat.error", timeout=10
        )
        state = (await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))).json()
    await ws.close()
    assert seen[-1]["type"] == "chat.cancelled", seen[-1]
    assert state["status"] == "cancelled", state


async def test_a_socket_cancel_of_another_sessions_task_is_refused_on_that_socket(
    stack: Deployment,
) -> None:
    """A UI holds one socket, on the chat on screen, and offers Stop on a reply still running
    in another chat of the same user. The task was cancelled and its `chat.cancelled` went to
    the other session's sockets only: the socket that asked heard nothing, ever (a spinner for
    good). Like a socket's `chat.send` of another session, the cancel is refused on the
    socket that sent it (`bad_request`, its `request_id`), and the task is left running."""
    api = stack.api
    tenant, here, there = unique("t"), unique("s"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, here)
    other, _ = await connect(api.ws_url, tenant, there)
    async with httpx.AsyncClient() as http:
        task_id = await slow_task(http, api.url, tenant, there)
        await events_until(other, lambda e: e["type"] == "chat.chunk")
        await act(ws, "chat.cancel", {"task_id": task_id, "request_id": "stop-2"})
        here_saw = await until_pong(ws)
        ended = await events_until(other, final_of(task_id), timeout=30)
    await ws.close()
    await other.close()
    assert [(e["type"], e["data"]["code"], e["data"].get("request_id")) for e in here_saw] == [
        ("chat.error", "bad_request", "stop-2")
    ], here_saw
    assert ended[-1]["type"] == "chat.response", ended[-1]


async def test_socket_cancel_refusals_name_their_code_and_details(stack: Deployment) -> None:
    """Guard (no existing test cancels over the socket): a cancel of a finished task is
    `chat.error` `conflict` with `details.status`, of an unknown id or another tenant's task
    `not_found`, of a malformed id `validation_error`; the socket stays open, and none of
    these refusals claims to be the task's own end (no `task_id` on the frame)."""
    api = stack.api
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        done = await send(http, api.url, tenant, {"message": "quick", "session_id": session})
        done_id = done.json()["task_id"]
        await events_until(ws, final_of(done_id))
        foreign = await send(http, api.url, unique("t"), {"message": "not yours"})
        foreign_id = foreign.json()["task_id"]
    cases = [
        (done_id, "conflict", {"status": "completed"}),
        ("no-such-task", "not_found", {}),
        (foreign_id, "not_found", {}),
        ("bad id!", "validation_error", {}),
    ]
    for task_id, code, details in cases:
        await act(ws, "chat.cancel", {"task_id": task_id})
        answer = await until_pong(ws)
        assert len(answer) == 1, answer
        assert answer[0]["type"] == "chat.error", answer
        assert answer[0]["data"]["code"] == code, answer
        assert answer[0]["data"]["details"] == details, answer
        assert "task_id" not in answer[0], answer
    await ws.close()


async def test_a_cancel_racing_the_answer_gives_one_final_event_that_status_agrees_with(
    stack: Deployment,
) -> None:
    """Guard: a cancel sent right after a short send either wins (200, `chat.cancelled`, the
    task `cancelled`) or loses (409 `conflict` naming the final status, the answer stands):
    one final event each, the status endpoint says the same, nothing of the task after it."""
    api = stack.api
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    outcomes: list[tuple[int, str]] = []
    async with httpx.AsyncClient() as http:
        for i in range(6):
            reply = await send(
                http, api.url, tenant, {"message": f"race {i}", "session_id": session}
            )
            task_id = reply.json()["task_id"]
            cancel = await http.post(
                f"{api.url}/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant)
            )
            seen = await events_until(ws, final_of(task_id))
            state = (
                await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
            ).json()
            finals = [e for e in seen if e.get("task_id") == task_id and e["type"] in FINAL]
            assert len(finals) == 1, seen
            if cancel.status_code == 200:
                assert finals[0]["type"] == "chat.cancelled"
                assert state["status"] == "cancelled"
            else:
                assert cancel.status_code == 409, cancel.text
                assert cancel.json()["error"]["details"] == {"status": state["status"]}
                assert finals[0]["type"] == "chat.response"
            outcomes.append((cancel.status_code, state["status"]))
        marker = await send(http, api.url, tenant, {"message": "after", "session_id": session})
        tail = await events_until(ws, final_of(marker.json()["task_id"]))
    await ws.close()
    assert [e for e in tail if e.get("task_id") != marker.json()["task_id"]] == []


async def test_a_task_cancelled_while_queued_for_its_retry_stays_cancelled(
    stack: Deployment,
) -> None:
    """Guard: a task whose first attempt failed waits `queued` for its retry; a socket cancel
    then ends it (`chat.cancelled`), and the retry's timer firing later adds nothing: no
    chunk, status or answer of it reaches the session, and the task stays `cancelled`."""
    api = stack.api
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "flaky", "stream": True, "session_id": session,
             "context": {"simulate": {"fail_attempts": 1}}},
        )  # fmt: skip
        task_id = reply.json()["task_id"]
        await events_until(
            ws, lambda e: e["type"] == "chat.status" and e["data"]["status"] == "queued"
        )
        await act(ws, "chat.cancel", {"task_id": task_id})
        ended = await events_until(ws, final_of(task_id), timeout=10)
        # The marker answers after 2.5 s: the retry (due within a second) has fired by then.
        marker = await send(
            http, api.url, tenant,
            {"message": "marker", "session_id": session,
             "context": {"simulate": {"delay_ms": 2500}}},
        )  # fmt: skip
        tail = await events_until(ws, final_of(marker.json()["task_id"]))
        state = (await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))).json()
    await ws.close()
    assert ended[-1]["type"] == "chat.cancelled"
    assert [e for e in tail if e.get("task_id") == task_id] == []
    assert state["status"] == "cancelled"
    assert state["attempt"] == 2


def chunks_shown(events: list[Event], task_id: str) -> str:
    """What a UI following README shows: chunks keyed by `seq`, all dropped when a
    `chat.status` or a `chat.chunk` names a higher `attempt` (README, Retries)."""
    attempt, shown = 1, {}
    for e in events:
        if e.get("task_id") != task_id or e["type"] not in ("chat.status", "chat.chunk"):
            continue
        if e["data"]["attempt"] > attempt:
            attempt, shown = e["data"]["attempt"], {}
        if e["type"] == "chat.chunk" and e["data"]["attempt"] == attempt:
            shown.setdefault(e["data"]["seq"], e["data"]["delta"])
    return "".join(shown[k] for k in sorted(shown))


async def test_a_retried_task_s_chunks_name_their_attempt(
    aes_less: tuple[Child, RedisServer],
) -> None:
    """A retry's chunks start again at `seq` 1. README's event table said "1, 2, ... per
    task" and the frames said no `attempt`: only a client that saw the retry's `chat.status`
    (not one resumed past it: `resumed: false`, `resume_gap`) could tell attempt 2's seq 1
    from attempt 1's, and one keying chunks by `task_id` + `seq` showed the failed attempt's
    words. Each chunk now names its attempt, and README says seq counts per attempt."""
    api, server = aes_less
    redis = Redis.from_url(server.url)
    aes = Aes(redis, "ui-review")
    try:
        await aes.ensure_group()
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(api.ws_url, tenant, session)
        async with httpx.AsyncClient() as http:
            reply = await send(
                http, api.url, tenant, {"message": "hi", "stream": True, "session_id": session}
            )
            task_id = reply.json()["task_id"]
            stream, entry, action = await aes.take(task_id, attempt=1)
            for seq, delta in enumerate(["Wrong ", "start "], start=1):
                await aes.answer(
                    action, {"action_type": "execution.chunk", "seq": seq, "delta": delta}
                )
            await aes.answer(
                action, {"action_type": "execution.failed", "error": "gpu lost", "retryable": True}
            )
            await aes.ack(stream, entry)
            stream, entry, action = await aes.take(task_id, attempt=2)
            for seq, delta in enumerate(["Right ", "answer"], start=1):
                await aes.answer(
                    action, {"action_type": "execution.chunk", "seq": seq, "delta": delta}
                )
            await aes.answer(
                action, {"action_type": "execution.completed", "content": "Right answer"}
            )
            await aes.ack(stream, entry)
            events = await events_until(ws, final_of(task_id))
        await ws.close()
    finally:
        await redis.aclose()
    chunks = [e for e in events if e["type"] == "chat.chunk"]
    assert [e["data"]["delta"] for e in chunks] == ["Wrong ", "start ", "Right ", "answer"]
    assert chunks_shown(events, task_id) == "Right answer"  # with the retry's chat.status
    # Without it (a client resumed past it): keyed by task_id + seq, per README.
    assert [(e["data"]["seq"], e["data"]["attempt"]) for e in chunks] == [
        (1, 1), (2, 1), (1, 2), (2, 2)
    ]  # fmt: skip
    without_status = [e for e in events if e["type"] != "chat.status"]  # resumed past it
    assert chunks_shown(without_status, task_id) == "Right answer"


async def test_socket_and_rest_sends_interleaved_keep_order_and_request_ids(
    stack: Deployment,
) -> None:
    """Guard: a socket `chat.send` with `request_id`, a REST send, a socket send without one
    and a refused socket send are answered in the order sent; each accepted task's first
    `chat.status` carries its own `request_id` (none when none was given), a refusal
    `chat.error` with its `request_id` and no `task_id`; each task ends once."""
    api = stack.api
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        await act(ws, "chat.send", {"message": "one", "request_id": "r1"})
        events = await until_pong(ws)  # handled before the REST send is made
        rest = await send(
            http, api.url, tenant,
            {"message": "two", "session_id": session, "request_id": "r2"},
        )  # fmt: skip
        assert rest.status_code == 202
        await act(ws, "chat.send", {"message": "three"})
        await act(ws, "chat.send", {"message": "", "request_id": "r4"})
        await act(
            ws, "chat.send", {"message": "five", "session_id": unique("s"), "request_id": "r5"}
        )

        def all_in(_: Event) -> bool:
            tasks = [e["task_id"] for e in events if e["type"] == "chat.status"]
            ended = {e["task_id"] for e in events if e["type"] in FINAL and "task_id" in e}
            refused = [e for e in events if e["type"] == "chat.error" and "task_id" not in e]
            return len(tasks) == 3 and ended >= set(tasks) and len(refused) == 2

        while not all_in({}):
            events += await events_until(ws, lambda e: True)
        statuses = [e for e in events if e["type"] == "chat.status"]
        tasks = [e["task_id"] for e in statuses]
    await ws.close()
    assert [e["data"].get("request_id") for e in statuses] == ["r1", "r2", None]
    assert tasks[1] == rest.json()["task_id"]
    refusals = [e for e in events if e["type"] == "chat.error" and "task_id" not in e]
    assert [(e["data"]["request_id"], e["data"]["code"]) for e in refusals] == [
        ("r4", "validation_error"),
        ("r5", "bad_request"),
    ]
    for task_id in tasks:
        assert len([e for e in events if final_of(task_id)(e)]) == 1


async def test_idempotent_replays_after_the_task_ended(stack: Deployment) -> None:
    """Guard: a replayed `Idempotency-Key` after the task completed, or failed, answers 202
    with that task, its final status, `Idempotent-Replayed: true` and the `RateLimit-*`
    headers, and enqueues nothing; another message under a used key is 422
    `idempotency_key_reused`."""
    api = stack.api
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    cases = [
        ({"message": "fine", "session_id": session}, "completed"),
        ({"message": "doomed", "session_id": session,
          "context": {"simulate": {"fail_attempts": 1, "retryable": False}}}, "failed"),
    ]  # fmt: skip
    async with httpx.AsyncClient() as http:
        for body, status in cases:
            key = unique("k")
            first = await send(http, api.url, tenant, body, **{"Idempotency-Key": key})
            task_id = first.json()["task_id"]
            await events_until(ws, final_of(task_id))
            again = await send(http, api.url, tenant, body, **{"Idempotency-Key": key})
            assert again.status_code == 202, again.text
            assert again.json() == {"task_id": task_id, "status": status, "session_id": session}
            assert again.headers["Idempotent-Replayed"] == "true"
            for header in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
                assert header in again.headers, again.headers
            other = await send(
                http, api.url, tenant, {**body, "message": "else"}, **{"Idempotency-Key": key}
            )
            assert other.status_code == 422
            assert other.json()["error"]["code"] == "idempotency_key_reused"
        quiet = await until_pong(ws)
    await ws.close()
    assert quiet == [], quiet  # no task was made by the replays


async def test_a_cancelled_tasks_error_has_the_documented_shape(stack: Deployment) -> None:
    """README: "Errors have one shape everywhere: {"error": {"code", "message", "details"}}",
    and a failed or timed-out task's `error` in `GET /api/chat/tasks/{id}` has it. A UI that
    reads `task.error.details` expects an object for a cancelled task too; instead the
    cancelled task's `error` is `{"code": "cancelled", "message": "cancelled by client"}`,
    without `details`."""
    api = stack.api
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        reply = await send(
            http, api.url, tenant,
            {"message": "slow", "session_id": session,
             "context": {"simulate": {"delay_ms": 3000}}},
        )  # fmt: skip
        task_id = reply.json()["task_id"]
        cancel = await http.post(
            f"{api.url}/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant)
        )
        assert cancel.status_code == 200
        await events_until(ws, final_of(task_id))
        state = (await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))).json()
    await ws.close()
    assert state["status"] == "cancelled"
    assert set(state["error"]) == {"code", "message", "details"}, state["error"]


async def test_a_stream_cut_by_its_tiers_timeout(
    stack: Deployment, lifecycle_redis: RedisServer
) -> None:
    """Guard: a task streaming past its tier's `taskTimeoutSeconds` ends with `chat.error`
    `timed_out` (after the chunks it got), nothing of it arrives later, the status endpoint
    says `timed_out` with that error, and a cancel of it is 409 naming `timed_out`."""
    api = stack.api
    redis = Redis.from_url(lifecycle_redis.url)
    try:
        tenant, session = unique("t"), unique("s")
        await QuotaStore(redis, load_settings()).set(tenant, "pro", {"taskTimeoutSeconds": 1})
        ws, _ = await connect(api.ws_url, tenant, session)
        async with httpx.AsyncClient() as http:
            reply = await send(
                http, api.url, tenant,
                {"message": "long", "stream": True, "session_id": session,
                 "context": {"simulate": {"chunk_delay_ms": 200, "repeat": 20}}},
            )  # fmt: skip
            task_id = reply.json()["task_id"]
            events = await events_until(ws, final_of(task_id), timeout=10)
            marker = await send(
                http, api.url, tenant,
                {"message": "after", "session_id": session,
                 "context": {"simulate": {"delay_ms": 600}}},
            )  # fmt: skip
            tail = await events_until(ws, final_of(marker.json()["task_id"]))
            state = (
                await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
            ).json()
            cancel = await http.post(
                f"{api.url}/api/chat/cancel", json={"task_id": task_id}, headers=auth(tenant)
            )
        await ws.close()
    finally:
        await redis.aclose()
    assert [e["type"] for e in events if e["type"] != "chat.chunk"] == ["chat.status", "chat.error"]
    assert any(e["type"] == "chat.chunk" for e in events)
    assert events[-1]["data"]["code"] == "timed_out"
    assert [e for e in tail if e.get("task_id") == task_id] == []
    assert state["status"] == "timed_out"
    assert state["error"]["code"] == "timed_out"
    assert cancel.status_code == 409
    assert cancel.json()["error"] == {
        "code": "conflict",
        "message": f"task {task_id} is already timed_out",
        "details": {"status": "timed_out"},
    }


async def test_a_socket_send_refused_by_a_rate_limit_says_when_to_send_again_as_readme_does(
    stack: Deployment, lifecycle_redis: RedisServer
) -> None:
    """README ("Socket hygiene") names one wait for a socket `chat.error` `rate_limited`:
    `details.retry_in_ms` ("send it again" then; said of `details.scope` `frames`), and
    nothing else for the other scopes. A UI written from that reads
    `details.retry_in_ms` on every `rate_limited` `chat.error`; for a send refused by the
    session's (or tenant's) requests-per-minute limit it finds none: the details there are
    `{"scope", "limit", "remaining", "retryAfter" (seconds), "reset"}`, a field README never
    names, so the UI resends at once (`undefined` ms) and is refused again and again."""
    api = stack.api
    redis = Redis.from_url(lifecycle_redis.url)
    try:
        tenant, session = unique("t"), unique("s")
        await QuotaStore(redis, load_settings()).set(
            tenant, "pro", {"requestsPerMinutePerSession": 1}
        )
        ws, _ = await connect(api.ws_url, tenant, session)
        await act(ws, "chat.send", {"message": "one", "request_id": "r1"})
        await act(ws, "chat.send", {"message": "two", "request_id": "r2"})
        refused = await events_until(ws, lambda e: e["type"] == "chat.error", timeout=10)
        await ws.close()
    finally:
        await redis.aclose()
    data = refused[-1]["data"]
    assert (data["code"], data["request_id"], data["details"]["scope"]) == (
        "rate_limited",
        "r2",
        "session",
    )
    assert isinstance(data["details"].get("retry_in_ms"), int), data
