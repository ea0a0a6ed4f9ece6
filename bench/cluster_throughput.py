"""Message-path throughput on one Redis server vs a local 3-master Redis Cluster.

Starts the same deployment (two apis, two workers, one executor, real processes on 127.0.0.1)
on each topology in turn, opens one socket per session, sends every session's messages over
REST as fast as the answers come back (each session waits for its answer before sending the
next), and prints answered messages per second and delivered socket events per second.
All processes share this machine's cores with Redis, so the figures compare the topologies'
overhead here rather than a cluster's capacity across hosts.

Run: `python bench/cluster_throughput.py [--sessions 40] [--messages 15] [--repeat 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import websockets

from services.cli.embedded import LocalCluster, LocalRedis, RedisServer
from services.cli.stack import LocalStack
from services.core.auth import issue_token
from services.core.settings import load_settings

SECRET = "cluster-benchmark-secret-" + "c" * 24


@dataclass
class Result:
    topology: str
    messages: int
    events: int
    seconds: float

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds


async def session(api: str, ws_url: str, name: str, messages: int, repeat: int) -> int:
    """One session's conversation; returns the socket events it received."""
    token = issue_token(
        load_settings(jwt_secret=SECRET), tenant_id="bench", user_id=name, ttl_seconds=3600
    )
    received = 0
    body = {"stream": True, "session_id": name, "context": {"simulate": {"repeat": repeat}}}
    async with (
        websockets.connect(
            f"{ws_url}/ws/bench/{name}",
            subprotocols=["orchestrator.v1", f"bearer.{token}"],  # type: ignore[list-item]
        ) as ws,
        httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        await ws.recv()  # connection.ack
        for n in range(messages):
            reply = await http.post("/api/chat/send", json={**body, "message": f"m{n}"})
            reply.raise_for_status()
            task_id = reply.json()["task_id"]
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 30))
                received += 1
                if event.get("task_id") == task_id and event["type"] == "chat.response":
                    break
    return received


async def drive(apis: list[tuple[str, str]], sessions: int, messages: int, repeat: int) -> int:
    runs = [
        session(*apis[n % len(apis)], f"s{n}-{time.monotonic_ns()}", messages, repeat)
        for n in range(sessions)
    ]
    return sum(await asyncio.gather(*runs))


def measure(name: str, redis: LocalRedis, args: argparse.Namespace) -> Result:
    logs = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    stack = LocalStack.for_redis(
        redis.url, log_dir=logs, jwt_secret=SECRET, default_tier="enterprise",
        executor_chunk_delay_ms="0", log_level="WARNING", **redis.client_settings(),
    )  # fmt: skip
    try:
        apis = [stack.start_api(), stack.start_api()]
        stack.start("worker")
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(*apis)
        urls = [(api.url, api.ws_url) for api in apis]
        asyncio.run(drive(urls, 4, 5, args.repeat))  # warm up
        started = time.perf_counter()
        events = asyncio.run(drive(urls, args.sessions, args.messages, args.repeat))
        seconds = time.perf_counter() - started
        stack.check_alive()
    finally:
        stack.stop()
    return Result(name, args.sessions * args.messages, events, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--messages", type=int, default=15, help="per session")
    parser.add_argument("--repeat", type=int, default=2, help="answer length (simulate.repeat)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per topology (median)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    runs: dict[str, list[Result]] = {"standalone": [], "cluster-3": []}
    for _ in range(args.rounds):  # interleaved, so a busy moment of the machine hits both
        for name, factory in (("standalone", RedisServer), ("cluster-3", LocalCluster)):
            redis = factory()
            try:
                redis.start()
                runs[name].append(measure(name, redis, args))
            finally:
                redis.cleanup()
    medians = {}
    for name, results in runs.items():
        medians[name] = statistics.median(r.events_per_second for r in results)
        each = ", ".join(f"{r.events_per_second:.0f}" for r in results)
        print(
            f"{name:>10}: {results[0].messages} messages per run; median "
            f"{statistics.median(r.messages_per_second for r in results):.0f} messages/s, "
            f"{medians[name]:.0f} socket events/s (runs: {each})"
        )
    print(f"cluster / standalone: {medians['cluster-3'] / medians['standalone']:.2f}x")
    if args.json:
        figures = {name: [asdict(r) for r in results] for name, results in runs.items()}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
