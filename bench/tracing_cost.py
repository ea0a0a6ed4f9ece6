"""What tracing costs on the full chat path: off, sampled at 10 %, and at 100 %, in one run.

For each setting it starts an embedded Redis, one api, one worker and one executor (real
processes on 127.0.0.1) exporting OTLP/HTTP to a real receiver in this process, then measures
REST send -> final `chat.response` on a socket: the median of sequential messages, and the
throughput of many concurrent sessions. Run: `python bench/tracing_cost.py [--messages 200]`.
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
from services.cli.otlp_sink import Receiver
from services.cli.stack import LocalStack
from services.core.auth import issue_token
from services.core.settings import load_settings

SECRET = "tracing-cost-secret-" + "t" * 24
SETTINGS = {"off": None, "10%": "0.1", "100%": "1.0"}


def _token(tenant: str) -> str:
    settings = load_settings(jwt_secret=SECRET)
    return issue_token(settings, tenant_id=tenant, user_id="u", ttl_seconds=3600)


async def _answer_times(api: str, ws_url: str, session: str, count: int) -> list[float]:
    token = _token("bench")
    timings = []
    async with (
        websockets.connect(f"{ws_url}/ws/bench/{session}?token={token}") as ws,
        httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        await ws.recv()
        body = {"message": "how much does tracing cost", "stream": True, "session_id": session}
        for _ in range(count):
            started = time.perf_counter()
            task_id = (await http.post("/api/chat/send", json=body)).json()["task_id"]
            while True:
                event = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if event.get("task_id") == task_id and event["type"] == "chat.response":
                    break
            timings.append((time.perf_counter() - started) * 1000)
    return timings


async def _throughput(api: str, ws_url: str, sessions: int, per_session: int) -> float:
    started = time.perf_counter()
    await asyncio.gather(
        *(_answer_times(api, ws_url, f"load-{n}", per_session) for n in range(sessions))
    )
    return sessions * per_session / (time.perf_counter() - started)


def run(name: str, ratio: str | None, messages: int) -> tuple[float, float, int]:
    redis = RedisServer().start()
    receiver = Receiver().start()
    logs = Path(tempfile.mkdtemp(prefix=f"tracing-{name.strip('%')}-"))
    stack = LocalStack.for_redis(
        redis.url, log_dir=logs, jwt_secret=SECRET, default_tier="enterprise",
        executor_chunk_delay_ms="0", log_level="WARNING",
    )  # fmt: skip
    if ratio is not None:
        stack.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        stack.env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        stack.env["OTEL_TRACES_SAMPLER_ARG"] = ratio
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        asyncio.run(_answer_times(api.url, api.ws_url, "warm-up", 20))
        p50 = statistics.median(asyncio.run(_answer_times(api.url, api.ws_url, "p50", messages)))
        rate = asyncio.run(_throughput(api.url, api.ws_url, 20, max(1, messages // 20)))
    finally:
        stack.stop()
        receiver.stop()
        redis.cleanup()
    return p50, rate, len(receiver.spans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    rows = {name: run(name, ratio, args.messages) for name, ratio in SETTINGS.items()}
    base_p50, base_rate, _ = rows["off"]
    print(f"{'tracing':>8} {'p50 ms':>8} {'vs off':>7} {'msgs/s':>8} {'vs off':>7} {'spans':>7}")
    for name, (p50, rate, spans) in rows.items():
        print(
            f"{name:>8} {p50:8.2f} {p50 / base_p50:7.2f} {rate:8.1f} {rate / base_rate:7.2f} "
            f"{spans:7d}"
        )


if __name__ == "__main__":
    main()
