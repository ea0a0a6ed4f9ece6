"""SIGTERM: README says a worker "finishes the batch in hand, gives its partitions back and
exits 0"."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from redis.asyncio import Redis

from services.cli.stack import LocalStack
from services.core import keys
from tests.integration.worker_helpers import holders, send_action, wait_for

PARTITIONS = 4


async def test_sigterm_under_load_exits_0_and_gives_every_lease_back(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    stack = LocalStack.for_redis(
        redis_url,
        log_dir=tmp_path,
        partition_lease_seconds="5",
        callback_partitions=str(PARTITIONS),
        worker_sleep_seconds="0.2",
        worker_batch_size="5",
        log_level="WARNING",
        metrics_port="0",
    )
    stop = asyncio.Event()

    async def emit() -> None:
        n = 0
        while not stop.is_set():
            async with redis.pipeline(transaction=False) as pipe:
                for p in range(PARTITIONS):
                    pipe.xadd(keys.callback_stream(p), {b"action": send_action("t", f"s{p}", n)})
                await pipe.execute()
            n += 1
            await asyncio.sleep(0.002)

    emitting = asyncio.create_task(emit())
    codes = []
    try:
        for round_ in range(4):
            worker = stack.start("worker", pod_name=f"w{round_}")

            async def owns_all(name: str = f"w{round_}") -> bool:
                return all(v == name for v in (await holders(redis, PARTITIONS)).values())

            await wait_for(owns_all, timeout=20)
            await asyncio.sleep(0.3)  # mid-stream
            code = await asyncio.to_thread(stack.stop_child, worker, signal.SIGTERM)
            codes.append((code, worker.output(1500)))
            assert set((await holders(redis, PARTITIONS)).values()) == {None}
    finally:
        stop.set()
        await emitting
        stack.stop()
    assert [code for code, _ in codes] == [0] * len(codes), codes
