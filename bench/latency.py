"""End-to-end latency baseline: REST send -> final `chat.response` on the socket.

Starts its own embedded Redis, one api, one worker and one executor (real processes on
127.0.0.1), sends N messages one after another from a real HTTP client, waits for each answer
on a real WebSocket, and prints median / p90 / p99. Run: `make latency` or
`python bench/latency.py --messages 200 [--stream]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import websockets

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import LocalStack
from services.core.auth import issue_token
from services.core.settings import load_settings
from services.persistence.migrate import migrate

SECRET = "latency-benchmark-secret-" + "z" * 24


async def measure(api_url: str, ws_url: str, messages: int, stream: bool) -> list[float]:
    token = issue_token(
        load_settings(jwt_secret=SECRET), tenant_id="bench", user_id="u", ttl_seconds=3600
    )
    headers = {"Authorization": f"Bearer {token}"}
    timings: list[float] = []
    async with (
        websockets.connect(
            f"{ws_url}/ws/bench/latency",
            subprotocols=["orchestrator.v1", f"bearer.{token}"],  # type: ignore[list-item]
        ) as ws,
        httpx.AsyncClient(base_url=api_url, headers=headers) as http,
    ):
        await ws.recv()  # connection.ack
        body = {"message": "how fast is this", "stream": stream, "session_id": "latency"}
        for _ in range(messages):
            started = time.perf_counter()
            reply = await http.post("/api/chat/send", json=body)
            task_id = reply.json()["task_id"]
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if event.get("task_id") == task_id and event["type"] == "chat.response":
                    break
            timings.append((time.perf_counter() - started) * 1000)
    return timings


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--stream", action="store_true", help="streamed answers (chunks)")
    parser.add_argument(
        "--database", action="store_true", help="with PostgreSQL persistence (embedded, migrated)"
    )
    args = parser.parse_args()
    redis = RedisServer().start()
    postgres = PostgresServer(durable=False).start() if args.database else None
    if postgres is not None:
        asyncio.run(migrate(postgres.url()))
    logs = Path(tempfile.mkdtemp(prefix="latency-logs-"))
    stack = LocalStack.for_redis(
        redis.url, log_dir=logs, jwt_secret=SECRET, executor_chunk_delay_ms="0",
        default_tier="enterprise",
        **({"database_url": postgres.url()} if postgres is not None else {}),
        log_level="WARNING",
    )  # fmt: skip
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        asyncio.run(measure(api.url, api.ws_url, 20, args.stream))  # warm up
        timings = asyncio.run(measure(api.url, api.ws_url, args.messages, args.stream))
    finally:
        stack.stop()
        redis.cleanup()
        if postgres is not None:
            postgres.cleanup()
    kind = ("streamed" if args.stream else "non-streamed") + (
        ", persisted" if args.database else ""
    )
    print(
        f"{args.messages} {kind} messages, REST send -> chat.response: "
        f"median {statistics.median(timings):.2f} ms, p90 {percentile(timings, 0.9):.2f} ms, "
        f"p99 {percentile(timings, 0.99):.2f} ms, mean {statistics.fmean(timings):.2f} ms"
    )


if __name__ == "__main__":
    main()
