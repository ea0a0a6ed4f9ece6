"""The clock every timestamp that another process compares is taken from: Redis's.

A task's deadline is set by the api and fired by a worker; a worker's heartbeat is pruned by
another worker; a session's erasure is compared with the creation of its tasks by the
persistence writer. Each pod's own clock made those comparisons wrong by the pods' skew: a
worker 90 s ahead timed every free-tier task out at once, a worker 60 s behind never got a
partition (its heartbeat pruned by the first one at every round), an api 60 s ahead let an
erased conversation back into the history. Rate limits and dispatch already use Redis `TIME`
inside their scripts; everything else reads `now()` here: the local clock plus the offset to
Redis's, measured at start and every `SYNC_SECONDS` after (one `TIME` round trip; the error is
at most half of it, milliseconds). Before the first measurement, and where Redis cannot be
asked, the offset is 0: the local clock, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

SYNC_SECONDS = 30.0
UNSYNCED_RETRY_SECONDS = 0.5
SKEW_WARNING_SECONDS = 5.0  # logged: a pod this far from Redis has an unsynchronised clock
_SAMPLES = 3  # the sample with the shortest round trip is the least wrong

_offset = 0.0
_synced = False


def now() -> float:
    """Seconds since the epoch on Redis's clock (as far as the last sync knows)."""
    return time.time() + _offset


def utcnow() -> datetime:
    return datetime.fromtimestamp(now(), UTC)


def offset() -> float:
    return _offset


async def sync(redis: Any) -> float:
    """Measure the local clock's offset to Redis's and use it from now on; returns it."""
    global _offset
    best: tuple[float, float] | None = None  # (round trip, offset)
    for _ in range(_SAMPLES):
        sent = time.time()
        reply = await redis.time()
        received = time.time()
        if isinstance(reply, dict):  # a cluster answers per node: one is enough
            reply = next(iter(reply.values()))
        seconds, micros = reply
        sample = (received - sent, seconds + micros / 1_000_000 - (sent + received) / 2)
        if best is None or sample[0] < best[0]:
            best = sample
    assert best is not None
    if abs(best[1]) >= SKEW_WARNING_SECONDS and abs(_offset) < SKEW_WARNING_SECONDS:
        log.warning(
            "this pod's clock is %.1f s off Redis's: timestamps use Redis's (check NTP)",
            -best[1],
        )
    global _synced
    _offset, _synced = best[1], True
    return _offset


async def ensure_synced(redis: Any) -> None:
    """Sync now if no sync has succeeded yet (a pod started before Redis answered): called
    before a timestamp other processes compare is taken, one round trip until then."""
    if not _synced:
        with contextlib.suppress(Exception):  # the caller's own Redis call will tell
            await sync(redis)


async def keep_synced(redis: Any, every: float = SYNC_SECONDS) -> None:
    """Sync now and every `every` seconds until cancelled; a failed sync keeps the last offset
    (Redis down: nothing is compared meanwhile that would not fail anyway). Until one has
    succeeded (a pod started before Redis answered), every `UNSYNCED_RETRY_SECONDS`: it
    stamped its tasks on its own clock for up to `every` after Redis came up."""
    synced = False
    while True:
        try:
            await sync(redis)
            synced = True
        except Exception:
            log.debug("clock sync with Redis failed", exc_info=True)
        await asyncio.sleep(every if synced else UNSYNCED_RETRY_SECONDS)
