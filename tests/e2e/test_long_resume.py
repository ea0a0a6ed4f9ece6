"""A socket resuming far back in a long session log, through a real api: every event once,
in order, read in pages (in one read, 100 000 events held the pod's event loop for ~1 s for
every other client; found by the review of stored data at scale)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.api.session_log import REPLAY_PAGE
from services.cli.embedded import RedisServer
from services.core import keys
from services.core.events import event_body
from tests.e2e.clients import connect, unique
from tests.e2e.conftest import new_stack

pytestmark = pytest.mark.e2e

EVENTS = 5 * REPLAY_PAGE + 500


@pytest.fixture
def api_url(own_redis: RedisServer, tmp_path: Path) -> Iterator[str]:
    stack = new_stack(own_redis, tmp_path / "logs", session_log_maxlen=str(2 * EVENTS))
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        yield api.ws_url
    finally:
        stack.stop()


async def xrange_calls(redis: Redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_xrange", {}).get("calls", 0))


async def test_a_resume_from_the_start_of_a_long_log_gets_every_event_once_in_pages(
    own_redis: RedisServer, api_url: str
) -> None:
    tenant, session = unique("t"), unique("s")
    redis = Redis.from_url(own_redis.url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(EVENTS):
                body = event_body("chat.chunk", {"delta": str(n), "seq": n}, "t1")
                pipe.xadd(keys.session_log(tenant, session), {"e": body})
            ids = [entry_id.decode() for entry_id in await pipe.execute()]
        before = await xrange_calls(redis)
        ws, ack = await connect(api_url, tenant, session, last_event_id="0-0")
        assert ack["data"]["resumed"] is True
        got = [json.loads(await ws.recv()) for _ in range(EVENTS)]
        await ws.close()
        assert [event["id"] for event in got] == ids
        assert [event["data"]["delta"] for event in got] == [str(n) for n in range(EVENTS)]
        assert await xrange_calls(redis) - before >= EVENTS // REPLAY_PAGE + 1
    finally:
        await redis.aclose()
