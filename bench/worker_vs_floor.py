"""The worker's round against its floor: the same Redis work, in the real worker and in the
leanest loop Python runs it in.

At half of the delivery scenario's rate the worker keeps ~0.4 of the machine's two cores
busy, and on a nearly full machine every process on the path waits for a core: that is the
delivery p99 line of issue 5. Whether a cheaper worker could exist is a question of what its
round costs against the same work done with nothing around it: `bench/floor_worker.py`, the
joint loop's Redis work for `websocket.send` (the same reads, decode, script and acks) on a
raw uvloop protocol. Both sides get the same `websocket.send` load from one emitter (this
process), alternately, each in its own fresh process.

    python -m bench.worker_vs_floor [--rate 3000] [--seconds 5] [--pairs 2] [--json PATH]

Printed per side: the process's CPU (cores) while the load ran, and the latency from the
emitter's clock to the session log's id (Redis's clock, so it includes the emitter's XADD,
and a negative value is clock skew within a millisecond).
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

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
from redis.asyncio import Redis

from bench.common import Helper, cpu_seconds, machine, percentile
from services.cli.embedded import RedisServer
from services.cli.stack import LocalStack
from services.core import keys
from services.core.actions import ACTION_FIELD, WebsocketSend, encode_action

SOCKETS = 1_000
TENANTS = 4
WARMUP_EVENTS = 200
DRAIN_SECONDS = 30.0


def session(index: int) -> tuple[str, str]:
    return f"bench-{index % TENANTS}", f"s{index % SOCKETS}"


# ---- the comparison -----------------------------------------------------------------------


async def emit(redis_url: str, rate: float, seconds: float, partitions: int, first: int) -> int:
    """`websocket.send` at `rate` for `seconds`, pipelined per millisecond tick, each event
    carrying its emit time; returns how many were sent."""
    redis = Redis.from_url(redis_url)
    total, sent = int(rate * seconds), 0
    started = time.monotonic()
    try:
        while sent < total:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            if due == sent:
                await asyncio.sleep(0.001)
                continue
            pipe = redis.pipeline(transaction=False)
            for index in range(first + sent, first + due):
                tenant, sid = session(index)
                action = WebsocketSend(
                    tenant_id=tenant, session_id=sid, message={"t": time.time(), "i": index}
                )
                stream = keys.callback_stream(keys.partition_of(tenant, sid, partitions))
                pipe.xadd(stream, {ACTION_FIELD: encode_action(action)})
            await pipe.execute()
            sent = due
    finally:
        await redis.aclose()
    return total


async def _logged(redis: Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    pipe = redis.pipeline(transaction=False)
    for index in range(SOCKETS):
        pipe.xrange(keys.session_log(*session(index)))
    return [entry for log in await pipe.execute() for entry in log]


async def drain(redis_url: str, expected: int) -> list[float]:
    """Wait (bounded) until the session logs hold `expected` events; their latencies in ms.
    Then empty the logs for the next phase."""
    redis = Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + DRAIN_SECONDS
        while len(entries := await _logged(redis)) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(entries)} of {expected} events reached the logs")
            await asyncio.sleep(0.05)
        if len(entries) != expected:
            raise RuntimeError(f"{len(entries)} events in the logs for {expected} sent")
        latencies = []
        for entry_id, fields in entries:
            frame = msgspec.json.decode(b"{" + fields[b"e"])
            latencies.append(int(entry_id.split(b"-")[0]) - frame["data"]["t"] * 1000)
        await redis.delete(*[keys.session_log(*session(i)) for i in range(SOCKETS)])
        return latencies
    finally:
        await redis.aclose()


def phase(redis_url: str, pid: int, rate: float, seconds: float, partitions: int) -> dict:
    """Warm the side up (it has started when its first events reach the logs), then run the
    load and time it from the first event to the last one logged."""
    warmup = asyncio.run(emit(redis_url, WARMUP_EVENTS, 1.0, partitions, 0))
    asyncio.run(drain(redis_url, warmup))
    cpu, started = cpu_seconds(pid), time.monotonic()
    sent = asyncio.run(emit(redis_url, rate, seconds, partitions, warmup))
    latencies = asyncio.run(drain(redis_url, sent))
    busy, elapsed = cpu_seconds(pid) - cpu, time.monotonic() - started
    return {
        "events": sent,
        "cores": round(busy / elapsed, 3),
        "p50_ms": round(percentile(latencies, 0.5), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
    }


def compare(rate: float, seconds: float, pairs: int, partitions: int) -> dict[str, Any]:
    log_dir = Path(tempfile.mkdtemp(prefix="worker-floor-"))
    redis = RedisServer().start()
    stack = LocalStack.for_redis(
        redis.url, log_dir=log_dir, log_level="WARNING", callback_partitions=str(partitions)
    )
    runs: list[dict[str, Any]] = []
    processes = [redis.process.pid]
    try:
        for _ in range(pairs):
            worker = stack.start("worker")
            processes.append(worker.process.pid)
            try:
                ours = phase(redis.url, worker.process.pid, rate, seconds, partitions)
            finally:
                stack.stop_child(worker)
            config = {"redis_url": redis.url, "partitions": partitions}
            floor = Helper("floor", "bench.floor_worker", config, log_dir)
            processes.append(floor.pid)
            try:
                floor.recv(30)
                theirs = phase(redis.url, floor.pid, rate, seconds, partitions)
            finally:
                floor.stop()
            runs.append({"worker": ours, "floor": theirs})
    finally:
        stack.stop()
        redis.cleanup()
    ratios = [run["worker"]["cores"] / max(run["floor"]["cores"], 1e-3) for run in runs]
    return {
        "machine": machine(),
        "rate": rate,
        "seconds": seconds,
        "partitions": partitions,
        "runs": runs,
        "cores_ratio": round(statistics.median(ratios), 2),
        "processes": processes,  # all stopped by now
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"worker round vs its floor: websocket.send at {results['rate']:.0f}/s for "
        f"{results['seconds']:g} s, {results['partitions']} partitions",
        f"{'pair':<5} {'side':<7} {'cores':>6}  {'emit -> log p50 / p99 ms':>25}",
    ]
    for number, run in enumerate(results["runs"], 1):
        for side in ("worker", "floor"):
            row = run[side]
            lines.append(
                f"{number:<5} {side:<7} {row['cores']:>6.3f}  "
                f"{row['p50_ms']:>12.2f} / {row['p99_ms']:<10.2f}"
            )
    lines.append(f"worker / floor CPU (median of pairs): {results['cores_ratio']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=3000.0, help="callbacks per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--pairs", type=int, default=2, help="worker/floor runs, alternating")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    results = compare(args.rate, args.seconds, args.pairs, args.partitions)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
