"""The reference executor against what it did not expect: Redis out of memory in the middle
of a streamed answer, a `context.simulate` number beyond a double, any exception in a run.
Each task ends (an answer or a `chat.error`); none is left to its deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from services.cli.embedded import RedisServer
from services.core import keys
from services.core.actions import (
    ACTION_FIELD,
    ChatProcess,
    ExecutionFailed,
    User,
    decode_action,
    encode_action,
)
from services.core.ids import new_id
from services.core.settings import load_settings
from services.core.streams import ensure_group, parse_read
from services.executor import main as executor_main
from tests.e2e.clients import auth, connect, events_until, final_of, next_event, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=("--maxmemory-policy", "noeviction")).start()
    yield server
    server.cleanup()


@pytest.fixture
async def admin(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url)
    yield client
    await client.config_set("maxmemory", "0")
    await client.aclose()


@pytest.fixture(scope="module")
def executor_deployment(
    own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with deploy(own_redis, tmp_path_factory.mktemp("exec-faults"), **FAST_EXECUTOR) as deployed:
        yield deployed


async def test_streamed_answer_resumes_promptly_after_out_of_memory(
    own_redis: RedisServer, admin: Redis, tmp_path: Path
) -> None:
    """Redis out of memory for 2 s in the middle of a streamed answer: once memory frees up
    the answer goes on (as after a Redis outage, which the executor rides out by answering
    again) and reaches the socket, every chunk once and in order. The run died of the OOM
    error before, and the entry waited for a reclaim."""
    with deploy(own_redis, tmp_path / "logs", executor_chunk_delay_ms="150") as deployed:
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(deployed.api.ws_url, tenant, session)
        async with httpx.AsyncClient() as http:
            reply = await send(
                http,
                deployed.api.url,
                tenant,
                {
                    "message": "one two three four five six seven eight nine ten " * 3,
                    "session_id": session,
                    "stream": True,
                },
            )
        assert reply.status_code == 202, reply.text
        events = []
        while True:  # the first chunk: the answer is under way
            event = await next_event(ws)
            events.append(event)
            if event["type"] == "chat.chunk":
                break
        await admin.config_set("maxmemory", "1")  # far below what is used: writes refused
        with pytest.raises(OutOfMemoryError):
            await admin.set("probe", "1")
        await asyncio.sleep(2.0)  # Redis refuses writes for a while
        await admin.config_set("maxmemory", "0")
        executor = next(c for c in deployed.stack.children if c.role == "executor")
        try:
            async with asyncio.timeout(15):
                while events[-1]["type"] not in ("chat.response", "chat.error"):
                    events.append(await next_event(ws, timeout=15))
        except TimeoutError:
            pytest.fail(f"no answer 15 s after memory freed up; executor:\n{executor.output(3000)}")
        assert events[-1]["type"] == "chat.response", events[-1]
        seqs = [e["data"]["seq"] for e in events if e["type"] == "chat.chunk"]
        assert seqs == list(range(1, len(seqs) + 1)), seqs
        await ws.close()


@pytest.mark.parametrize("knob", ["repeat", "delay_ms", "fail_attempts", "chunk_delay_ms"])
async def test_a_simulate_number_beyond_a_double_ends_the_task(
    executor_deployment: Deployment, knob: str
) -> None:
    """10**400 is valid JSON and an int to msgspec, but `float()` of it raised OverflowError:
    the run died, the entry was reclaimed and died again, the client waited for the deadline.
    An unusable knob is now treated like an absent one."""
    api = executor_deployment.api
    tenant, session = unique("t"), unique("s")
    ws, _ = await connect(api.ws_url, tenant, session)
    try:
        huge = "1" + "0" * 400
        body = '{"message": "hi", "stream": true, "context": {"simulate": {"'
        body += knob + '": ' + huge + "}}}"
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            reply = await http.post(
                "/api/chat/send",
                content=body.encode(),
                headers={
                    **auth(tenant),
                    "Content-Type": "application/json",
                    "X-Session-ID": session,
                },
            )
        assert reply.status_code == 202, reply.text
        task_id = reply.json()["task_id"]
        try:
            final = (await events_until(ws, final_of(task_id), timeout=15))[-1]
        except TimeoutError:
            pytest.fail(f"context.simulate.{knob} = 10**400: no final event in 15 s")
        assert final["type"] == "chat.response", final
    finally:
        await ws.close()


class _Broken:
    """A simulation that cannot be read: stands for any bug in a run."""

    @classmethod
    def from_context(cls, context: dict[str, Any]) -> Any:
        raise RuntimeError("a bug in the agent")


@pytest.fixture
def quiet_redis() -> Iterator[RedisServer]:
    """A server no executor process reads: the test's own executor takes the action."""
    server = RedisServer().start()
    yield server
    server.cleanup()


async def test_an_unexpected_error_in_a_run_answers_execution_failed(
    quiet_redis: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run that raises what no outage explains is answered `execution.failed` (not
    retryable, the error's type in the message) and its entry acknowledged, logged once with
    its traceback. Before, the run's task died: the entry was reclaimed and died again until
    the task's deadline."""
    monkeypatch.setattr(executor_main, "Simulation", _Broken)
    stream, callbacks = keys.aes_stream("normal"), f"test-callbacks-{new_id()}"
    executor = executor_main.Executor(load_settings(redis_url=quiet_redis.url))
    admin = Redis.from_url(quiet_redis.url)
    try:
        await ensure_group(executor.redis, stream, keys.AES_GROUP)
        action = ChatProcess(
            tenant_id="acme",
            session_id=new_id(),
            task_id=new_id(),
            agent_id="default",
            message="hello",
            user=User(id="u1"),
            callback_queue=callbacks,
            deadline=datetime.now(UTC) + timedelta(minutes=5),
        )
        await admin.xadd(stream, {ACTION_FIELD: encode_action(action)})
        read = await executor.redis.xreadgroup(
            keys.AES_GROUP, executor.consumer, {stream: ">"}, count=1
        )
        (entry,) = parse_read(read)
        with caplog.at_level(logging.ERROR, logger=executor_main.__name__):
            async with asyncio.timeout(10):
                await executor._execute(entry, action)
        answers = [decode_action(fields[ACTION_FIELD.encode()]) for _, fields in
                   await admin.xrange(callbacks)]  # fmt: skip
        assert len(answers) == 1, answers
        failed = answers[0]
        assert isinstance(failed, ExecutionFailed), failed
        assert (failed.task_id, failed.retryable) == (action.task_id, False), failed
        assert "RuntimeError" in failed.error, failed
        pending = await admin.xpending(stream, keys.AES_GROUP)
        assert pending["pending"] == 0, pending
        logged = [r for r in caplog.records if r.exc_info is not None]
        assert len(logged) == 1, caplog.records
    finally:
        await executor.redis.aclose()
        await admin.aclose()
