"""One read and one pipeline for all the callback partitions a worker owns, on one server.

Each partition's own loop (`PartitionConsumer`) reads its stream and applies its batches by
itself: under a light load that is a round trip per partition per event. At half of the
delivery benchmark's saturation rate (8 partitions, ~4 800 events/s, batches of ~2 entries)
the worker spent 0.66-0.76 cores, more than at saturation, most of it in redis-py's fixed cost
per round trip. On a single server (standalone, or the primary behind Sentinel) one
XREADGROUP reads many streams, so this loop reads every steady partition at once and applies
all their batches in one pipeline, with the acks of the round before and the blocking read of
the next round: the replies of the effects come back at once and each batch is settled while
the read still waits (`round_trip`), so a batch costs one round trip, not two.

A partition joins when its own loop is steady (nothing pending that it has not applied) and
goes back to its own loop, which reads its pending list from the start in order as after any
failure, when anything is off: a batch that did not fully apply, a lost connection, a failed
ack, its lease in doubt, or a stop. A partition joining waits for the current read to return
(`JOIN_WAIT_SECONDS` at most). On Redis Cluster the streams of the partitions are in different
slots and each partition keeps its own loop.

This loop's client does not retry a pipeline on a lost connection: a retried read would
return the entries after those of the lost reply, which stay pending unseen. Every partition
goes back to its own loop instead. Its round trips skip most of redis-py's per-reply
machinery (`run_pipeline`): under a light load that fixed cost was most of the loop's CPU.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from services.core import clock, keys
from services.core.lean_pipeline import round_trip, run_pipeline
from services.core.redis_client import COMMAND_TIMEOUT_SECONDS, REDIS_DOWN
from services.core.settings import Settings
from services.core.streams import Entry, parse_read
from services.worker.partition import Batch, PartitionConsumer

log = logging.getLogger(__name__)

# The longest a blocking read of this loop waits, so that a partition joining (or stopping)
# is taken in (or let go) soon.
JOIN_WAIT_SECONDS = 0.1


class JointConsumer:
    def __init__(self, redis: Redis, settings: Settings, consumer: str) -> None:
        self.redis = redis  # a client that does not retry (see the module's docstring)
        self.settings = settings
        self.consumer = consumer
        self._members: dict[int, tuple[PartitionConsumer, asyncio.Future[bool]]] = {}
        self._joining: dict[int, tuple[PartitionConsumer, asyncio.Future[bool]]] = {}
        # Partitions to give back at the end of the round, and whether their loop should pause.
        self._leaving: dict[int, bool] = {}
        self._task: asyncio.Task[None] | None = None
        self._block_ms = int(min(settings.worker_sleep_seconds, JOIN_WAIT_SECONDS) * 1000) or 1
        # A round trip's deadline: its blocking read, then as long as any command may take.
        self._deadline = self._block_ms / 1000 + COMMAND_TIMEOUT_SECONDS

    async def consume(self, member: PartitionConsumer) -> bool:
        """Read and apply `member`'s partition in this loop until it must go back to its own;
        True when its loop should pause first (something failed)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._joining[member.partition] = (member, future)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        try:
            return await future
        finally:
            for held in (self._joining, self._members):
                if held.get(member.partition, (None, None))[1] is future:
                    del held[member.partition]

    async def _run(self) -> None:
        try:
            while self._members or self._joining:
                self._members.update(self._joining)
                self._joining.clear()
                try:
                    await self._round()
                except REDIS_DOWN as exc:
                    log.warning("partitions %s: redis unavailable (%s)", sorted(self._members), exc)
                    for partition in self._members:
                        self._leave(partition, pause=True)
                self._give_back()
        except BaseException as exc:
            # A bug: the partitions' own loops raise it (the worker logs and restarts them).
            # None of them stays a member: a loop started again must not find a dead one's
            # partition still read here while its own loop reads the pending list.
            for _, future in [*self._members.values(), *self._joining.values()]:
                if not future.done():
                    future.set_exception(exc)
            self._members.clear()
            self._joining.clear()
            self._leaving.clear()
            raise

    def _leave(self, partition: int, *, pause: bool) -> None:
        self._leaving[partition] = self._leaving.get(partition, False) or pause

    def _give_back(self) -> None:
        """Hand the partitions that leave back to their own loops, once the round is over (their
        loop must not run while this one still settles their batch)."""
        for partition, pause in self._leaving.items():
            held = self._members.pop(partition, None)
            if held is not None and not held[1].done():
                held[1].set_result(pause)
        self._leaving.clear()

    def _staying(self) -> list[PartitionConsumer]:
        return [m for p, (m, _) in self._members.items() if p not in self._leaving]

    async def _round(self) -> None:
        for member in self._staying():
            if member.stopping.is_set():
                self._leave(member.partition, pause=False)
            elif not member.lease_valid():
                # Its lease could not be renewed in time: another worker may own it now.
                self._leave(member.partition, pause=True)
        members = self._staying()
        if not members:
            return
        if any(member.reload_scripts for member in members):
            for member in members:
                member.reload_scripts = False
            await members[0].effects.scripts.load()
        batches = {m.partition: m.ahead for m in members if m.ahead}
        for member in members:
            member.ahead = []
        if not batches:
            batches = await self._read(members)
        if batches:
            await self._apply(members, batches)

    def _queue_read(self, pipe: Pipeline, members: list[PartitionConsumer], block: bool) -> None:
        pipe.xreadgroup(
            keys.WORKER_GROUP,
            self.consumer,
            {member.stream: ">" for member in members},
            count=self.settings.worker_batch_size,
            block=self._block_ms if block else None,
        )

    def _take_acks(
        self, members: list[PartitionConsumer], counts: list[int], replies: list[Any]
    ) -> int:
        """Give each member the replies of what its `queue_acks` queued; a member whose acks
        failed goes back to its own loop (its acks are kept). Returns the replies used."""
        offset = 0
        for member, count in zip(members, counts, strict=True):
            try:
                member.acked(replies[offset : offset + count])
            except ResponseError as exc:
                log.warning("partition %s: acknowledging failed (%s)", member.partition, exc)
                self._leave(member.partition, pause=True)
            offset += count
        return offset

    def _split(self, read: Any, members: list[PartitionConsumer]) -> dict[int, list[Entry]]:
        """A multi-stream read of `members` by partition, without the partitions leaving
        (their own loop reads them from their pending list). Every member goes back to its own
        loop if the read failed (a stream without its group fails the whole command)."""
        if isinstance(read, BaseException):
            log.warning("partitions %s: read failed (%s)", [m.partition for m in members], read)
            for member in members:
                self._leave(member.partition, pause=True)
            return {}
        partition_of = {member.stream: member.partition for member in members}
        batches: dict[int, list[Entry]] = {}
        for entry in parse_read(read):
            batches.setdefault(partition_of[entry.stream], []).append(entry)
        return {p: read for p, read in batches.items() if p not in self._leaving}

    async def _read(self, members: list[PartitionConsumer]) -> dict[int, list[Entry]]:
        """The acks of the last round, then a blocking read of every member's stream."""
        async with self.redis.pipeline(transaction=False) as pipe:
            counts = [member.queue_acks(pipe) for member in members]
            self._queue_read(pipe, members, block=True)
            replies = await run_pipeline(pipe, within=self._deadline)
        used = self._take_acks(members, counts, replies)
        return self._split(replies[used], members)

    async def _apply(
        self, members: list[PartitionConsumer], entries: dict[int, list[Entry]]
    ) -> None:
        """Every member's batch in one pipeline, with the acks of the last round and the next
        read, which blocks: each batch is settled by its partition as soon as the replies of
        its effects are in, while the read waits for new entries. Under a light load that is
        one round trip per batch; the usage counts, retries and acks of a batch go with the
        next round (at most `JOIN_WAIT_SECONDS` later)."""
        by_partition = {member.partition: member for member in members}
        batches: list[tuple[PartitionConsumer, Batch]] = []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for partition, read in entries.items():
                    member = by_partition[partition]
                    batch = await member.decode(read)
                    if batch is None:
                        continue
                    if not member.lease_valid():  # expired while the batch was read
                        batch.end_spans()
                        self._leave(partition, pause=True)
                        continue
                    await member.queue_effects(batch, pipe)
                    batches.append((member, batch))
                staying = self._staying()
                counts = [member.queue_acks(pipe, lazy=True) for member in staying]
                self._queue_read(pipe, staying, block=True)
                applied_at = clock.now()  # compared with Redis's stream ids (lag)
                for _, batch in batches:
                    batch.applied_at = applied_at
                effects = sum(len(batch.decoded) for _, batch in batches)
                async with round_trip(pipe, within=self._deadline) as trip:
                    replies = await trip.take(effects + sum(counts))
                    self._take_acks(staying, counts, replies[effects:])
                    offset = 0
                    for member, batch in batches:
                        mine = replies[offset : offset + len(batch.decoded)]
                        offset += len(batch.decoded)
                        if not await member.settle(batch, mine):
                            self._leave(member.partition, pause=True)
                        batch.end_spans()
                    (read,) = await trip.take(1)
            ahead = self._split(read, staying)
            for member in self._staying():
                member.ahead = ahead.get(member.partition, [])
        finally:
            for _, batch in batches:
                batch.end_spans()
