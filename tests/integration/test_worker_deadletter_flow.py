"""What a real worker dead-letters, listed and replayed with `orchestrator deadletters`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from services.cli.stack import LocalStack
from services.core import keys
from tests.integration.worker_helpers import add_send, messages, wait_for


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "deadletters", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_a_callback_that_keeps_failing_is_dead_lettered_and_replays_once(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """A session whose log key holds a string (any write to it fails: WRONGTYPE): its
    `websocket.send` fails in Redis on every delivery. It is dead-lettered after
    MAX_DELIVERY_ATTEMPTS with the reason, the partition keeps moving for other sessions,
    and once the key is fixed a replay delivers it exactly once."""
    await redis.set(keys.session_log("acme", "broken"), "not a stream")
    stack = LocalStack.for_redis(
        redis_url, log_dir=tmp_path, callback_partitions="1", worker_sleep_seconds="0.2",
        max_delivery_attempts="3", log_level="WARNING", metrics_port="0",
    )  # fmt: skip
    try:
        stack.start("worker", pod_name="w1")
        await add_send(redis, 0, "acme", "ok", 1)
        bad = await add_send(redis, 0, "acme", "broken", 1)
        await add_send(redis, 0, "acme", "ok", 2)

        async def handled() -> bool:  # no longer pending: dead-lettered (or applied)
            groups = await redis.xinfo_groups(keys.callback_stream(0))
            return bool(groups) and groups[0]["pending"] == 0 and groups[0]["lag"] == 0

        await wait_for(handled, timeout=30)
        assert await redis.type(keys.session_log("acme", "broken")) == b"string"  # still broken
        assert await redis.xlen(keys.DEAD_LETTERS) == 1, (
            "the failing send was acknowledged without being applied or dead-lettered"
        )
        await add_send(redis, 0, "acme", "ok", 3)

        async def moved_on() -> bool:
            return await messages(redis, "acme", "ok") == [1, 2, 3]

        await wait_for(moved_on, timeout=30)
        listed = cli(redis_url, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        letters = json.loads(listed.stdout)
        letters = letters if isinstance(letters, list) else letters.get("dead_letters", letters)
        [letter] = letters
        assert letter["stream"] == keys.callback_stream(0)
        assert letter["entry_id"] == bad
        assert "WRONGTYPE" in letter["reason"]
        assert letter["action_type"] == "websocket.send"

        await redis.delete(keys.session_log("acme", "broken"))
        replayed = cli(redis_url, "replay", "--all")
        assert replayed.returncode == 0, replayed.stderr

        async def delivered() -> bool:
            return await messages(redis, "acme", "broken") == [1]

        await wait_for(delivered, timeout=30)
        assert await redis.xlen(keys.DEAD_LETTERS) == 0
        await add_send(redis, 0, "acme", "ok", 4)

        async def after() -> bool:
            return await messages(redis, "acme", "ok") == [1, 2, 3, 4]

        await wait_for(after, timeout=30)
        assert await messages(redis, "acme", "broken") == [1]
    finally:
        stack.stop()
