"""Chats in flight while Redis loses a node: real clients that reconnect, resend and count.

Every session holds a socket that reconnects (to any live api) with `last_event_id`, and sends
its messages one after another over REST with an `Idempotency-Key`, retrying while the api
answers 503. While the answers stream, a fault is injected (a cluster node killed and
restarted, a Sentinel primary killed). The tally compares what each answer consists of (the
reference executor's reply is deterministic: status, chunks 1..n, response) with what the
client received: events lost, events duplicated, answers that ended in an error, answers
that never ended, and how long after the fault a new message was answered again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.cli.stack import Child
from services.executor.agent import chunks_of, reply_for
from tests.e2e.clients import Event, auth, token

FINAL = {"chat.response", "chat.error", "chat.cancelled"}
SEND_DEADLINE_SECONDS = 60.0


@dataclass
class Task:
    task_id: str
    message: str
    sent_at: float  # first attempt to send it
    accepted_at: float
    final_at: float | None = None
    gone: bool = False  # after a resume gap, the task's state answered 404: lost with Redis
    events: list[Event] = field(default_factory=list)


@dataclass
class Tally:
    """What the clients saw; `sent` counts the events the answers consist of."""

    messages: int = 0
    completed: int = 0
    failed: int = 0  # ended with chat.error: a clear error
    unfinished: int = 0  # no final event within the bound
    gone: int = 0  # accepted, then lost with Redis's data: the client was told (gap, 404)
    sent: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    same_id_twice: int = 0  # one event delivered twice (a replay bug, never acceptable)
    unavailable_notices: int = 0
    resume_gaps: int = 0
    reconnects: int = 0
    refused_sends: int = 0  # 503 answers that were retried
    recovered_after: float | None = None  # fault -> first answer to a message sent after it
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        recovered = "n/a" if self.recovered_after is None else f"{self.recovered_after:.2f} s"
        return (
            f"{self.messages} messages: {self.completed} answered, {self.failed} failed with "
            f"an error, {self.gone} lost with Redis's data (resume gap, then 404), "
            f"{self.unfinished} unfinished; events sent {self.sent}, received "
            f"{self.received}, lost {self.lost}, duplicated {self.duplicated}; "
            f"{self.unavailable_notices} 'unavailable' notices, {self.resume_gaps} resume gaps, "
            f"{self.reconnects} reconnects, {self.refused_sends} sends refused (503) and "
            f"retried; a new message answered {recovered} after the fault"
        )


class Conversation:
    """One session's socket and messages."""

    def __init__(
        self, apis: list[Child], tenant: str, session: str, simulate: dict[str, Any]
    ) -> None:
        self.apis = apis
        self.tenant = tenant
        self.session = session
        self.simulate = simulate
        self.ws: ClientConnection | None = None
        self.last_event_id = "0-0"
        self.tasks: list[Task] = []
        self.notices = Counter[str]()
        self.reconnects = 0
        self.refused = 0

    def live_apis(self) -> list[Child]:
        return [api for api in self.apis if api.alive()]

    async def connect(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            for api in self.live_apis():
                url = f"{api.ws_url}/ws/{self.tenant}/{self.session}"
                url += f"?last_event_id={self.last_event_id}"
                try:
                    self.ws = await websockets.connect(
                        url,
                        subprotocols=["orchestrator.v1", f"bearer.{token(self.tenant)}"],  # type: ignore[list-item]
                        open_timeout=5,
                    )
                    ack = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
                except (OSError, ConnectionClosed, InvalidStatus, TimeoutError):
                    continue
                if ack["type"] != "connection.ack":
                    continue
                if ack["data"]["resumed"] is False:
                    self.notices["resume_refused"] += 1
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"session {self.session}: could not connect")

    async def send(self, http: httpx.AsyncClient, message: str, key: str) -> Task:
        started = time.monotonic()
        body = {
            "message": message,
            "stream": True,
            "session_id": self.session,
            "context": {"simulate": self.simulate},
        }
        delay = 0.05
        while time.monotonic() - started < SEND_DEADLINE_SECONDS:
            for api in self.live_apis():
                try:
                    reply = await http.post(
                        f"{api.url}/api/chat/send",
                        json=body,
                        headers={**auth(self.tenant), "Idempotency-Key": key},
                    )
                except httpx.TransportError:
                    continue
                if reply.status_code == 202:
                    task = Task(reply.json()["task_id"], message, started, time.monotonic())
                    self.tasks.append(task)
                    return task
                self.refused += 1
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
        raise AssertionError(f"session {self.session}: message not accepted in time")

    async def final_of(self, task: Task, timeout: float, http: httpx.AsyncClient) -> None:
        """Read events (reconnecting as needed) until the task's final event, or the bound.

        After a resume gap the client does what the README says: it fetches the task's state,
        and stops waiting when the task no longer exists.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ws is None:
                await self.connect(deadline)
                self.reconnects += 1
            assert self.ws is not None
            try:
                raw = await asyncio.wait_for(self.ws.recv(), max(0.1, deadline - time.monotonic()))
            except ConnectionClosed:
                self.ws = None
                continue
            except TimeoutError:
                return
            event = json.loads(raw)
            self.last_event_id = event.get("id", self.last_event_id)
            if event["type"] == "error":
                code = event["data"].get("code", "?")
                self.notices[code] += 1
                if code == "resume_gap" and await self._gone(task, http):
                    task.gone = True
                    return
                continue
            if event["type"] in ("connection.ack", "pong"):
                continue
            for mine in self.tasks:
                if mine.task_id == event.get("task_id"):
                    mine.events.append(event)
            if event.get("task_id") == task.task_id and event["type"] in FINAL:
                task.final_at = time.monotonic()
                return

    async def _gone(self, task: Task, http: httpx.AsyncClient) -> bool:
        for api in self.live_apis():
            try:
                reply = await http.get(
                    f"{api.url}/api/chat/tasks/{task.task_id}", headers=auth(self.tenant)
                )
            except httpx.TransportError:
                continue
            return reply.status_code == 404
        return False

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


async def converse(
    conversations: list[Conversation],
    messages: int,
    *,
    fault: Callable[[], Awaitable[float | None]] | None = None,
    fault_after_answers: int = 0,
    answer_timeout: float = 60.0,
) -> tuple[Tally, float | None]:
    """Every conversation sends `messages` messages; `fault` runs once `fault_after_answers`
    answers have arrived (while others stream); it may return the moment (monotonic) of the
    damage, from which recovery is measured. Returns the tally and that moment."""
    answers = 0
    fault_at: float | None = None
    fault_task: asyncio.Task[None] | None = None

    async def inject() -> None:
        nonlocal fault_at
        fault_at = time.monotonic()
        assert fault is not None
        fault_at = await fault() or fault_at  # the fault may say when the damage was done

    async def talk(conversation: Conversation, http: httpx.AsyncClient) -> None:
        nonlocal answers, fault_task
        await conversation.connect(time.monotonic() + 30)
        for n in range(messages):
            message = f"{conversation.session} message {n}"
            task = await conversation.send(http, message, f"{conversation.session}-{n}")
            await conversation.final_of(task, answer_timeout, http)
            answers += 1
            if fault is not None and fault_task is None and answers >= fault_after_answers:
                fault_task = asyncio.create_task(inject())

    async with httpx.AsyncClient(timeout=15) as http:
        await asyncio.gather(*(talk(c, http) for c in conversations))
    if fault_task is not None:
        await fault_task
    for conversation in conversations:
        await conversation.close()
    return tally(conversations, fault_at), fault_at


_FIRST_STATUS = ("chat.status", json.dumps({"attempt": 1, "status": "processing"}))


def _identity(event: Event) -> tuple[str, str]:
    if event["type"] == "chat.chunk":
        return event["type"], str(event["data"]["seq"])
    return event["type"], json.dumps(event["data"], sort_keys=True)


def tally(conversations: list[Conversation], fault_at: float | None) -> Tally:
    result = Tally()
    for conversation in conversations:
        result.reconnects += conversation.reconnects
        result.refused_sends += conversation.refused
        result.unavailable_notices += conversation.notices["unavailable"]
        result.resume_gaps += conversation.notices["resume_gap"]
        repeat = int(conversation.simulate.get("repeat", 1))
        for task in conversation.tasks:
            result.messages += 1
            expected = chunks_of(reply_for("default", task.message, repeat))
            result.sent += len(expected) + 2  # chat.status, the chunks, chat.response
            result.received += len(task.events)
            ids = Counter(event["id"] for event in task.events)
            result.same_id_twice += sum(count - 1 for count in ids.values())
            seen = Counter(_identity(event) for event in task.events)
            result.duplicated += sum(count - 1 for count in seen.values())
            finals = [event for event in task.events if event["type"] in FINAL]
            if not finals and task.gone:
                result.gone += 1
                result.errors.append(f"{task.task_id}: lost with Redis's data (404)")
            elif not finals:
                result.unfinished += 1
                result.errors.append(f"{task.task_id}: no final event")
            elif finals[0]["type"] == "chat.response":
                result.completed += 1
                if finals[0]["data"]["content"] != "".join(expected):
                    result.errors.append(f"{task.task_id}: wrong answer")
            else:
                result.failed += 1
                result.errors.append(f"{task.task_id}: {finals[0]['data']}")
            if not finals or finals[0]["type"] == "chat.response":  # an error ends it early
                got = {int(key[1]) for key in seen if key[0] == "chat.chunk"}
                gaps = sorted(set(range(1, len(expected) + 1)) - got)
                missing = len(gaps) + (_FIRST_STATUS not in seen) + (not finals)
                result.lost += missing
                if missing and finals:
                    status = "" if _FIRST_STATUS in seen else "chat.status, "
                    result.errors.append(f"{task.task_id}: missed {status}chunks {gaps}")
            if (
                fault_at is not None
                and task.sent_at > fault_at
                and task.final_at is not None
                and finals
                and finals[0]["type"] == "chat.response"
            ):
                after = task.final_at - fault_at
                if result.recovered_after is None or after < result.recovered_after:
                    result.recovered_after = after
    return result
