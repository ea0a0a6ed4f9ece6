"""Throughput of the rate limiter alone: checks per second against an embedded Redis.

    .venv/bin/python bench/ratelimit_throughput.py [--seconds 5] [--concurrency 64]
        [--sessions 1000] [--pair] [--processes 1]

Each of `--concurrency` asyncio tasks loops on `RateLimiter.check` (one EVALSHA per check) over
`--sessions` session keys; `--pair` checks a session and its tenant in one pipelined round trip
(`check_many`), as the send path does, and counts two checks per call. `--processes` runs that
many client processes against the one server, to show where the server (not one Python event
loop) saturates. The server is started here, on a free port, and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core import keys
from services.core.ratelimit import RateCheck, RateLimiter

LIMIT_SESSION, LIMIT_TENANT = 600, 6000


async def _worker(
    limiter: RateLimiter, sessions: int, pair: bool, worker: int, deadline: float
) -> tuple[int, int]:
    checks = allowed = 0
    n = worker
    while time.monotonic() < deadline:
        tenant = f"t{n % 10}"
        session_key = keys.session_rate(tenant, f"s{n % sessions}")
        if pair:
            decisions = await limiter.check_many(
                [
                    RateCheck(session_key, LIMIT_SESSION),
                    RateCheck(keys.tenant_rate(tenant), LIMIT_TENANT),
                ]
            )
            checks += 2
            allowed += all(decision.allowed for decision in decisions)
        else:
            checks += 1
            allowed += (await limiter.check(session_key, LIMIT_SESSION)).allowed
        n += 7919  # a prime stride spreads the tasks over the keys
    return checks, allowed


async def _run(
    url: str, seconds: float, concurrency: int, sessions: int, pair: bool
) -> tuple[int, float]:
    """Checks made and the seconds they took (timed here, so start-up is not counted)."""
    redis = Redis.from_url(url, max_connections=concurrency + 4)
    try:
        limiter = RateLimiter(redis)
        await limiter.check("{warmup}:rl", 1)  # loads the script
        started = time.monotonic()
        results = await asyncio.gather(
            *(_worker(limiter, sessions, pair, i, started + seconds) for i in range(concurrency))
        )
        elapsed = time.monotonic() - started
    finally:
        await redis.aclose()
    return sum(checks for checks, _ in results), elapsed


def _process(
    url: str, seconds: float, concurrency: int, sessions: int, pair: bool
) -> tuple[int, float]:
    try:
        import uvloop

        return uvloop.run(_run(url, seconds, concurrency, sessions, pair))
    except ImportError:
        return asyncio.run(_run(url, seconds, concurrency, sessions, pair))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64, help="asyncio tasks per process")
    parser.add_argument("--sessions", type=int, default=1000, help="distinct session keys")
    parser.add_argument("--pair", action="store_true", help="session + tenant per round trip")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()

    server = RedisServer().start()
    try:
        work = (server.url, args.seconds, args.concurrency, args.sessions, args.pair)
        if args.processes == 1:
            results = [_process(*work)]
        else:
            with multiprocessing.Pool(args.processes) as pool:
                results = pool.starmap(_process, [work] * args.processes)
    finally:
        server.cleanup()
    total = sum(checks for checks, _ in results)
    rate = sum(checks / elapsed for checks, elapsed in results)
    mode = "check_many (session+tenant, 1 round trip)" if args.pair else "check (1 EVALSHA)"
    print(
        f"{mode}: {total} checks, {rate:,.0f} checks/s "
        f"({args.processes} process(es) x {args.concurrency} tasks, {args.sessions} sessions, "
        f"{args.seconds:g}s)"
    )


if __name__ == "__main__":
    main()
