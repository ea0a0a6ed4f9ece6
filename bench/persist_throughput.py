"""Throughput of the persistence writer: finished tasks written to PostgreSQL per second.

    .venv/bin/python bench/persist_throughput.py [--records 20000] [--batch-size 500]
        [--writers 1] [--sessions 500] [--no-fsync]

Starts its own Redis and PostgreSQL (embedded binaries, free loopback ports), migrates, adds
`--records` completed-task records to the persistence stream (pipelined, before the clock
starts), then runs `--writers` writers until the backlog is empty. Each record becomes two
messages, a task row, a usage marker and its share of a session and a daily usage upsert.
PostgreSQL runs with fsync on unless `--no-fsync`. Both servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.core import keys
from services.core.settings import load_settings
from services.persistence.database import create_engine
from services.persistence.migrate import migrate
from services.persistence.records import PersistRecord, RecordUsage, publish_record
from services.persistence.writer import PersistenceWriter, backlog

ANSWER = "The quick brown fox jumps over the lazy dog. " * 8  # ~360 characters


def record(i: int, sessions: int, start: datetime) -> PersistRecord:
    created = start + timedelta(milliseconds=i)
    return PersistRecord(
        tenant_id=f"tenant{i % 10}",
        session_id=f"s{i % sessions}",
        task_id=f"bench-task-{i}",
        agent_id="default",
        user_id="bench",
        status="completed",
        message=f"question number {i}, asked with a few words of context",
        content=ANSWER,
        usage=RecordUsage(input_tokens=120, output_tokens=90, cost=0.00042, model="sim"),
        final_event_id=f"{int(created.timestamp() * 1000)}-{i % 7}",
        created_at=created,
        first_chunk_at=created + timedelta(milliseconds=40),
        completed_at=created + timedelta(milliseconds=400),
    )


async def fill(redis: Redis, count: int, sessions: int) -> None:
    start = datetime.now(UTC)
    for first in range(0, count, 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(first, min(first + 1000, count)):
                await publish_record(pipe, record(i, sessions, start))
            await pipe.execute()


async def drained(redis: Redis) -> None:
    """Poll the backlog: it lives in Redis, and nothing announces that it reached 0."""
    while True:
        if not await backlog(redis):
            return
        await asyncio.sleep(0.01)


async def measure(redis_url: str, database_url: str, args: argparse.Namespace) -> float:
    settings = load_settings(
        redis_url=redis_url,
        database_url=database_url,
        persist_batch_size=args.batch_size,
        database_pool_size=max(2, args.writers),
        worker_sleep_seconds=0.05,
        metrics_port=0,
    )
    await migrate(database_url)
    redis = Redis.from_url(redis_url, max_connections=args.writers * 2 + 4)
    engine = create_engine(settings)
    try:
        await fill(redis, args.records, args.sessions)
        assert await redis.xlen(keys.PERSIST_RECORDS) == args.records
        writers = [
            PersistenceWriter(redis, settings, engine=engine, consumer=f"bench{n}")
            for n in range(args.writers)
        ]
        started = time.perf_counter()
        tasks = [asyncio.create_task(writer.run()) for writer in writers]
        await drained(redis)
        elapsed = time.perf_counter() - started
        for writer in writers:
            writer.stop()
        await asyncio.gather(*tasks)
        return elapsed
    finally:
        await engine.dispose()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--no-fsync", action="store_true", help="PostgreSQL without fsync")
    args = parser.parse_args()

    redis_server = RedisServer().start()
    postgres = PostgresServer(durable=not args.no_fsync).start()
    try:
        elapsed = asyncio.run(measure(redis_server.url, postgres.url(), args))
    finally:
        postgres.cleanup()
        redis_server.cleanup()
    rate = args.records / elapsed
    print(
        f"persisted {args.records} records ({2 * args.records} messages) in {elapsed:.2f} s "
        f"with {args.writers} writer(s), batch {args.batch_size}, "
        f"fsync {'off' if args.no_fsync else 'on'}: {rate:,.0f} records/s"
    )


if __name__ == "__main__":
    main()
