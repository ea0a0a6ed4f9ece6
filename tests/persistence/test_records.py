"""The record the worker publishes: built from the task's Redis state, strict on the way in."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from services.core import events, keys
from services.core.scripts import Scripts
from services.core.settings import load_settings
from services.core.tasks import TaskRef, TaskStore, Verdict, encode_json
from services.persistence.records import (
    MalformedRecord,
    decode_record,
    encode_record,
    publish_finished,
    publish_record,
    record_from_task,
)
from services.persistence.writer import backlog
from tests.persistence.conftest import make_record

REF = TaskRef("acme", "s1", "task1")


async def completed_task(redis: Redis) -> tuple[TaskStore, str]:
    """A task created and completed through the real task script; returns its final event id."""
    tasks = TaskStore(redis, Scripts(redis), load_settings())
    action = encode_json({"action_type": "chat.process", "message": "hello?", "agent_id": "a1"})
    await tasks.apply(
        REF, "create", body=events.event_body("chat.status", {"status": "processing"}, "task1"),
        fields={"status": "processing", "agent_id": "a1", "user_id": "u1", "action": action},
    )  # fmt: skip
    await tasks.apply(REF, "chunk", attempt=1, seq=1, body=events.event_body("chat.chunk", {}))
    usage = {"input_tokens": 3, "output_tokens": 4, "model": "m", "cost": 0.02}
    outcome = await tasks.apply(
        REF, "completed", attempt=1, body=events.event_body("chat.response", {}),
        fields={
            "status": "completed",
            "result": encode_json({"content": "hi!", "role": "assistant"}),
            "usage": encode_json(usage),
        },
    )  # fmt: skip
    assert outcome is not None
    assert outcome.verdict is Verdict.ok
    return tasks, outcome.detail


async def test_a_completed_tasks_state_becomes_a_complete_record(redis: Redis) -> None:
    tasks, event_id = await completed_task(redis)
    state = await tasks.read(REF)
    assert state is not None
    record = record_from_task(REF, state, final_event_id=event_id)
    assert (record.tenant_id, record.session_id, record.task_id) == ("acme", "s1", "task1")
    assert (record.agent_id, record.user_id, record.status) == ("a1", "u1", "completed")
    assert (record.message, record.content) == ("hello?", "hi!")
    assert (record.usage.input_tokens, record.usage.output_tokens) == (3, 4)
    assert record.usage.cost == 0.02
    assert record.final_event_id == event_id
    assert record.first_chunk_at is not None
    assert record.created_at <= record.first_chunk_at <= record.completed_at
    assert decode_record(encode_record(record)) == record


async def test_a_task_that_is_not_final_has_no_record(redis: Redis) -> None:
    tasks, _ = await completed_task(redis)
    state = await tasks.read(REF)
    assert state is not None
    with pytest.raises(MalformedRecord, match="not final"):
        record_from_task(REF, {**state, "status": "streaming"})


async def test_publishing_on_a_pipeline_queues_the_record_until_execute(redis: Redis) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        await publish_record(pipe, make_record("t1"))
        await publish_record(pipe, make_record("t2"))
        assert await redis.xlen(keys.PERSIST_RECORDS) == 0
        await pipe.execute()
    entries = await redis.xrange(keys.PERSIST_RECORDS)
    assert [decode_record(fields[b"action"]).task_id for _, fields in entries] == ["t1", "t2"]


async def test_backlog_counts_unread_and_unacknowledged_records(redis: Redis) -> None:
    assert await backlog(redis) == 0
    for i in range(5):
        await publish_record(redis, make_record(f"t{i}"))
    assert await backlog(redis) == 5
    await redis.xgroup_create(keys.PERSIST_RECORDS, keys.PERSIST_GROUP, id="0")
    await redis.xreadgroup(keys.PERSIST_GROUP, "c", {keys.PERSIST_RECORDS: ">"}, count=2)
    assert await backlog(redis) == 5  # 3 unread + 2 pending


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ((b'"status":"completed"', b'"status":"streaming"'), "status"),
        ((b'"tenant_id":"acme"', b'"tenant_id":"a b"'), "tenant_id"),
        ((b'"input_tokens":10', b'"input_tokens":-1'), "input_tokens"),
        ((b'"input_tokens":10', b'"input_tokens":9223372036854775808'), "input_tokens"),
        ((b'"attempt":1', b'"attempt":"1"'), "attempt"),
        (
            (b'"created_at":"2026-03-14T12:00:00Z"', b'"created_at":"2026-03-14T12:00:00"'),
            "created_at",
        ),
        ((b'"final_event_id":"1-2"', b'"final_event_id":"1-2-3"'), "final_event_id"),
    ],
)
def test_a_record_with_a_wrong_field_is_malformed_and_says_which(
    change: tuple[bytes, bytes], reason: str
) -> None:
    raw = encode_record(make_record("t1", event_id="1-2"))
    assert change[0] in raw
    with pytest.raises(MalformedRecord, match=reason):
        decode_record(raw.replace(*change))


def test_extra_fields_from_a_newer_worker_are_tolerated() -> None:
    raw = encode_record(make_record("t1")).replace(b"{", b'{"shiny":true,', 1)
    assert decode_record(raw).task_id == "t1"


async def test_finished_tasks_are_published_in_one_go_and_vanished_ones_skipped(
    redis: Redis,
) -> None:
    _, event_id = await completed_task(redis)
    gone = TaskRef("acme", "s1", "expired")
    assert await publish_finished(redis, [(REF, event_id), (gone, None)]) == 1
    [(_, fields)] = await redis.xrange(keys.PERSIST_RECORDS)
    record = decode_record(fields[b"action"])
    assert (record.task_id, record.final_event_id) == ("task1", event_id)
