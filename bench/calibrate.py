"""How fast this machine is right now, so that runs at different times can be compared.

Every ratio of a run compares two sides measured minutes apart on the same machine, but the
absolute figures (and the ratios that depend on how many processes an event crosses) move
with the machine's state: on the development VM the same code measured a plain chat message
at 1.7-1.8 ms sequentially and, an hour later, at 4.2 ms, with the Redis-hops floor's CPU per
message 175 vs 320 us. Two figures explain most of that, and `bench/run.py` records both at
the start and at the end of a run (`machine.calibration` in the JSON):

- `python_loop_ms`: a fixed pure-Python workload (dicts, strings, calls), best of three: how
  fast the interpreter runs here.
- `xadd_cpu_us` / `xadd_wall_us`: client CPU and wall time of one redis-py XADD on uvloop
  against the run's Redis, back to back and after 2 ms of idleness each. The second is what
  a lightly loaded process pays per round trip (the wake-up of an idle process and of Redis),
  which is what "latency at 50% load" is mostly made of.

    python -m bench.calibrate [REDIS_URL]   # starts an embedded Redis when none is given
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop
from redis.asyncio import Redis

BACK_TO_BACK = 2_000
AFTER_IDLE = 300
IDLE_SECONDS = 0.002
STREAM = "bench:calibration"


def python_loop_ms(rounds: int = 3) -> float:
    """Best of `rounds` runs of a fixed workload shaped like our hot paths (dict and
    string work through Python calls), in milliseconds."""

    def step(i: int, table: dict[str, int]) -> int:
        key = f"k{i % 512}"
        table[key] = table.get(key, 0) + len(key)
        return table[key]

    best = float("inf")
    for _ in range(rounds):
        table: dict[str, int] = {}
        began = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += step(i, table)
        best = min(best, time.perf_counter() - began)
    return round(best * 1000, 1)


async def _xadds(redis: Redis, count: int, idle: float) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await redis.xadd(STREAM, {"a": "b"}, maxlen=1000, approximate=False)
        if idle:
            await asyncio.sleep(idle)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall - count * idle
    return {"cpu_us": round(cpu / count * 1e6, 1), "wall_us": round(wall / count * 1e6, 1)}


async def _round_trips(redis_url: str) -> dict[str, dict[str, float]]:
    redis = Redis.from_url(redis_url)
    try:
        await _xadds(redis, 200, 0.0)  # connect and warm up
        back_to_back = await _xadds(redis, BACK_TO_BACK, 0.0)
        after_idle = await _xadds(redis, AFTER_IDLE, IDLE_SECONDS)
        await redis.delete(STREAM)
    finally:
        await redis.aclose()
    return {"back_to_back": back_to_back, "after_2ms_idle": after_idle}


def calibrate(redis_url: str) -> dict[str, Any]:
    """The figures described in the module's docstring (about 2 seconds)."""
    trips = uvloop.run(_round_trips(redis_url))
    return {
        "python_loop_ms": python_loop_ms(),
        "xadd_cpu_us": {name: figures["cpu_us"] for name, figures in trips.items()},
        "xadd_wall_us": {name: figures["wall_us"] for name, figures in trips.items()},
    }


def summary(figures: dict[str, Any]) -> str:
    cpu = figures["xadd_cpu_us"]
    return (
        f"Python loop {figures['python_loop_ms']:.0f} ms; XADD client CPU "
        f"{cpu['back_to_back']:.0f} us back to back, {cpu['after_2ms_idle']:.0f} us after "
        "2 ms idle"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(summary(calibrate(args[0])))
        return 0
    from services.cli.embedded import RedisServer

    server = RedisServer().start()
    try:
        print(summary(calibrate(server.url)))
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
