"""Which callback partitions this worker consumes: leases, shared fairly among live workers.

A partition is consumed by one worker at a time, so the callbacks of a session (all in one
partition) are handled in the order the AES wrote them, however many workers run. Workers
heartbeat into a sorted set; each takes up to ceil(partitions / live workers) leases and gives
back extras, so partitions spread when a worker joins and move when one dies (its leases
expire after `partition_lease_seconds`).
"""

from __future__ import annotations

import logging
import math
import time
import zlib

from redis.asyncio import Redis

from services.core import clock, keys
from services.core.scripts import Scripts, missing_script

log = logging.getLogger(__name__)

LEASE_TRUST = 0.8  # of the lease's ttl, from when the renewal was sent


class PartitionLeases:
    def __init__(
        self, redis: Redis, scripts: Scripts, worker_id: str, partitions: int, ttl: float
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.worker_id = worker_id
        self.partitions = partitions
        self.ttl_ms = int(ttl * 1000)
        self.owned: set[int] = set()
        # Until when (time.monotonic) each owned lease surely still holds (see `valid`).
        self.valid_until: dict[int, float] = {}
        # How long a consumer of a newly taken partition waits before applying anything: the
        # previous owner stops starting batches at `LEASE_TRUST` of the ttl, and may still be
        # finishing one (`PartitionConsumer.run`). The first round at start takes only free
        # partitions of nobody, so it does not wait.
        self.takeover_grace = 0.0
        self._grace = min(3.0, max(0.5, 0.3 * ttl))
        # Taken just after their holder released them cleanly (its consumer stopped first): no
        # grace. With it, a clean SIGTERM hand-over froze the partition's sessions ~3 s more.
        self.handed_over: set[int] = set()
        # Start looking at a worker-specific offset so workers do not all race for partition 0.
        self._offset = zlib.crc32(worker_id.encode()) % partitions

    async def live_workers(self) -> int:
        now = clock.now()  # compared with other workers' heartbeats: one clock for all
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys.WORKER_HEARTBEATS, {self.worker_id: now})
            # A worker silent for a lease's ttl has lost its leases (the same round renews
            # both): counting it longer kept the survivors at their old share, and a dead
            # worker's partitions waited three leases instead of one.
            pipe.zremrangebyscore(keys.WORKER_HEARTBEATS, "-inf", now - self.ttl_ms / 1000)
            pipe.zcard(keys.WORKER_HEARTBEATS)
            _, _, live = await pipe.execute()
        return max(1, int(live))

    async def renew(self) -> set[int]:
        """Extend our leases; return the partitions we lost (expired and taken, or gone)."""
        if not self.owned:
            return set()
        owned = sorted(self.owned)
        started = time.monotonic()
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in owned:
                self.scripts.queue(
                    pipe,
                    self.scripts.lease,
                    [keys.partition_lease(partition)],
                    [self.worker_id, self.ttl_ms, "renew"],
                )
            results = await pipe.execute(raise_on_error=False)
        if any(missing_script(result) for result in results):
            await self.scripts.load()  # Redis lost its scripts: renew again next round
            return set()
        lost = set()
        for partition, held in zip(owned, results, strict=True):
            if isinstance(held, BaseException):
                # No answer for this lease (its node away, an error reply): it may still be
                # ours, but it was not renewed, so its trust is not extended; it runs out
                # unless a later renewal gets through, and the consumer stops applying.
                log.warning("lease of partition %s not renewed: %s", partition, held)
            elif not held:
                lost.add(partition)
                self.valid_until.pop(partition, None)
            else:
                self._trust(partition, started)
        self.owned -= lost
        return lost

    def valid(self, partition: int) -> bool:
        """Whether our lease on `partition` surely still holds, so that its consumer may apply.

        Redis expires a lease `ttl` after the last renewal it ran, which it ran after we sent
        it: until `sent + ttl` nobody else can hold it. We stop trusting it a margin earlier.
        While Redis (or the lease's node) is away the lease cannot be renewed, and another
        worker takes it once it expires; without this check the old owner's consumer, which
        learns of the loss only at its next successful renewal, would apply callbacks of the
        same partition at the same time as the new one, out of order.
        """
        return time.monotonic() < self.valid_until.get(partition, 0.0)

    def _trust(self, partition: int, sent: float) -> None:
        self.valid_until[partition] = sent + LEASE_TRUST * self.ttl_ms / 1000

    def surplus(self, live: int) -> list[int]:
        """Partitions to hand back so that every live worker can get its share."""
        target = math.ceil(self.partitions / live)
        extra = len(self.owned) - target
        return sorted(self.owned, reverse=True)[:extra] if extra > 0 else []

    async def acquire(self, live: int) -> None:
        """Take free leases up to our share; they are in `owned` as soon as taken.

        It may fail part way (a lease on a node that is away) after taking others: the
        caller starts a consumer for every owned partition that has none, whatever happened
        (`Worker._rebalance`), or those would be held and renewed but never consumed.
        """
        target = math.ceil(self.partitions / live)
        try:
            for step in range(self.partitions):
                if len(self.owned) >= target:
                    break
                partition = (self._offset + step) % self.partitions
                if partition in self.owned:
                    continue
                started = time.monotonic()
                taken = await self.redis.set(
                    keys.partition_lease(partition), self.worker_id, nx=True, px=self.ttl_ms
                )
                if taken:
                    self.owned.add(partition)
                    self._trust(partition, started)
                    if await self.redis.getdel(keys.partition_released(partition)):
                        self.handed_over.add(partition)
        finally:
            self.takeover_grace = self._grace

    async def release(self, partition: int) -> None:
        self.owned.discard(partition)
        self.valid_until.pop(partition, None)
        await self.scripts.lease(
            keys=[keys.partition_lease(partition), keys.partition_released(partition)],
            args=[self.worker_id, self.ttl_ms, "release"],
        )

    async def leave(self) -> None:
        """Give everything back at shutdown so another worker takes over at once."""
        for partition in sorted(self.owned):
            await self.release(partition)
        await self.redis.zrem(keys.WORKER_HEARTBEATS, self.worker_id)
        await self.redis.incr(keys.WORKER_DEPARTURES)

    async def departures(self) -> int:
        """How many workers have left cleanly so far (`leave`)."""
        return int(await self.redis.get(keys.WORKER_DEPARTURES) or 0)
