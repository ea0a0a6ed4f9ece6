"""From the task script to history: the event id a client saw is the cursor into history."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.settings import Settings
from services.core.tasks import TaskRef
from services.persistence.history import HistoryStore
from services.persistence.records import publish_finished
from services.persistence.writer import PersistenceWriter, backlog
from tests.persistence.conftest import eventually
from tests.persistence.test_records import completed_task


async def test_a_finished_task_reaches_history_under_the_id_of_its_final_event(
    redis: Redis, settings: Settings, engine: AsyncEngine
) -> None:
    _, event_id = await completed_task(redis)
    await publish_finished(redis, [(TaskRef("acme", "s1", "task1"), event_id)])
    writer = PersistenceWriter(redis, settings, engine=engine, consumer="w1")
    running = asyncio.create_task(writer.run())

    async def drained() -> bool:
        return await backlog(redis) == 0

    try:
        await eventually(drained, what="record written")
    finally:
        writer.stop()
        await running
    history = HistoryStore(engine)
    page = await history.messages("acme", "s1")
    assert [(m.role, m.content, m.final_event_id) for m in page.messages] == [
        ("user", "hello?", event_id),
        ("assistant", "hi!", event_id),
    ]
    millis, seq = event_id.split("-")
    before = f"{millis}-{int(seq) - 1}" if int(seq) else f"{int(millis) - 1}-0"
    assert len((await history.messages("acme", "s1", after_event_id=before)).messages) == 2
    assert (await history.messages("acme", "s1", after_event_id=event_id)).messages == []
