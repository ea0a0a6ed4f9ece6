"""Where a chat message's time goes, hop by hop, from Redis stream ids.

Starts an embedded Redis, one api, one worker and one executor (real processes on
127.0.0.1), sends N plain (or streamed) messages one after another over HTTP and waits for
each answer on a WebSocket, then reads the ids Redis gave the action (`{aes}:actions:*`), the
executor's completion callback (`{cb:N}:callbacks`) and the final event (the session log) and
prints the mean and median of each hop:

    send -> action XADD          the api: HTTP, auth, admission, task state, enqueue
    action -> callback XADD      the executor
    callback -> session log      the worker
    session log -> client        the api's delivery and the client's receive

Stream ids carry Redis's clock in whole milliseconds: a single hop is truncated by up to 1 ms
(0.5 ms on average, which the means show), the sum of the hops is not. Run:
`python bench/chat_hops.py --messages 300 [--stream]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets
from redis.asyncio import Redis

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds
from bench.wsclient import HttpClient
from services.cli.embedded import RedisServer
from services.cli.stack import LocalStack
from services.core import keys
from services.core.auth import issue_token
from services.core.settings import load_settings

SECRET = "chat-hops-benchmark-secret-" + "z" * 24
HOPS = {
    "send -> action XADD (api)": ("sent", "action"),
    "action -> callback XADD (executor)": ("action", "callback"),
    "callback -> session log (worker)": ("callback", "logged"),
    "session log -> client (api, client)": ("logged", "received"),
    "total": ("sent", "received"),
}


def id_ms(entry_id: bytes | str) -> float:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return float(text.split("-", 1)[0])


async def _chat(
    api_port: int, ws_url: str, messages: int, stream: bool
) -> dict[str, dict[str, Any]]:
    token = issue_token(
        load_settings(jwt_secret=SECRET), tenant_id="bench", user_id="u", ttl_seconds=3600
    )
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps({"message": "how fast is this", "stream": stream, "session_id": "hops"})
    times: dict[str, dict[str, Any]] = {}
    http = await HttpClient.connect("127.0.0.1", api_port)
    try:
        async with websockets.connect(
            f"{ws_url}/ws/bench/hops",
            subprotocols=["orchestrator.v1", f"bearer.{token}"],  # type: ignore[list-item]
        ) as ws:
            await ws.recv()  # connection.ack
            for _ in range(messages):
                sent = time.time() * 1000
                status, reply = await asyncio.wait_for(
                    http.request("POST", "/api/chat/send", body.encode(), headers), 10
                )
                if status != 202:
                    raise RuntimeError(f"send answered {status}: {reply[:200]!r}")
                task_id = json.loads(reply)["task_id"]
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if event.get("task_id") == task_id and event["type"] == "chat.response":
                        break
                times[task_id] = {
                    "sent": sent,
                    "received": time.time() * 1000,
                    "logged": id_ms(event["id"]),
                }
    finally:
        http.close()
    return times


async def stream_times(redis_url: str, times: dict[str, dict[str, Any]]) -> None:
    """Add each task's "action" and "callback" times (ms) from the ids Redis gave them."""
    redis = Redis.from_url(redis_url)
    try:
        for priority in keys.PRIORITIES:
            for entry_id, fields in await redis.xrange(keys.aes_stream(priority)):
                action = json.loads(fields[b"action"])
                if action.get("task_id") in times:
                    times[action["task_id"]]["action"] = id_ms(entry_id)
        for partition in range(load_settings().callback_partitions):
            for entry_id, fields in await redis.xrange(keys.callback_stream(partition)):
                action = json.loads(fields[b"action"])
                if (
                    action.get("task_id") in times
                    and action["action_type"] == "execution.completed"
                ):
                    times[action["task_id"]]["callback"] = id_ms(entry_id)
    finally:
        await redis.aclose()


def split(times: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, 90th percentile and mean of each hop (ms) over the tasks that have both ends."""
    result = {}
    for name, (start, end) in HOPS.items():
        spans = sorted(t[end] - t[start] for t in times.values() if start in t and end in t)
        if spans:
            result[name] = {
                "p50": round(statistics.median(spans), 2),
                "p90": round(spans[int(0.9 * (len(spans) - 1))], 2),
                "mean": round(statistics.fmean(spans), 2),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--stream", action="store_true", help="streamed answers (chunks)")
    args = parser.parse_args()
    redis = RedisServer().start()
    stack = LocalStack.for_redis(
        redis.url, log_dir=Path(tempfile.mkdtemp(prefix="chat-hops-logs-")), jwt_secret=SECRET,
        executor_chunk_delay_ms="0", default_tier="enterprise", log_level="WARNING",
    )  # fmt: skip
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        assert api.port is not None
        asyncio.run(_chat(api.port, api.ws_url, 20, args.stream))  # warm up
        pids = {child.role: child.process.pid for child in stack.children}
        assert redis.process is not None
        pids["redis"] = redis.process.pid
        before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        times = asyncio.run(_chat(api.port, api.ws_url, args.messages, args.stream))
        cpu_us = {
            role: (cpu_seconds(pid) - before[role]) * 1e6 / args.messages
            for role, pid in pids.items()
        }
        asyncio.run(stream_times(redis.url, times))
    finally:
        stack.stop()
        redis.cleanup()
    kind = "streamed" if args.stream else "plain"
    print(f"{args.messages} {kind} messages, one after another (ms):")
    for name, figures in split(times).items():
        print(f"  {name:38s} mean {figures['mean']:6.2f}  median {figures['p50']:6.2f}")
    print("CPU us per message: " + ", ".join(f"{r} {us:.0f}" for r, us in cpu_us.items()))


if __name__ == "__main__":
    main()
