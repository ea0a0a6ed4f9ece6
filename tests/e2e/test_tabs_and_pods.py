"""A frontend developer's view: one chat session open in several tabs, on two api pods, with
resumes, socket limits and pods that go away. Real Redis, two real api processes, a worker
and an executor; real WebSocket clients built from README's "WebSocket" section."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from tests.e2e.clients import (
    Event,
    connect,
    events_until,
    final_of,
    next_event,
    send,
    token,
    unique,
)
from tests.e2e.conftest import FAST_EXECUTOR, new_stack, redis_client

pytestmark = pytest.mark.e2e

SLOW = {"simulate": {"chunk_delay_ms": 25, "repeat": 6}}


@pytest.fixture(scope="module")
def pods(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child, Child]]:
    stack = new_stack(
        e2e_redis, tmp_path_factory.mktemp("logs"), connection_ttl_seconds="3", **FAST_EXECUTOR
    )
    try:
        a, b = stack.start_api(), stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(a, b)
        yield stack, a, b
    finally:
        stack.stop()


@pytest.fixture
async def rc(e2e_redis: RedisServer) -> AsyncIterator[Redis]:
    client = redis_client(e2e_redis)
    yield client
    await client.aclose()


async def task_of(http: httpx.AsyncClient, base: str, tenant: str, **body: Any) -> str:
    """Send a message by REST (README's `send`); the task id."""
    reply = await send(http, base, tenant, body)
    assert reply.status_code == 202, reply.text
    return str(reply.json()["task_id"])


def ids_of(events: list[Event]) -> list[str]:
    return [e["id"] for e in events]


def as_int(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


async def ping_id(ws: Any) -> str:
    """The socket's cursor (README: `pong` carries the id of the last session event given)."""
    await ws.send('{"type": "ping"}')
    pong = await next_event(ws)
    assert pong["type"] == "pong", pong
    return str(pong["id"])


async def test_tabs_on_two_pods_see_one_sequence_and_a_tab_resuming_elsewhere_joins_it(
    pods: tuple[LocalStack, Child, Child],
) -> None:
    """Three tabs of one session (pod A, pod B, pod B) get the very same events, once, in the
    same order, for messages sent by REST and by a tab's `chat.send`; a fourth tab on A drops
    mid-answer and resumes on B while the answer keeps streaming: what it saw plus what the
    resume gave is exactly the sequence the other tabs saw."""
    _, a, b = pods
    tenant, session = unique("t"), unique("s")
    tabs = [
        (await connect(a.ws_url, tenant, session))[0],
        (await connect(b.ws_url, tenant, session))[0],
        (await connect(b.ws_url, tenant, session))[0],
    ]
    roaming, _ = await connect(a.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        first = await task_of(
            http, a.url, tenant, message="one", stream=True, session_id=session, context=SLOW
        )
        # The roaming tab reads a few events of the answer, then its network drops.
        seen: list[Event] = []
        while len(seen) < 4:
            seen.append(await next_event(roaming))
        roaming.transport.abort()  # the network drops: no close frame
        second = await task_of(
            http, b.url, tenant, message="two", stream=True, session_id=session, context=SLOW
        )
        resumed, ack = await connect(b.ws_url, tenant, session, last_event_id=seen[-1]["id"])
        assert ack["data"]["resumed"] is True, ack
        assert ack["id"] == seen[-1]["id"], "the ack stands where the client stood"
        # A tab sends by socket too.
        three = {"message": "three", "session_id": session, "stream": True, "request_id": "r3"}
        await tabs[0].send(json.dumps({"type": "chat.send", "data": three}))

        def third_final(e: Event) -> bool:
            return e["type"] == "chat.response" and e.get("task_id") not in (first, second)

        got = [await events_until(ws, third_final) for ws in tabs]
        rest = await events_until(resumed, third_final)
    reference = ids_of(got[0])
    for n, events in enumerate(got):
        assert ids_of(events) == reference, f"tab {n} saw another sequence"
        assert len(set(ids_of(events))) == len(events), f"tab {n} got an event twice"
        assert [as_int(i) for i in ids_of(events)] == sorted(as_int(i) for i in ids_of(events))
    roamed = ids_of(seen) + ids_of(rest)
    assert roamed == reference, "the resumed tab lost or repeated events"
    for task in (first, second):
        mine = [e for e in got[0] if e.get("task_id") == task]
        chunks = [e["data"]["seq"] for e in mine if e["type"] == "chat.chunk"]
        assert chunks
        assert chunks == list(range(1, len(chunks) + 1))
    for ws in [*tabs, resumed]:
        await ws.close()


async def test_resume_from_the_middle_and_from_the_newest_on_the_other_pod(
    pods: tuple[LocalStack, Child, Child],
) -> None:
    """A tab reopened on the other pod with an id from the middle gets exactly the events after
    it; with the newest id it gets nothing, and its cursor (`pong`'s id) is that id; the next
    event then arrives once."""
    _, a, b = pods
    tenant, session = unique("t"), unique("s")
    tab, _ = await connect(a.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        task = await task_of(http, a.url, tenant, message="x", stream=True, session_id=session)
        everything = await events_until(tab, final_of(task))
        middle = len(everything) // 2
        ws, ack = await connect(b.ws_url, tenant, session, last_event_id=everything[middle]["id"])
        assert ack["data"]["resumed"] is True
        replay = await events_until(ws, final_of(task))
        assert ids_of(replay) == ids_of(everything[middle + 1 :])
        await ws.close()
        newest = everything[-1]["id"]
        ws, ack = await connect(b.ws_url, tenant, session, last_event_id=newest)
        assert ack["data"]["resumed"] is True
        assert ack["id"] == newest
        assert ack["data"]["last_event_id"] == newest
        assert await ping_id(ws) == newest, "nothing replayed after the newest id"
        task2 = (await send(http, a.url, tenant, {"message": "y", "session_id": session})).json()[
            "task_id"
        ]
        later = await events_until(ws, final_of(task2))
        assert ids_of(later) == ids_of(await events_until(tab, final_of(task2)))
        await ws.close()
    await tab.close()


async def test_resume_from_an_id_the_log_never_had_is_refused_not_replayed(
    pods: tuple[LocalStack, Child, Child],
) -> None:
    """An id from the future (a clock of another machine, another session's id) cannot be
    proved: README says the ack is `resumed: false` and the client fetches history. The
    socket then delivers live events from the newest on."""
    _, a, b = pods
    tenant, session = unique("t"), unique("s")
    tab, _ = await connect(a.ws_url, tenant, session)
    async with httpx.AsyncClient() as http:
        task = (await send(http, a.url, tenant, {"message": "x", "session_id": session})).json()[
            "task_id"
        ]
        everything = await events_until(tab, final_of(task))
        newest = everything[-1]["id"]
        ms, _seq = as_int(newest)
        future = f"{ms + 3_600_000}-0"
        ws, ack = await connect(b.ws_url, tenant, session, last_event_id=future)
        assert ack["data"]["resumed"] is False, ack
        assert ack["id"] == newest, ack
        task2 = (await send(http, b.url, tenant, {"message": "y", "session_id": session})).json()[
            "task_id"
        ]
        live = await events_until(ws, final_of(task2))
        assert {e.get("task_id") for e in live} == {task2}
        await ws.close()
    await tab.close()


async def test_the_tenant_socket_limit_holds_for_handshakes_racing_on_two_pods_and_frees_at_once(
    pods: tuple[LocalStack, Child, Child], rc: Redis
) -> None:
    """maxConnections 3; eight tabs open at the same moment, half on each pod: three are
    admitted, five are closed 1008 `connection_limit: ...`. Closing one admitted tab lets a
    new tab in on the other pod within a second (no wait for an expiry)."""
    _, a, b = pods
    tenant = unique("t")
    store = QuotaStore(rc, load_settings(default_tier="free"))
    await store.set(tenant, "free", {"maxConnections": 3})

    async def open_tab(base: str) -> tuple[Any, Event | None, int | None, str]:
        ws = await websockets.connect(
            f"{base}/ws/{tenant}/{unique('s')}",
            subprotocols=["orchestrator.v1", f"bearer.{token(tenant)}"],  # type: ignore[list-item]
            open_timeout=10,
        )
        try:
            return ws, await next_event(ws, 10), None, ""
        except ConnectionClosed as closed:
            rcvd = closed.rcvd
            return ws, None, rcvd.code if rcvd else -1, rcvd.reason if rcvd else ""

    results = await asyncio.gather(*(open_tab(p.ws_url) for p in [a, b] * 4))
    admitted = [r for r in results if r[1] is not None]
    refused = [r for r in results if r[1] is None]
    assert len(admitted) == 3, [(r[2], r[3]) for r in results]
    assert all(
        code == 1008 and reason.startswith("connection_limit") for _, _, code, reason in refused
    )
    gone = admitted[0][0]
    await gone.close()
    await gone.wait_closed()
    # The pod holding it releases the slot once it has read the close: soon, not before the
    # client's close returns. Within a second, a new tab gets in (no wait for an expiry).
    deadline = asyncio.get_running_loop().time() + 1.0
    while True:
        ws, ack, code, reason = await open_tab(b.ws_url)
        if ack is not None or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert ack is not None, f"a freed slot was not free within a second: {code} {reason}"
    for tab in [ws, *(r[0] for r in admitted[1:])]:
        await tab.close()


async def test_a_pod_killed_mid_answer_the_tab_resumes_on_the_other_pod_without_loss(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    """SIGKILL of the tab's pod mid-answer: the client sees an abnormal close (1006, no close
    frame), reconnects to the other pod with its last id, `resumed: true`, and gets the rest
    of the answer once."""
    stack = new_stack(e2e_redis, tmp_path / "logs", **FAST_EXECUTOR)
    try:
        doomed, staying = stack.start_api(), stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(doomed, staying)
        tenant, session = unique("t"), unique("s")
        tab, _ = await connect(doomed.ws_url, tenant, session)
        witness, _ = await connect(staying.ws_url, tenant, session)
        async with httpx.AsyncClient() as http:
            task = await task_of(
                http,
                staying.url,
                tenant,
                message="x",
                stream=True,
                session_id=session,
                context=SLOW,
            )
            seen = [await next_event(tab) for _ in range(3)]
            stack.stop_child(doomed, signal.SIGKILL)
            rcvd = "open"
            try:
                while True:
                    seen.append(await next_event(tab))
            except ConnectionClosed as closed:
                rcvd = closed.rcvd
            assert rcvd is None, "a killed pod sends no close frame"
            ws, ack = await connect(staying.ws_url, tenant, session, last_event_id=seen[-1]["id"])
            assert ack["data"]["resumed"] is True
            done = any(final_of(task)(e) for e in seen)
            rest = [] if done else await events_until(ws, final_of(task))
            full = await events_until(witness, final_of(task))
            assert ids_of(seen) + ids_of(rest) == ids_of(full)
            await ws.close()
            await witness.close()
    finally:
        stack.stop()
