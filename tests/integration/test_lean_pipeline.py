"""`run_pipeline` on a real Redis: the same replies as redis-py's own pipeline (plain and
transactional), and a lost connection or a missed deadline as redis-py's outage errors, the
connection usable after."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core.lean_pipeline import round_trip, run_pipeline
from services.core.redis_client import create_redis
from services.core.settings import load_settings


def assert_same_replies(lean: list[Any], expected: list[Any]) -> None:
    """Equal replies, and an error reply where redis-py has one, of the same type."""
    for mine, theirs in zip(lean, expected, strict=True):
        if isinstance(theirs, Exception):
            assert type(mine) is type(theirs)
        else:
            assert _timeless(mine) == _timeless(theirs)


def _timeless(reply: Any) -> Any:
    """A reply without XPENDING's `time_since_delivered`: the milliseconds since the read
    before it in the same pipeline, 0 or 1 depending on where a millisecond ends (a CI run
    saw 1 for one and 0 for the other). Its presence and type still count."""
    if isinstance(reply, list):
        return [_timeless(item) for item in reply]
    if isinstance(reply, dict) and "time_since_delivered" in reply:
        assert isinstance(reply["time_since_delivered"], int)
        return {**reply, "time_since_delivered": "some ms"}
    return reply


def queue_a_mix(pipe: Any) -> None:
    pipe.set("lean:k", "v")
    pipe.get("lean:k")
    pipe.hset("lean:h", mapping={"a": "1", "b": "2"})
    pipe.hgetall("lean:h")
    pipe.xadd("lean:s", {"f": "v"}, id="1-1")
    pipe.xgroup_create("lean:s", "g", id="0")
    pipe.xreadgroup("g", "c", {"lean:s": ">"}, count=10)
    pipe.xpending_range("lean:s", "g", min="-", max="+", count=10)
    pipe.evalsha("0" * 40, 0)  # not loaded: NOSCRIPT in place
    pipe.lpush("lean:k", "x")  # wrong type: an error reply in place
    pipe.exists("lean:k", "lean:h", "lean:none")
    pipe.zadd("lean:z", {"m": 1.5})
    pipe.zscore("lean:z", "m")


async def lean_then_redis_py(
    client: Redis, queue: Callable[[Any], None], *, transaction: bool
) -> tuple[list[Any], list[Any]]:
    """The replies of the commands `queue` adds, through `run_pipeline`, then (on an empty
    database again) through redis-py's own pipeline."""
    async with client.pipeline(transaction=transaction) as pipe:
        queue(pipe)
        lean = await run_pipeline(pipe, within=2.0)
    await client.flushall()
    async with client.pipeline(transaction=transaction) as pipe:
        queue(pipe)
        expected = await pipe.execute(raise_on_error=False)
    return lean, expected


async def test_replies_are_those_of_redis_py_own_pipeline(redis: Redis) -> None:
    client = create_redis(load_settings(redis_url=_url(redis)), max_connections=2, retries=0)
    try:
        lean, expected = await lean_then_redis_py(client, queue_a_mix, transaction=False)
    finally:
        await client.aclose()
    assert len(lean) == len(expected) == 13
    assert_same_replies(lean, expected)
    assert isinstance(lean[8], NoScriptError)
    assert isinstance(lean[9], ResponseError)
    assert lean[1] == b"v"
    assert lean[3] == {b"a": b"1", b"b": b"2"}
    assert lean[6] == [[b"lean:s", [(b"1-1", {b"f": b"v"})]]]
    assert lean[12] == 1.5


async def test_a_lost_connection_raises_and_the_next_round_trip_reconnects(
    redis: Redis,
) -> None:
    client = create_redis(load_settings(redis_url=_url(redis)), max_connections=1, retries=0)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.client_setname("lean-victim")
            await run_pipeline(pipe, within=2.0)
        await redis.client_kill_filter(_type="normal", skipme=True)
        async with client.pipeline(transaction=False) as pipe:
            pipe.ping()
            with pytest.raises(RedisConnectionError):
                await run_pipeline(pipe, within=2.0)
        async with client.pipeline(transaction=False) as pipe:
            pipe.ping()
            assert await run_pipeline(pipe, within=2.0) == [True]
    finally:
        await client.aclose()


