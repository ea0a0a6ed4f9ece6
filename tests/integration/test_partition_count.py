"""An api and a worker with different `CALLBACK_PARTITIONS` lost answers without a word: the
api routed a session's callbacks and deadline to partition 11 of 16, and the workers read
0-7. The installation's count is recorded in Redis by its first api or worker; a process
with another one refuses to start (exit 2, one line naming both), a worker that could not
check at start checks before taking a partition, an api before its first send, and
`orchestrator partitions set` changes the count only once the partitions hold nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.core import keys
from services.core.errors import Unavailable
from services.core.partition_count import PartitionCountMismatch
from services.core.settings import load_settings
from services.worker.main import Worker
from tests.integration.start_checks import (
    ROOT,
    assert_refused_at_start,
    base_env,
    run_role,
    stop,
)
from tests.integration.test_send_step import Service, service

__all__ = ["service"]  # the fixture, imported to be used here

VARIABLE = "ORCHESTRATOR_CALLBACK_PARTITIONS"


def orchestrator(
    redis_url: str, *args: str, partitions: str = "8"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=base_env(redis_url, callback_partitions=partitions),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(("first", "second"), [("worker", "api"), ("api", "worker")])
def test_a_process_with_another_count_than_the_first_one_s_refuses_to_start(
    redis: Redis, redis_url: str, tmp_path: Path, first: str, second: str
) -> None:
    outcome, running = run_role(
        first, base_env(redis_url, callback_partitions="8"), tmp_path / "first.log", keep=True,
        timeout=20 if first == "api" else 3,
    )  # fmt: skip
    try:
        assert outcome.state in ("ready", "running"), outcome.describe()
        refused, _ = run_role(
            second, base_env(redis_url, callback_partitions="16"), tmp_path / "second.log"
        )
    finally:
        stop(running)
    assert_refused_at_start(refused, VARIABLE)
    assert "16, but this installation's Redis records 8" in refused.output, refused.describe()
    assert len(refused.output.strip().splitlines()) == 1, refused.describe()


def test_the_first_process_records_its_count_and_one_with_the_same_starts(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    env = base_env(redis_url, callback_partitions="3")
    first, _ = run_role("api", env, tmp_path / "api.log")
    assert first.state == "ready", first.describe()
    assert asyncio.run(_get(redis_url)) == b"3"
    second, _ = run_role("worker", env, tmp_path / "worker.log", timeout=3)
    assert second.state == "running", second.describe()


async def _get(redis_url: str) -> bytes | None:
    client = Redis.from_url(redis_url)
    try:
        value: bytes | None = await client.get(keys.CALLBACK_PARTITION_COUNT)
        return value
    finally:
        await client.aclose()


async def test_a_worker_that_could_not_check_at_start_takes_no_partition(
    redis: Redis, redis_url: str
) -> None:
    """Started while Redis was unreachable, the start check passed it by: it checks before
    its first lease, and stops with the same line instead of reading partitions 0-3 of 8."""
    await redis.set(keys.CALLBACK_PARTITION_COUNT, 8)
    worker = Worker(load_settings(redis_url=redis_url, callback_partitions=4))
    before = asyncio.all_tasks()
    with pytest.raises(PartitionCountMismatch, match="4, but this installation's Redis"):
        await asyncio.wait_for(worker.run(), 30)
    assert await redis.keys("{cb:*}:lease") == []
    # Its timers, trimmer, lag report and clock sync ended with it (they ran on before).
    assert [task for task in asyncio.all_tasks() - before if not task.done()] == []


async def test_an_api_that_could_not_check_at_start_refuses_sends_until_the_counts_agree(
    service: Service, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await service.tier("pro")
    await redis.set(keys.CALLBACK_PARTITION_COUNT, 5)  # the api's is 8 (the default)
    with pytest.raises(Unavailable) as refused:
        await service.send("a")
    assert refused.value.code == "misconfigured"
    assert "log" in str(refused.value)  # nothing of the configuration in the client's answer
    assert "8, but this installation's Redis records 5" in caplog.text
    assert await service.actions("normal") == []  # no task routed to a partition nobody reads
    await redis.set(keys.CALLBACK_PARTITION_COUNT, 8)  # `partitions set 8`
    task_id = await service.send("a")
    assert any(task_id in action for action in await service.actions("normal"))


def test_set_refuses_while_the_partitions_hold_a_task_and_changes_it_after(
    redis: Redis, redis_url: str
) -> None:
    asyncio.run(_seed(redis_url, count="8", deadline_in=6))
    shown = orchestrator(redis_url, "partitions")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "recorded": 8,
        "configured": 8,
        "tasks_in_flight": 1,
        "retries_waiting": 0,
        "callbacks_unapplied": 1,
    }
    refused = orchestrator(redis_url, "partitions", "set", "16")
    assert refused.returncode == 1, refused.stderr
    assert "1 task(s) in flight" in refused.stderr
    assert asyncio.run(_get(redis_url)) == b"8"

    asyncio.run(_drain(redis_url, partition=6))
    changed = orchestrator(redis_url, "partitions", "set", "16")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout) == {"recorded": 16, "was": 8}
    assert f"{VARIABLE}=16" in changed.stderr
    assert asyncio.run(_get(redis_url)) == b"16"
    mismatch = orchestrator(redis_url, "partitions")  # this environment still says 8
    assert json.loads(mismatch.stdout)["recorded"] == 16
    assert "refuses to start" in mismatch.stderr


def test_set_force_changes_it_with_tasks_in_flight(redis: Redis, redis_url: str) -> None:
    asyncio.run(_seed(redis_url, count="8", deadline_in=2))
    forced = orchestrator(redis_url, "partitions", "set", "4", "--force")
    assert forced.returncode == 0, forced.stderr
    assert asyncio.run(_get(redis_url)) == b"4"


@pytest.mark.parametrize("count", ["0", "1025", "eight"])
def test_set_refuses_a_count_the_processes_would_refuse(
    redis: Redis, redis_url: str, count: str
) -> None:
    refused = orchestrator(redis_url, "partitions", "set", count)
    assert refused.returncode == 2
    assert "not a count of partitions (1-1024)" in refused.stderr
    assert asyncio.run(_get(redis_url)) is None


def test_a_recorded_value_that_is_not_a_count_is_named_and_only_force_replaces_it(
    redis: Redis, redis_url: str
) -> None:
    asyncio.run(_seed(redis_url, count="lots"))
    refused = orchestrator(redis_url, "partitions", "set", "8")
    assert refused.returncode == 2
    assert "holds 'lots', not a count of partitions" in refused.stderr
    forced = orchestrator(redis_url, "partitions", "set", "8", "--force")
    assert forced.returncode == 0, forced.stderr
    assert asyncio.run(_get(redis_url)) == b"8"


async def _seed(redis_url: str, *, count: str, deadline_in: int | None = None) -> None:
    """The recorded count, and a task in flight on partition `deadline_in`: its deadline,
    and one callback of it that no worker has read."""
    client = Redis.from_url(redis_url)
    try:
        await client.set(keys.CALLBACK_PARTITION_COUNT, count)
        if deadline_in is not None:
            await client.zadd(keys.partition_deadlines(deadline_in), {"t/s/task": 1e12})
            await client.xadd(keys.callback_stream(deadline_in), {"action": "{}"})
            await client.xgroup_create(keys.callback_stream(deadline_in), keys.WORKER_GROUP, "0")
    finally:
        await client.aclose()


async def _drain(redis_url: str, *, partition: int) -> None:
    """What a worker does as the task ends: its callback read and acknowledged, its
    deadline removed."""
    client = Redis.from_url(redis_url)
    try:
        stream = keys.callback_stream(partition)
        read = await client.xreadgroup(keys.WORKER_GROUP, "w", {stream: ">"})
        await client.xack(stream, keys.WORKER_GROUP, *(entry for entry, _ in read[0][1]))
        await client.zrem(keys.partition_deadlines(partition), "t/s/task")
    finally:
        await client.aclose()


def test_set_refuses_to_strand_dead_letters_of_the_partitions_it_drops(
    redis: Redis, redis_url: str
) -> None:
    """A dead letter's replay re-adds it to its origin stream: after 16 -> 8, one from
    `{cb:12}:callbacks` was replayed with exit 0 into a stream no worker reads (the ops
    review). Shrinking is refused while such dead letters are kept; replayed or discarded,
    it goes through."""
    asyncio.run(_seed(redis_url, count="16"))
    letter = asyncio.run(_dead_letter(redis_url, keys.callback_stream(12)))
    asyncio.run(_dead_letter(redis_url, keys.callback_stream(3)))  # still read with 8
    refused = orchestrator(redis_url, "partitions", "set", "8")
    assert refused.returncode == 1, refused.stderr
    assert "1 dead letter(s) came from callback partitions 8 and above" in refused.stderr
    assert asyncio.run(_get(redis_url)) == b"16"
    discarded = orchestrator(redis_url, "deadletters", "discard", letter, partitions="16")
    assert discarded.returncode == 0, discarded.stderr
    changed = orchestrator(redis_url, "partitions", "set", "8")
    assert changed.returncode == 0, changed.stderr


async def _dead_letter(redis_url: str, origin: str) -> str:
    client = Redis.from_url(redis_url)
    try:
        entry = await client.xadd(
            keys.DEAD_LETTERS, {"stream": origin, "id": "1-0", "action": "{}", "reason": "test"}
        )
        return entry.decode()
    finally:
        await client.aclose()
