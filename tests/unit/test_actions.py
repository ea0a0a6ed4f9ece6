"""The AES contract: strict where it matters, tolerant of extra fields, schemas never stale."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.core.actions import (
    ChatProcess,
    ExecutionCallback,
    ExecutionChunk,
    MalformedAction,
    User,
    action_type_of,
    decode_action,
    decode_callback,
    encode_action,
    failure_for_unreadable,
    unreadable_answer_task,
)
from services.core.ids import is_valid_id
from services.core.schemas import render_schemas, stale_schemas

ROOT = Path(__file__).resolve().parents[2]


def a_chat_process() -> ChatProcess:
    return ChatProcess(
        tenant_id="acme",
        session_id="s1",
        task_id="t1",
        agent_id="helper",
        message="hello",
        user=User(id="u1", name="Ada"),
        callback_queue="{cb:3}:callbacks",
        deadline=datetime.now(UTC) + timedelta(minutes=2),
    )


def test_actions_round_trip_with_their_envelope() -> None:
    action = a_chat_process()
    raw = encode_action(action)
    document = json.loads(raw)
    for field in ("action_id", "action_type", "version", "tenant_id", "session_id", "task_id",
                  "created_at", "trace_context"):  # fmt: skip
        assert field in document
    assert document["action_type"] == "chat.process"
    assert decode_action(raw) == action
    assert action_type_of(action) == "chat.process"


def test_extra_fields_from_a_newer_aes_are_tolerated() -> None:
    document = json.loads(encode_action(a_chat_process()))
    document["something_new"] = {"x": 1}
    assert isinstance(decode_action(json.dumps(document)), ChatProcess)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.update(action_type="chat.teleport"), "action_type"),
        (lambda d: d.pop("task_id"), "task_id"),
        (lambda d: d.update(tenant_id="no spaces allowed"), "tenant_id"),
        (lambda d: d.update(attempt=0), "attempt"),
        (lambda d: d.update(priority="urgent"), "priority"),
    ],
)
def test_malformed_actions_are_refused_with_a_reason(mutate: object, reason: str) -> None:
    document = json.loads(encode_action(a_chat_process()))
    mutate(document)  # type: ignore[operator]
    with pytest.raises(MalformedAction) as refused:
        decode_action(json.dumps(document))
    assert reason in refused.value.reason


def test_not_json_is_malformed() -> None:
    with pytest.raises(MalformedAction):
        decode_action(b"\xff not json")


def test_json_nested_beyond_the_decoders_stack_is_malformed() -> None:
    """10 KB of brackets: a poison entry to dead-letter, not an error of the consumer."""
    nested = b'{"action_type": "websocket.send", "message": {"a": ' + b"[" * 5000 + b"]" * 5000
    for decode in (decode_action, decode_callback):
        with pytest.raises(MalformedAction):
            decode(nested + b"}}")


def test_callback_queue_accepts_only_callbacks() -> None:
    with pytest.raises(MalformedAction):
        decode_callback(encode_action(a_chat_process()))
    chunk = ExecutionChunk(attempt=1, tenant_id="a", session_id="b", task_id="c", seq=1, delta="hi")
    assert decode_callback(encode_action(chunk)) == chunk


def test_the_seeds_execution_callback_is_understood() -> None:
    legacy = {
        "action_type": "execution.callback",
        "task_id": "t1",
        "tenant_id": "acme",
        "session_id": "s1",
        "status": "completed",
        "result": {"response": "done", "extra": 1},
        "execution_time": 1.5,
        "tokens_used": {"input": 3, "output": 4, "total": 7},
    }
    callback = decode_callback(json.dumps(legacy))
    assert isinstance(callback, ExecutionCallback)
    assert callback.result is not None
    assert callback.result.response == "done"


def test_committed_schemas_match_the_code() -> None:
    assert stale_schemas(ROOT / "schemas") == []


def test_every_action_type_has_a_schema_naming_its_tag() -> None:
    files = render_schemas()
    for name in ("chat.process", "chat.cancel", "execution.chunk", "execution.completed",
                 "execution.failed", "websocket.send", "websocket.broadcast"):  # fmt: skip
        schema = json.loads(files[f"{name}.json"])
        assert schema["title"] == name
        assert name in json.dumps(schema)


@pytest.mark.parametrize("bad", ["s1\n", "s1\n\n", "\ns1", "s 1", "", "s" * 65])
def test_an_id_with_a_newline_or_any_other_stray_character_is_malformed(bad: str) -> None:
    """Python's `$` matches before a final newline: "s1\\n" passed and reached Redis keys."""
    assert not is_valid_id(bad)
    send = {"action_type": "websocket.send", "tenant_id": "acme", "message": {}}
    with pytest.raises(MalformedAction):
        decode_callback(json.dumps({**send, "session_id": bad}))
    assert is_valid_id("s1")
    assert decode_callback(json.dumps({**send, "session_id": "s1"})).session_id == "s1"