async def test_a_missed_deadline_raises_and_drops_the_connection(redis: Redis) -> None:
    client = create_redis(load_settings(redis_url=_url(redis)), max_connections=1, retries=0)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.blpop(["lean:empty"], timeout=1)
            with pytest.raises(RedisTimeoutError):
                await run_pipeline(pipe, within=0.05)
        # The BLPOP's late reply went with the dropped connection, not to this command.
        async with client.pipeline(transaction=False) as pipe:
            pipe.get("lean:nothing")
            pipe.ping()
            assert await run_pipeline(pipe, within=2.0) == [None, True]
    finally:
        await client.aclose()


async def test_an_empty_pipeline_needs_no_round_trip(redis: Redis) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        assert await run_pipeline(pipe, within=1.0) == []


async def test_replies_before_a_blocking_read_are_taken_while_it_waits(redis: Redis) -> None:
    client = create_redis(load_settings(redis_url=_url(redis)), max_connections=1, retries=0)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("lean:rt", "v")
            pipe.get("lean:rt")
            pipe.blpop(["lean:rt-list"], timeout=5)
            async with round_trip(pipe, within=6.0) as trip:
                # Taken while the BLPOP still waits: nothing has been pushed yet.
                assert await trip.take(2) == [True, b"v"]
                assert trip.unread == 1
                await redis.rpush("lean:rt-list", "pushed")
                assert await trip.take(1) == [(b"lean:rt-list", b"pushed")]
            with pytest.raises(ValueError, match="asked for"):
                await trip.take(1)
        assert await client.get("lean:rt") == b"v"  # the connection went back to the pool
    finally:
        await client.aclose()


async def test_leaving_a_round_trip_with_replies_unread_drops_its_connection(
    redis: Redis,
) -> None:
    client = create_redis(load_settings(redis_url=_url(redis)), max_connections=1, retries=0)
    try:
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("lean:left", "1")
            pipe.blpop(["lean:left-list"], timeout=1)
            async with round_trip(pipe, within=2.0) as trip:
                assert await trip.take(1) == [True]
        # The BLPOP's reply went with the dropped connection: this GET gets its own.
        await redis.rpush("lean:left-list", "late")
        assert await client.get("lean:left") == b"1"
        assert await redis.lrange("lean:left-list", 0, -1) == [b"late"]
    finally:
        await client.aclose()


def queue_a_transaction(pipe: Any) -> None:
    pipe.xadd("lean:t", {"f": "v"}, id="1-1")
    pipe.xgroup_create("lean:t", "g", id="0")
    pipe.xreadgroup("g", "c", {"lean:t": ">"}, count=10)
    pipe.xack("lean:t", "g", "1-1")
    pipe.set("lean:x", "v")
    pipe.lpush("lean:x", "y")  # runs and fails (wrong type): its error in place
    pipe.hset("lean:th", mapping={"a": "1"})
    pipe.hgetall("lean:th")


async def test_a_transaction_replies_as_redis_py_own(redis: Redis) -> None:
    client = create_redis(load_settings(redis_url=_url(redis)), max_connections=2, retries=0)
    try:
        lean, expected = await lean_then_redis_py(client, queue_a_transaction, transaction=True)
        # Nothing of the transaction is left unread on the connection.
        assert await client.ping() is True
    finally:
        await client.aclose()
    assert len(lean) == len(expected) == 8
    assert_same_replies(lean, expected)
    assert lean[2] == [[b"lean:t", [(b"1-1", {b"f": b"v"})]]]
    assert lean[3] == 1
    assert isinstance(lean[5], ResponseError)
    assert lean[7] == {b"a": b"1"}


async def test_a_command_refused_at_queueing_aborts_the_whole_transaction(redis: Redis) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set("lean:abort", "1")
        pipe.execute_command("XADD", "lean:abort-s")  # wrong number of arguments
        pipe.set("lean:abort-2", "2")
        with pytest.raises(ResponseError, match="wrong number of arguments"):
            await run_pipeline(pipe, within=2.0)
    assert await redis.exists("lean:abort", "lean:abort-2") == 0
    assert await redis.ping() is True


async def test_watch_is_refused(redis: Redis) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        await pipe.watch("lean:watched")
        pipe.multi()
        pipe.set("lean:watched", "1")
        with pytest.raises(ValueError, match="WATCH"):
            await run_pipeline(pipe, within=1.0)


def _url(redis: Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"
