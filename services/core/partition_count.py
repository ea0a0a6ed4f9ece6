"""The installation's number of callback partitions: recorded in Redis by its first api or
worker, checked by every one after it.

A task's callbacks and its deadline go to the partition its session hashes to, modulo
`CALLBACK_PARTITIONS`, and a worker reads partitions 0 to `CALLBACK_PARTITIONS - 1`. An api
with 16 and workers with 8 put half of the answers on streams nobody reads, and nothing said
so: the chart sets one value for both, but a hand-made deployment, or an upgrade that changed
the value while tasks were in flight, lost answers without a word. So the first process to
reach Redis records its count, and a process with another count refuses to start (or, an api
that could not reach Redis at its start, to send), naming both. `orchestrator partitions set`
changes the recorded count once nothing is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from services.core import keys
from services.core.settings import ConfigError

VARIABLE = "ORCHESTRATOR_CALLBACK_PARTITIONS"
HOW_TO_CHANGE = "README, 'Changing CALLBACK_PARTITIONS'"


class PartitionCountMismatch(ConfigError):
    """This process's count is not the installation's: its answers would be lost."""

    def __init__(self, count: int, recorded: str) -> None:
        self.count, self.recorded = count, recorded
        super().__init__(
            f"{VARIABLE}: {count}, but this installation's Redis records {recorded} (set by "
            "its first api or worker); every api and worker must use one count, or answers go "
            f"to streams no worker reads. Set {VARIABLE}={recorded}, or change the "
            f"installation's count with `orchestrator partitions set` ({HOW_TO_CHANGE})"
        )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def recorded_count(redis: Redis) -> int | None:
    """The installation's count, or None before any api or worker recorded one."""
    value = await redis.get(keys.CALLBACK_PARTITION_COUNT)
    if value is None:
        return None
    return _count(_text(value))


def _count(text: str) -> int:
    if not text.isdigit():  # not written by us
        raise ConfigError(
            f"{keys.CALLBACK_PARTITION_COUNT} holds {text!r}, not a count of partitions; "
            "`orchestrator partitions set N --force` records one"
        )
    return int(text)


async def claim(redis: Redis, count: int) -> None:
    """Record `count` as the installation's unless one is recorded; refuse another one."""
    for _ in range(2):  # a reset (`partitions set` by hand, a flush) between SET and GET
        if await redis.set(keys.CALLBACK_PARTITION_COUNT, count, nx=True):
            return
        recorded = await redis.get(keys.CALLBACK_PARTITION_COUNT)
        if recorded is None:
            continue
        if _text(recorded) != str(count):
            raise PartitionCountMismatch(count, _text(recorded))
        return


_claimed_at_start: set[int] = set()
"""The count `claim_at_start` recorded or found (a process's start check, before its service
is built): its service's first send or lease then costs no round trip. Without it, an api's
first send met Redis twice more, and a busy Redis answered it 503 where the send itself would
have been accepted."""


async def claim_at_start(redis: Redis, count: int) -> None:
    await claim(redis, count)
    _claimed_at_start.add(count)


class PartitionCheck:
    """`claim`, once per process: after the first answer, no more round trips."""

    def __init__(self, redis: Redis, count: int) -> None:
        self._redis = redis
        self._count = count
        self.verified = count in _claimed_at_start

    async def ensure(self) -> None:
        if not self.verified:
            await claim(self._redis, self._count)
            self.verified = True


@dataclass(frozen=True)
class InFlight:
    """What the partitions still hold: tasks not ended (deadlines and retries waiting), and
    callbacks no worker has applied yet (unread, or read and not acknowledged)."""

    tasks: int
    retries: int
    callbacks: int

    @property
    def empty(self) -> bool:
        return not (self.tasks or self.retries or self.callbacks)


async def in_flight(redis: Redis, count: int) -> InFlight:
    """Summed over partitions 0 to `count - 1` (one round trip per partition)."""
    tasks = retries = callbacks = 0
    for partition in range(count):
        tasks += await redis.zcard(keys.partition_deadlines(partition))
        retries += await redis.zcard(keys.partition_retries(partition))
        callbacks += await _unapplied(redis, keys.callback_stream(partition))
    return InFlight(tasks, retries, callbacks)


async def stranded_dead_letters(redis: Redis, count: int, batch: int = 1000) -> int:
    """Dead letters whose origin is a callback partition at or past `count`: with that count
    recorded, a replay would re-add them to a stream no worker reads (exit 0, the answer
    lost). Read through the whole dead-letter stream (an administrator's command)."""
    stranded, start = 0, "-"
    while rows := await redis.xrange(keys.DEAD_LETTERS, min=start, max="+", count=batch):
        for _, fields in rows:
            origin = _text((fields or {}).get(b"stream") or "")
            if origin.startswith("{cb:") and origin.endswith("}:callbacks"):
                number = origin[4 : -len("}:callbacks")]
                stranded += number.isdigit() and int(number) >= count
        start = "(" + _text(rows[-1][0])
    return stranded


async def _unapplied(redis: Redis, stream: str) -> int:
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0
        raise
    for info in groups:
        if _text(info["name"]) == keys.WORKER_GROUP:
            lag = info.get("lag")
            if lag is None:  # Redis cannot tell: as many as the stream holds, at most
                lag = await redis.xlen(stream)
            return int(info.get("pending") or 0) + int(lag)
    return int(await redis.xlen(stream))  # no worker ever read it: every entry is unread


async def change(redis: Redis, count: int) -> int | None:
    """Record `count` whatever was recorded; the count it replaced."""
    old = await redis.set(keys.CALLBACK_PARTITION_COUNT, count, get=True)
    if old is None or not _text(old).isdigit():
        return None
    return int(_text(old))
