"""Workers started, SIGTERMed and SIGKILLed while callbacks flow (real processes): every
callback applied once, in order, per session and per task; usage counted once per task."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis

from services.cli.stack import LocalStack
from services.core import events, keys
from services.core.actions import (
    ACTION_FIELD,
    ExecutionChunk,
    ExecutionCompleted,
    Usage,
    encode_action,
)
from services.core.scripts import Scripts
from services.core.settings import load_settings
from services.core.tasks import TaskRef, TaskStore
from tests.integration.worker_helpers import holders, send_action, wait_for

PARTITIONS = 4
SESSIONS = 12
ROUNDS = 60  # per session: a send, then a task of 3 chunks and a completion every 6 rounds
TENANT = "churn"


def frames(entries: list) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(b"{" + fields[b"e"]) for _, fields in entries]


async def test_callbacks_apply_once_in_order_while_workers_come_and_go(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    settings = load_settings(callback_partitions=PARTITIONS)
    tasks = TaskStore(redis, Scripts(redis), settings)
    stack = LocalStack.for_redis(
        redis_url,
        log_dir=tmp_path,
        partition_lease_seconds="1",
        callback_partitions=str(PARTITIONS),
        worker_sleep_seconds="0.2",
        worker_batch_size="7",
        log_level="WARNING",
        metrics_port="0",
    )
    sessions = [f"s{n}" for n in range(SESSIONS)]
    task_ids: list[tuple[str, str]] = []
    try:
        workers = [stack.start("worker", pod_name="w1"), stack.start("worker", pod_name="w2")]

        async def both_hold() -> bool:  # both in their loops: a SIGTERM is then a drain
            return {"w1", "w2"} <= set((await holders(redis, PARTITIONS)).values())

        await wait_for(both_hold, timeout=30)

        async def emit() -> None:
            for r in range(ROUNDS):
                async with redis.pipeline(transaction=False) as pipe:
                    for s in sessions:
                        stream = keys.callback_stream_for(TENANT, s, PARTITIONS)
                        pipe.xadd(stream, {ACTION_FIELD: send_action(TENANT, s, r)})
                        if r % 6 == 0:
                            task = f"t{s}-{r}"
                            ref = TaskRef(TENANT, s, task)
                            await tasks.apply(ref, "create", fields={"status": "processing"})
                            task_ids.append((s, task))
                            for seq in (1, 2, 3):
                                chunk = ExecutionChunk(
                                    tenant_id=TENANT, session_id=s, task_id=task, attempt=1,
                                    seq=seq, delta=f"{seq} ",
                                )  # fmt: skip
                                pipe.xadd(stream, {ACTION_FIELD: encode_action(chunk)})
                            done = ExecutionCompleted(
                                tenant_id=TENANT, session_id=s, task_id=task, attempt=1,
                                content="1 2 3 ",
                                usage=Usage(input_tokens=1, output_tokens=2),
                            )  # fmt: skip
                            pipe.xadd(stream, {ACTION_FIELD: encode_action(done)})
                    await pipe.execute()
                await asyncio.sleep(0.05)

        async def churn() -> None:
            await asyncio.sleep(0.6)
            workers.append(stack.start("worker", pod_name="w3"))
            await asyncio.sleep(0.6)
            await asyncio.to_thread(stack.stop_child, workers[0], signal.SIGTERM)
            await asyncio.sleep(0.4)
            workers[1].process.send_signal(signal.SIGKILL)
            await asyncio.sleep(0.3)
            workers.append(stack.start("worker", pod_name="w4"))

        await asyncio.gather(emit(), churn())
        assert workers[0].process.returncode == 0, workers[0].output()

        async def settled() -> bool:
            for p in range(PARTITIONS):
                groups = await redis.xinfo_groups(keys.callback_stream(p))
                if not groups or groups[0]["pending"] or groups[0]["lag"]:
                    return False
            return True

        await wait_for(settled, timeout=60)
        for s in sessions:
            log = frames(await redis.xrange(keys.session_log(TENANT, s)))
            sent = [f["data"]["n"] for f in log if f["type"] == events.MESSAGE]
            assert sent == list(range(ROUNDS)), (s, sent)
            for r in range(0, ROUNDS, 6):
                mine = [f for f in log if f.get("task_id") == f"t{s}-{r}"]
                kinds = [(f["type"], f["data"].get("seq")) for f in mine]
                assert kinds == [
                    (events.CHAT_CHUNK, 1), (events.CHAT_CHUNK, 2), (events.CHAT_CHUNK, 3),
                    (events.CHAT_RESPONSE, None),
                ], (s, r, kinds)  # fmt: skip
        day = datetime.now(UTC).date().isoformat()
        usage = await redis.hgetall(keys.tenant_usage(TENANT, day))
        assert int(usage[b"tasks"]) == len(task_ids)
        assert int(usage[b"tokens"]) == 3 * len(task_ids)
        for child in workers[2:]:  # w3, w4 still run
            assert child.alive(), child.output()
    finally:
        stack.stop()
