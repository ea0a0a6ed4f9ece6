"""The task script makes every callback idempotent and keeps the log in application order."""

from __future__ import annotations

import json

from redis.asyncio import Redis

from services.core import events, keys
from services.core.scripts import Scripts
from services.core.settings import load_settings
from services.core.tasks import TaskRef, TaskStore, Verdict

REF = TaskRef("acme", "s1", "task1")


def store(redis: Redis) -> TaskStore:
    return TaskStore(redis, Scripts(redis), load_settings())


async def created(redis: Redis) -> TaskStore:
    tasks = store(redis)
    outcome = await tasks.apply(
        REF, "create", body=events.event_body("chat.status", {"status": "processing"}, "task1"),
        fields={"status": "processing"},
    )  # fmt: skip
    assert outcome is not None
    assert outcome.verdict is Verdict.ok
    return tasks


async def chunk(tasks: TaskStore, seq: int, attempt: int = 1) -> Verdict:
    body = events.event_body("chat.chunk", {"delta": f"d{seq}", "seq": seq}, "task1")
    outcome = await tasks.apply(REF, "chunk", attempt=attempt, seq=seq, body=body)
    assert outcome is not None
    return outcome.verdict


async def logged(redis: Redis) -> list[dict[str, object]]:
    entries = await redis.xrange(keys.session_log("acme", "s1"))
    return [json.loads(b"{" + fields[b"e"]) for _, fields in entries]


async def test_a_redelivered_chunk_reaches_the_log_once(redis: Redis) -> None:
    tasks = await created(redis)
    assert await chunk(tasks, 1) is Verdict.ok
    assert await chunk(tasks, 1) is Verdict.duplicate
    assert await chunk(tasks, 2) is Verdict.ok
    log = await logged(redis)
    assert [e["type"] for e in log] == ["chat.status", "chat.chunk", "chat.chunk"]
    state = await tasks.read(REF)
    assert state is not None
    assert state["status"] == "streaming"
    assert state["last_seq"] == "2"


async def test_callbacks_of_a_superseded_attempt_are_fenced(redis: Redis) -> None:
    tasks = await created(redis)
    assert (await tasks.apply(REF, "requeue")).verdict is Verdict.ok  # type: ignore[union-attr]
    assert await chunk(tasks, 1, attempt=1) is Verdict.stale
    assert await chunk(tasks, 1, attempt=2) is Verdict.ok


async def test_nothing_changes_a_final_task(redis: Redis) -> None:
    tasks = await created(redis)
    cancelled = await tasks.apply(
        REF, "cancel", body=events.event_body("chat.cancelled", {}, "task1"),
        fields={"status": "cancelled"},
    )  # fmt: skip
    assert cancelled is not None
    assert cancelled.verdict is Verdict.ok
    assert await chunk(tasks, 1) is Verdict.final
    again = await tasks.apply(REF, "cancel", fields={"status": "cancelled"})
    assert again is not None
    assert (again.verdict, again.detail) == (Verdict.final, "cancelled")
    assert [e["type"] for e in await logged(redis)] == ["chat.status", "chat.cancelled"]


async def test_events_for_an_unknown_task_are_refused(redis: Redis) -> None:
    tasks = store(redis)
    assert await chunk(tasks, 1) is Verdict.unknown
    assert await redis.exists(keys.session_log("acme", "s1")) == 0


async def test_appending_publishes_the_frame_with_its_log_id(redis: Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.ssubscribe(keys.session_channel("acme", "s1"))
    assert (await pubsub.get_message(timeout=2))["type"] == "ssubscribe"  # type: ignore[index]
    tasks = await created(redis)
    message = await pubsub.get_message(timeout=2)
    assert message is not None
    frame = json.loads(message["data"])
    entries = await redis.xrange(keys.session_log("acme", "s1"))
    assert frame["id"] == entries[0][0].decode()
    assert frame["type"] == "chat.status"
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert tasks is not None


async def test_a_created_task_joins_its_sessions_index_which_forgets_long_expired_ones(
    redis: Redis,
) -> None:
    """The index an erasure reads instead of a SCAN: every created task is in it, scored by
    when its state expires at the latest; members a day past that go at the next creation,
    so a session with a task a minute for a year does not keep half a million of them."""
    index = keys.session_tasks("acme", "s1")
    now_ms = int((await redis.time())[0]) * 1000
    await redis.zadd(index, {"long-gone": now_ms - 2 * 86_400_000, "recent": now_ms})
    tasks = await created(redis)
    members = dict(await redis.zrange(index, 0, -1, withscores=True))
    ttl = tasks.settings.task_ttl_seconds * 1000
    assert set(members) == {b"task1", b"recent"}
    assert now_ms + ttl - 5_000 <= members[b"task1"] <= now_ms + ttl + 5_000
    assert await redis.pttl(index) >= ttl + 86_400_000 - 5_000
    # A second creation of the same task (a retried send) is refused and indexes nothing new.
    again = await tasks.apply(REF, "create", fields={"status": "processing"})
    assert again is not None
    assert again.verdict is Verdict.exists
    assert await redis.zcard(index) == 2


async def test_an_event_that_lengthens_a_tasks_state_lengthens_its_index_member_and_the_index(
    redis: Redis,
) -> None:
    """An api with TASK_TTL_SECONDS=1 h created the task; a worker with 7 d (a raised setting
    rolling out, or an event applied after the deadline) lengthened its state to 7 d. The
    member kept its creation score and the index its 1 h + 1 d life: the index expired (or a
    creation pruned the member) while the state lived, and an erasure reading the index left
    the erased session's message stored."""
    week = 7 * 86_400
    api = TaskStore(redis, Scripts(redis), load_settings(task_ttl_seconds=3600))
    worker = TaskStore(redis, Scripts(redis), load_settings(task_ttl_seconds=week))
    await api.apply(REF, "create", fields={"status": "queued"}, ttl=3660)
    done = await worker.apply(REF, "completed", attempt=1, fields={"status": "completed"})
    assert done is not None
    assert done.applied
    index = keys.session_tasks("acme", "s1")
    now_ms = int((await redis.time())[0]) * 1000
    score = await redis.zscore(index, "task1")
    assert score is not None
    assert score >= now_ms + week * 1000 - 5_000, "the member still expires with its creation"
    assert await redis.pttl(index) >= (week + 86_400) * 1000 - 5_000


async def test_a_creation_forgets_stale_members_whose_state_is_gone_and_keeps_the_others(
    redis: Redis,
) -> None:
    """A member a day past its score is forgotten only once its state is gone: one whose
    state lives on (lengthened by a process the index did not hear from) is scored again."""
    index = keys.session_tasks("acme", "s1")
    now_ms = int((await redis.time())[0]) * 1000
    lives = keys.task_state("acme", "s1", "still-here")
    await redis.hset(lives, "status", "completed")
    await redis.expire(lives, 3 * 86_400)
    long_ago = now_ms - 2 * 86_400_000
    await redis.zadd(index, {"still-here": long_ago, "gone": long_ago})
    await created(redis)
    members = dict(await redis.zrange(index, 0, -1, withscores=True))
    assert b"gone" not in members
    assert members[b"still-here"] >= now_ms + 3 * 86_400_000 - 5_000
