"""Release stream entries that every consumer group has read and acknowledged.

XADD's `MAXLEN ~ 1 000 000` only bounds a stream: without this, every consumed chunk and
every chat message's text stayed in Redis until its stream held a million entries (gigabytes
over a day's traffic). The worker trims, every `TRIM_SECONDS`, the callback partitions it holds
leases for and, from every worker, the AES streams and the cancel stream (the trim is one
atomic script and idempotent: two workers trimming one stream remove each entry once). The
trim point keeps whatever any group (ours, or an external AES's own) has not read or still
holds pending, so delivery is unchanged; only the memory of finished work goes. It runs off
the message path, on its own timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from prometheus_client import Counter
from redis.asyncio import Redis

from services.core import keys
from services.core.redis_client import REDIS_DOWN, REDIS_REFUSING
from services.core.streams import trim_consumed_all

log = logging.getLogger(__name__)

TRIM_SECONDS = 5.0  # how often consumed entries are released: memory held is ~5 s of traffic

trimmed_entries = Counter(
    "orchestrator_stream_trimmed_entries",
    "Stream entries removed after every consumer group had read and acknowledged them",
)


def streams_to_trim(owned: Iterable[int]) -> list[str]:
    """The callback partitions this worker consumes (their lease holder trims them), then the
    streams every worker trims: the AES priorities and the cancel stream."""
    streams = [keys.callback_stream(partition) for partition in sorted(owned)]
    return [*streams, *(keys.aes_stream(p) for p in keys.PRIORITIES), keys.CANCEL_STREAM]


async def trim_streams(redis: Redis, streams: Iterable[str]) -> int:
    """Trim each stream's consumed entries; returns how many entries went in all."""
    removed = 0
    for stream in streams:
        removed += await trim_consumed_all(redis, stream)
    if removed:
        trimmed_entries.inc(removed)
    return removed


async def run_trimmer(
    redis: Redis,
    owned: Callable[[], Iterable[int]],
    stopping: asyncio.Event,
    interval: float = TRIM_SECONDS,
) -> None:
    """Trim the worker's streams every `interval` until `stopping`. A failed round (Redis
    down or refusing writes, or a bug) is logged and tried again at the next one: an
    untrimmed stream only holds memory a little longer."""
    while not stopping.is_set():
        try:
            await trim_streams(redis, streams_to_trim(owned()))
        except (*REDIS_DOWN, *REDIS_REFUSING) as exc:
            log.debug("consumed stream entries not trimmed, redis unavailable: %s", exc)
        except Exception:
            log.exception("trimming consumed stream entries failed; trying again")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)
