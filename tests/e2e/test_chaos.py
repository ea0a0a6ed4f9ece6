"""Chaos: SIGKILL a worker and an api process mid-run; every answer arrives exactly once.

50 streaming sessions send 20 messages each over REST (with an Idempotency-Key, so a send
whose answer was lost with its api process is retried safely), two workers and two api
processes serve them, and one worker and one api are killed with SIGKILL while the answers
stream. Clients reconnect to the surviving api with `last_event_id`. Every message's full
answer must arrive, in order, with no event lost or duplicated.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from services.executor.agent import chunks_of, reply_for
from tests.e2e.clients import auth, token, unique
from tests.e2e.conftest import new_stack

SESSIONS = 50
MESSAGES = 20
TENANTS = 5
SIMULATE = {"simulate": {"chunk_delay_ms": 3, "repeat": 2}}


@dataclass
class Transcript:
    tenant: str
    session: str
    last_event_id: str = "0-0"
    events: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0


class Client:
    """One session: a socket that reconnects with `last_event_id` to whichever api lives."""

    def __init__(self, transcript: Transcript, apis: list[Child]) -> None:
        self.t = transcript
        self.apis = apis
        self.ws: ClientConnection | None = None

    def live_apis(self) -> list[Child]:
        return [api for api in self.apis if api.alive()]

    async def connect(self) -> None:
        for _ in range(100):
            for api in self.live_apis():
                url = (
                    f"{api.ws_url}/ws/{self.t.tenant}/{self.t.session}"
                    f"?last_event_id={self.t.last_event_id}"
                )
                try:
                    self.ws = await websockets.connect(
                        url,
                        subprotocols=["orchestrator.v1", f"bearer.{token(self.t.tenant)}"],  # type: ignore[list-item]
                        open_timeout=5,
                    )
                    ack = json.loads(await self.ws.recv())
                    assert ack["type"] == "connection.ack"
                    assert ack["data"]["resumed"] is not False, "resume must succeed"
                    return
                except (OSError, ConnectionClosed, TimeoutError):
                    continue
            await asyncio.sleep(0.05)
        raise AssertionError("could not reconnect")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def final_of(self, task_id: str) -> None:
        """Read events (reconnecting as needed) until the task's final event."""
        while True:
            assert self.ws is not None
            try:
                event = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            except ConnectionClosed:
                self.t.reconnects += 1
                await self.connect()
                continue
            if event["type"] in ("connection.ack", "pong", "error"):
                continue
            self.t.events.append(event)
            self.t.last_event_id = event["id"]
            if event.get("task_id") == task_id and event["type"] == "chat.response":
                return

    async def send(self, http: httpx.AsyncClient, message: str, key: str) -> str:
        for _ in range(100):
            for api in self.live_apis():
                try:
                    reply = await http.post(
                        f"{api.url}/api/chat/send",
                        json={"message": message, "stream": True, "session_id": self.t.session,
                              "context": SIMULATE},
                        headers={**auth(self.t.tenant), "Idempotency-Key": key},
                    )  # fmt: skip
                except httpx.TransportError:
                    continue
                if reply.status_code == 202:
                    task_id: str = reply.json()["task_id"]
                    return task_id
            await asyncio.sleep(0.05)
        raise AssertionError("could not send")


@pytest.mark.e2e
async def test_answers_arrive_exactly_once_when_a_worker_and_an_api_are_killed(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stack = new_stack(
        e2e_redis,
        tmp_path_factory.mktemp("logs"),
        partition_lease_seconds="2",
        executor_chunk_delay_ms="3",
        executor_concurrency="200",
        log_level="WARNING",
    )
    clients: list[Client] = []
    try:
        apis = [stack.start_api(), stack.start_api()]
        workers = [stack.start("worker"), stack.start("worker")]
        stack.start("executor")
        stack.wait_ready(*apis)
        transcripts = [
            Transcript(f"chaos-{n % TENANTS}-{unique('t')[2:8]}", unique("s"))
            for n in range(SESSIONS)
        ]
        clients = [Client(t, apis[n % 2 :] + apis[: n % 2]) for n, t in enumerate(transcripts)]
        for client in clients:
            await client.connect()
        sent: dict[str, list[tuple[str, str]]] = {t.session: [] for t in transcripts}
        answered = 0

        async def converse(client: Client, http: httpx.AsyncClient) -> None:
            nonlocal answered
            for n in range(MESSAGES):
                message = f"{client.t.session} message {n}"
                task_id = await client.send(http, message, key=f"{client.t.session}-{n}")
                sent[client.t.session].append((task_id, message))
                await client.final_of(task_id)
                answered += 1

        async def kill_midway() -> None:
            while answered < SESSIONS * MESSAGES // 3:
                await asyncio.sleep(0.02)
            workers[0].process.send_signal(signal.SIGKILL)
            apis[0].process.send_signal(signal.SIGKILL)

        async with httpx.AsyncClient(timeout=10) as http:
            await asyncio.gather(kill_midway(), *(converse(c, http) for c in clients))

        lost = duplicated = received = 0
        for transcript in transcripts:
            ids = [e["id"] for e in transcript.events]
            duplicated += len(ids) - len(set(ids))
            for task_id, message in sent[transcript.session]:
                mine = [e for e in transcript.events if e.get("task_id") == task_id]
                expected = chunks_of(reply_for("default", message, 2))
                deltas = [e["data"]["delta"] for e in mine if e["type"] == "chat.chunk"]
                seqs = [e["data"]["seq"] for e in mine if e["type"] == "chat.chunk"]
                answers = [e for e in mine if e["type"] == "chat.response"]
                received += len(answers)
                lost += len(expected) - len(set(seqs)) + (1 - min(1, len(answers)))
                duplicated += len(seqs) - len(set(seqs)) + max(0, len(answers) - 1)
                assert seqs == list(range(1, len(expected) + 1)), (transcript.session, seqs)
                assert "".join(deltas) == answers[0]["data"]["content"]
        reconnects = sum(t.reconnects for t in transcripts)
        print(
            f"\nchaos: sent {SESSIONS * MESSAGES} messages, received {received} answers, "
            f"lost {lost} events, duplicated {duplicated}, kills 2 (worker + api), "
            f"reconnects {reconnects}"
        )
        assert received == SESSIONS * MESSAGES
        assert lost == 0
        assert duplicated == 0
        assert reconnects >= SESSIONS // 2  # the killed api's sockets all came back
    finally:
        # Open sockets would leave their keepalive tasks on the session's event loop.
        await asyncio.gather(*(client.close() for client in clients))
        stack.stop()