@pytest.mark.parametrize(
    "usage",
    [{"input_tokens": 2**53}, {"output_tokens": -1}, {"cost": 1e400}, {"cost": -0.5}],
    ids=["tokens beyond a double", "negative tokens", "infinite cost", "negative cost"],
)
def test_usage_that_redis_could_not_add_up_is_malformed(usage: dict[str, float]) -> None:
    """Counted in Lua after the task is marked counted: a number that fails there would lose
    the task's usage, so it is refused at the door (dead-lettered with the reason)."""
    done = {
        "action_type": "execution.completed",
        "tenant_id": "acme",
        "session_id": "s1",
        "task_id": "t1",
        "attempt": 1,
        "content": "hi",
    }
    with pytest.raises(MalformedAction) as refused:
        decode_callback(json.dumps({**done, "usage": usage}).replace("Infinity", "1e400"))
    assert "usage" in refused.value.reason
    assert decode_callback(json.dumps({**done, "usage": {"input_tokens": 10**12, "cost": 3.5}}))


def test_an_answer_without_its_attempt_is_malformed() -> None:
    """It defaulted to 1: on a retried task the answer was dropped as stale, silently."""
    chunk = {"action_type": "execution.chunk", "tenant_id": "acme", "session_id": "s1",
             "task_id": "t1", "seq": 1, "delta": "hi"}  # fmt: skip
    with pytest.raises(MalformedAction, match="attempt"):
        decode_callback(json.dumps(chunk))
    decoded = decode_callback(json.dumps({**chunk, "attempt": 2}))
    assert isinstance(decoded, ExecutionChunk)
    assert decoded.attempt == 2


def test_an_unreadable_answer_without_a_readable_attempt_fails_the_current_one() -> None:
    """The seed's form names no attempt; taken for attempt 1, its failure was stale on a
    retried task. 0 is the task's current attempt (as for a readable seed callback)."""
    seed = {"action_type": "execution.callback", "tenant_id": "acme", "session_id": "s1",
            "task_id": "t1", "status": "error"}  # fmt: skip
    failure = failure_for_unreadable(json.dumps(seed), "status: bad")
    assert failure is not None
    assert failure.attempt == 0
    named = {**seed, "action_type": "execution.completed", "attempt": 3}
    failure = failure_for_unreadable(json.dumps(named), "content missing")
    assert failure is not None
    assert failure.attempt == 3  # a readable attempt is kept: a stale answer stays fenced


def test_an_unreadable_answer_naming_only_its_task_is_placed_by_its_location() -> None:
    done = {"action_type": "execution.completed", "tenant_id": "acme", "task_id": "t1",
            "attempt": 1}  # fmt: skip
    raw = json.dumps(done)
    assert failure_for_unreadable(raw, "session_id missing") is None
    assert unreadable_answer_task(raw) == "t1"
    failure = failure_for_unreadable(raw, "session_id missing", ("acme", "s1"))
    assert failure is not None
    assert (failure.tenant_id, failure.session_id, failure.task_id) == ("acme", "s1", "t1")
    # A tenant it names that is not the task's: another tenant's task is left alone.
    assert failure_for_unreadable(raw, "session_id missing", ("other", "s1")) is None
    assert unreadable_answer_task(json.dumps({**done, "task_id": "a:b}"})) is None
