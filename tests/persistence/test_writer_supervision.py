"""The worker's supervision of its persistence writer (`Worker._keep_writing`), on a real
Redis and PostgreSQL: what a restart recovers from, and what it does not."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import keys
from services.core.actions import ACTION_FIELD
from services.core.settings import Settings
from services.persistence import writer
from services.persistence.backlog import backlog
from services.persistence.records import publish_record
from services.persistence.schema import messages
from services.worker import main as worker_main
from services.worker.main import Worker
from tests.persistence.conftest import eventually, make_record


@contextlib.asynccontextmanager
async def supervised(settings: Settings) -> AsyncIterator[Worker]:
    """Only the writer's supervision of a real Worker (no partitions, no timers)."""
    worker = Worker(settings)
    task = asyncio.create_task(worker._keep_writing())
    try:
        yield worker
    finally:
        worker.stopping.set()
        if worker._writer is not None:
            worker._writer.stop()
        await asyncio.wait_for(task, 10)
        if worker.joint_redis is not None:
            await worker.joint_redis.aclose()
        await worker.redis.aclose()


def failures() -> float:
    return REGISTRY.get_sample_value("orchestrator_persistence_write_failures_total") or 0.0


async def written(engine: AsyncEngine, task_id: str) -> bool:
    async with engine.connect() as conn:
        found = await conn.scalar(select(func.count()).where(messages.c.task_id == task_id))
    return bool(found)


def poison_entry(kind: str) -> bytes:
    """An entry the writer does not foresee: JSON nested deeper than msgspec decodes (a
    RecursionError, not the ValidationError/DecodeError `decode_record` turns into
    MalformedRecord), or a record that decodes but whose completion, at its UTC offset, is
    past year 9999 (`usage_day` raises OverflowError)."""
    if kind == "nested":
        return b'{"error":{"x":' + b"[" * 2000 + b"]" * 2000 + b"}}"
    poison = msgspec.to_builtins(make_record("poison"))
    poison["completed_at"] = "9999-12-31T23:00:00-05:00"
    return msgspec.json.encode(poison)


@pytest.mark.parametrize("kind", ["nested", "year-10000"])
async def test_one_record_the_writer_did_not_foresee_is_dead_lettered_and_the_rest_written(
    redis: Redis,
    settings: Settings,
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    """Such an entry ended the writer's run; `_keep_writing` started a new writer, which read
    its own pending entries first: the same entry, the same failure, for ever, and every
    record this worker read after it waited behind it. It is dead-lettered now, as a
    malformed record is, and the rest are written."""
    await redis.xadd(keys.PERSIST_RECORDS, {ACTION_FIELD: poison_entry(kind)})
    await publish_record(redis, make_record("later", session_id="s2"))
    async with supervised(settings):
        await eventually(lambda: written(engine, "later"), timeout=10, what="the later record")
    assert await redis.xlen(keys.DEAD_LETTERS) == 1
    assert "persistence writer failed" not in caplog.text


async def test_a_writer_failing_in_a_loop_reports_the_backlog_the_alert_reads(
    redis: Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A writer that fails before its batch, again and again: OrchestratorPersistenceBacklog
    reads `orchestrator_persistence_backlog`, which only a writer that got past its batch
    reported: it kept the 0 of a fresh worker process while records waited, and no alert
    could fire. The supervision reports it at each restart."""
    monkeypatch.setattr(worker_main, "WRITER_RESTART_SECONDS", (0.05, 0.2))

    async def fails(self: writer.PersistenceWriter, entries: object) -> None:
        raise RuntimeError("a failure nobody foresaw")

    monkeypatch.setattr(writer.PersistenceWriter, "_persist", fails)
    writer.backlog_gauge.set(0)  # as in a worker process that just started
    await publish_record(redis, make_record("waiting-1", session_id="s2"))
    await publish_record(redis, make_record("waiting-2", session_id="s3"))
    async with supervised(settings):
        await eventually(
            lambda: asyncio.sleep(0, caplog.text.count("persistence writer failed") >= 3),
            timeout=5,
            what="three restarts",
        )
    assert await backlog(redis) == 2
    assert REGISTRY.get_sample_value("orchestrator_persistence_backlog") == 2


async def test_the_restart_pause_starts_again_after_a_writer_that_wrote(
    redis: Redis,
    settings: Settings,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two failures far apart, with records written in between: the second pauses as the
    first did (1 s in production). `delay` was never reset after a writer ran well, so every
    failure of a pod's lifetime doubled it: after five, each later one, however isolated,
    left history 30 s behind."""
    monkeypatch.setattr(worker_main, "WRITER_RESTART_SECONDS", (0.4, 10.0))

    async def break_stream() -> None:
        await redis.delete(keys.PERSIST_RECORDS)
        await redis.set(keys.PERSIST_RECORDS, "not a stream")  # WRONGTYPE: not foreseen

    def pauses() -> list[str]:
        return [
            r.getMessage().rsplit(" in ", 1)[1]
            for r in caplog.records
            if r.getMessage().startswith("persistence writer failed")
        ]

    await break_stream()
    async with supervised(settings):
        await eventually(lambda: asyncio.sleep(0, len(pauses()) == 1), timeout=5, what="failure")
        await redis.delete(keys.PERSIST_RECORDS)  # repaired during the pause
        await publish_record(redis, make_record("fine"))
        await eventually(lambda: written(engine, "fine"), timeout=5, what="a record written")
        await break_stream()
        await eventually(lambda: asyncio.sleep(0, len(pauses()) == 2), timeout=5, what="again")
        await redis.delete(keys.PERSIST_RECORDS)
    first, second = pauses()
    assert second == first, f"paused {first}, then {second} after a healthy run"
