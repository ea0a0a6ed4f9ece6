"""`orchestrator worker`: hold partition leases and run one consumer per owned partition.

On SIGTERM the worker stops reading, lets each consumer finish the batch in hand (effects
applied and acknowledged), gives its leases back so another worker takes over at once, and
exits 0. Deadlines and retries of all owned partitions are fired by one timer task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from services.core import clock, keys
from services.core.heap import freeze_startup_heap
from services.core.listening import serve_metrics
from services.core.partition_count import PartitionCheck
from services.core.redis_client import REDIS_DOWN, REDIS_REFUSING, create_redis
from services.core.scripts import Scripts
from services.core.settings import RedisMode, Settings, process_name
from services.core.streams import ensure_group
from services.core.task_metrics import create_series
from services.core.task_stop import cancel_and_wait
from services.core.tasks import TaskStore, Verdict
from services.core.tiers import load_tiers
from services.persistence.backlog import backlog
from services.persistence.writer import (
    RECORD_OUTCOMES,
    PersistenceWriter,
    backlog_gauge,
    records_written,
)
from services.worker import metrics
from services.worker.callbacks import CallbackEffects
from services.worker.joint import JointConsumer
from services.worker.leases import PartitionLeases
from services.worker.partition import PartitionConsumer
from services.worker.schedule import TICK_SECONDS, fire_due_all
from services.worker.trim import TRIM_SECONDS, run_trimmer

log = logging.getLogger(__name__)


def worker_name(settings: Settings) -> str:
    return process_name(settings)


LAG_COUNT_MAX = 10_000  # enough to scale on; counting a longer backlog is not worth it
# How often a worker between rounds looks whether another one left (one GET).
DEPARTURE_WATCH_SECONDS = 0.5
WRITER_RESTART_SECONDS = (1.0, 30.0)  # first and longest pause before a failed writer restarts


async def _unread(redis: Redis, stream: str, info: dict[Any, Any]) -> int:
    """Entries after the group's last delivered one, counted (up to LAG_COUNT_MAX): Redis
    reports no lag once an entry after that position was deleted, and 0 would hide a backlog
    from the autoscaler and the lag alert."""
    last = info.get("last-delivered-id") or b"0-0"
    last = last.decode() if isinstance(last, bytes) else str(last)
    return len(await redis.xrange(stream, f"({last}", "+", count=LAG_COUNT_MAX) or [])


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker_id = worker_name(settings)
        self._writer: PersistenceWriter | None = None  # the one running (`_keep_writing`)
        # Each owned partition blocks one connection in XREADGROUP; leave room for the rest.
        self.redis = create_redis(
            settings, max_connections=settings.callback_partitions + settings.redis_max_connections
        )
        self.scripts = Scripts(self.redis)
        self.tasks = TaskStore(self.redis, self.scripts, settings)
        self.effects = CallbackEffects(self.tasks, self.scripts, settings)
        self.leases = PartitionLeases(
            self.redis,
            self.scripts,
            self.worker_id,
            settings.callback_partitions,
            settings.partition_lease_seconds,
        )
        self.partitions = PartitionCheck(self.redis, settings.callback_partitions)
        self.consumers: dict[int, tuple[PartitionConsumer, asyncio.Task[None]]] = {}
        # On one server, the steady partitions are read and applied together (`joint`).
        self.joint_redis: Redis | None = None
        self.joint: JointConsumer | None = None
        if settings.redis_mode is not RedisMode.cluster:
            self.joint_redis = create_redis(settings, max_connections=2, retries=0)
            self.joint = JointConsumer(self.joint_redis, settings, self.worker_id)
        self.tenant_labels = metrics.TenantLabels(settings.metrics_tenant_labels)
        self._lag_reported: set[tuple[str, str]] = set()
        self.stopping = asyncio.Event()
        self.trim_seconds = TRIM_SECONDS  # consumed stream entries are released this often

    def _start_consumer(self, partition: int, start_after: float = 0.0) -> None:
        consumer = PartitionConsumer(
            self.redis,
            self.effects,
            self.tasks,
            self.settings,
            self.worker_id,
            partition,
            self.tenant_labels,
            lease_valid=lambda: self.leases.valid(partition),
            start_after=start_after,
            joint=self.joint,
        )
        task = asyncio.get_running_loop().create_task(consumer.run())
        self.consumers[partition] = (consumer, task)

    async def _stop_consumer(self, partition: int) -> None:
        await self._stop_consumers([partition])

    async def _stop_consumers(self, partitions: Iterable[int]) -> None:
        """Tell them all to stop, then wait for them together: one after another, each waiting
        out its Redis timeout while Redis is unreachable, 8 partitions took ~40 s to stop,
        past the pod's grace period (SIGKILL). A partition without a consumer is passed by:
        one whose release failed part way (Redis away) is still owned, its consumer already
        stopped, and is surplus again the next round: the worker died of a KeyError there."""
        stopping = [
            stopped
            for partition in partitions
            if (stopped := self.consumers.pop(partition, None)) is not None
        ]
        for consumer, _ in stopping:
            consumer.stop()
        await asyncio.gather(*(task for _, task in stopping), return_exceptions=True)

    def _restart_crashed(self) -> None:
        """A consumer loop that died of a bug is logged and restarted, never silently lost."""
        for partition, (_, task) in list(self.consumers.items()):
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error(
                    "consumer of partition %s crashed; restarting it",
                    partition,
                    exc_info=task.exception(),
                )
                self._start_consumer(partition)

    async def _rebalance(self) -> None:
        self._restart_crashed()
        # Checked at start when Redis answered then (services/cli/main.py); else here,
        # before any partition is taken: a mismatch stops the worker with one line.
        await self.partitions.ensure()
        live = await self.leases.live_workers()
        lost = await self.leases.renew()
        for partition in lost:
            log.info("lost partition %s", partition)
        await self._stop_consumers(lost)
        surplus = list(self.leases.surplus(live))
        await self._stop_consumers(surplus)
        for partition in surplus:
            await self.leases.release(partition)
        grace = self.leases.takeover_grace  # read before `acquire` sets it: 0 at start
        try:
            await self.leases.acquire(live)
        finally:
            # Also the leases taken before `acquire` failed part way: held (and renewed from
            # now on), they must be consumed.
            for partition in sorted(self.leases.owned - self.consumers.keys()):
                log.info("took partition %s", partition)
                clean = partition in self.leases.handed_over
                self.leases.handed_over.discard(partition)
                self._start_consumer(partition, 0.0 if clean else grace)

    async def _report_lag(self, interval: float) -> None:
        """`_sample_lag` every `interval`, on its own: in the lease loop, its round trips (one
        per stream) delayed the renewals, and with Redis 300 ms away a lone worker lost its
        own leases."""
        while not self.stopping.is_set():
            try:
                await self._sample_lag()
            except (*REDIS_DOWN, *REDIS_REFUSING) as exc:
                log.debug("stream lag not sampled, redis unavailable: %s", exc)
                self._forget_lag()
            except Exception:
                log.exception("sampling stream lag failed; trying again")
                self._forget_lag()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    def _forget_lag(self) -> None:
        """Drop the lag and pending series while they cannot be sampled: the last values stayed
        exported (a worker cut off from Redis said "0 behind", as a healthy idle one does); a
        gap is what the panels and `OrchestratorStreamLag` should see instead."""
        for stream, group in self._lag_reported:
            metrics.stream_lag.remove(stream, group)
            metrics.stream_pending.remove(stream, group)
        self._lag_reported = set()

    async def _sample_lag(self) -> None:
        """Lag and pending entries of the streams this worker owns (the AES streams too, from
        the owner of partition 0, so that each stream is reported by exactly one worker)."""
        streams = [(keys.callback_stream(p), keys.WORKER_GROUP) for p in self.leases.owned]
        if 0 in self.leases.owned:
            streams += [(keys.aes_stream(p), keys.AES_GROUP) for p in keys.PRIORITIES]
        reported: set[tuple[str, str]] = set()
        answers = await asyncio.gather(
            *(self.redis.xinfo_groups(stream) for stream, _ in streams), return_exceptions=True
        )
        for (stream, group), groups in zip(streams, answers, strict=True):
            if isinstance(groups, ResponseError):
                continue  # no such stream yet
            if isinstance(groups, BaseException):
                raise groups
            for info in groups:
                name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
                if name == group:
                    lag = info.get("lag")
                    if lag is None:  # Redis cannot tell (entries deleted after the group's
                        lag = await _unread(self.redis, stream, info)  # position): count them
                    metrics.stream_lag.labels(stream, group).set(lag)
                    metrics.stream_pending.labels(stream, group).set(info.get("pending") or 0)
                    reported.add((stream, group))
        for stream, group in self._lag_reported - reported:
            metrics.stream_lag.remove(stream, group)
            metrics.stream_pending.remove(stream, group)
        self._lag_reported = reported

    async def _fire_timers(self) -> None:
        """Deadlines and retries of every partition consumed here: one round trip per tick
        finds what is due in all of them. Only partitions whose consumer runs (its takeover
        grace over) and whose lease surely holds are fired."""
        while not self.stopping.is_set():
            schedules = [
                consumer.schedule
                for consumer, _ in self.consumers.values()
                if consumer.active and consumer.lease_valid()
            ]
            more = False
            try:
                more = await fire_due_all(self.redis, schedules)
            except (*REDIS_DOWN, *REDIS_REFUSING) as exc:  # the consumers report the outage
                log.debug("deadlines and retries not fired, redis unavailable: %s", exc)
            except Exception:
                log.exception("firing deadlines and retries failed; trying again")
            if more:  # a full batch was due: the rest is due already, not in a tick
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), TICK_SECONDS)

    async def _until_next_round(self, interval: float) -> None:
        """Wait `interval`, or less: until another worker leaves cleanly (its partitions are
        free now, and waiting for the round kept their sessions frozen up to a third of a
        lease), or until told to stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + interval
        try:
            seen = await self.leases.departures()
        except (*REDIS_DOWN, *REDIS_REFUSING):
            seen = None
        while not self.stopping.is_set() and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), min(left, DEPARTURE_WATCH_SECONDS))
            if seen is None or self.stopping.is_set():
                continue
            with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):
                if await self.leases.departures() != seen:
                    return

    async def run(self) -> None:
        interval = self.settings.partition_lease_seconds / 3
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):  # else loaded on first NOSCRIPT
            await self.scripts.load()
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):
            await clock.sync(self.redis)  # before the first heartbeat (else: the local clock)
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):
            await self._ensure_aes_groups()
        syncing = asyncio.get_running_loop().create_task(clock.keep_synced(self.redis))
        log.info("worker %s started", self.worker_id)
        writing: asyncio.Task[None] | None = None
        if self.settings.database_url:
            # Off the message path: finished tasks reach PostgreSQL through a Redis stream.
            writing = asyncio.get_running_loop().create_task(self._keep_writing())
        timers = asyncio.get_running_loop().create_task(self._fire_timers())
        trimming = asyncio.get_running_loop().create_task(
            run_trimmer(self.redis, lambda: self.leases.owned, self.stopping, self.trim_seconds)
        )
        lag = asyncio.get_running_loop().create_task(self._report_lag(interval))
        try:
            while not self.stopping.is_set():
                try:
                    await self._rebalance()
                except REDIS_DOWN as exc:
                    log.warning("rebalance failed, redis unavailable: %s", exc)
                except REDIS_REFUSING as exc:  # out of memory, a failed snapshot (MISCONF), no
                    # replica in sync (NOREPLICAS), a demoted primary (a failover caught mid-way)
                    log.warning("rebalance failed, redis refuses writes: %s", exc)
                await self._until_next_round(interval)
        finally:
            # Also when the loop ended on an error (another partition count found before the
            # first lease): the helpers watch `stopping`, and were left running before.
            self.stopping.set()
            # Everything told to stop at once, then waited for together (`_stop_consumers`).
            if self._writer is not None:
                self._writer.stop()
            await asyncio.gather(
                self._stop_consumers(list(self.consumers)),
                *(task for task in (timers, trimming, lag, writing) if task is not None),
                return_exceptions=True,
            )
            with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):
                await self.leases.leave()
            await cancel_and_wait(syncing)
            if self.joint_redis is not None:
                await self.joint_redis.aclose()
            await self.redis.aclose()
            log.info("worker %s stopped", self.worker_id)

    async def _ensure_aes_groups(self) -> None:
        """Make the AES's consumer group (README: `aes`) on the three work streams, from
        their start, unless it exists. An AES that made it itself at `$` (the newest entry)
        never received the messages sent before it first started; now it finds the group
        made, and reads them."""
        for priority in keys.PRIORITIES:
            await ensure_group(self.redis, keys.aes_stream(priority), keys.AES_GROUP)

    async def _keep_writing(self) -> None:
        """The persistence writer, started again after a failure it did not foresee. It
        retries every outage it knows of by itself; anything else ended its task, which
        nobody awaited: history stopped being written, silently, until the pod restarted."""
        delay = WRITER_RESTART_SECONDS[0]
        while not self.stopping.is_set():
            self._writer = PersistenceWriter(self.redis, self.settings, consumer=self.worker_id)
            try:
                await self._writer.run()
                return  # stopped
            except Exception:
                if self._writer.batches:  # it wrote: a new failure, not the same one again
                    delay = WRITER_RESTART_SECONDS[0]
                log.exception("persistence writer failed; starting it again in %.1f s", delay)
            # A writer that fails before its batch reports no backlog: reported here, so the
            # backlog alert sees history waiting while nothing takes it.
            with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING, ResponseError):
                backlog_gauge.set(await backlog(self.redis))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            delay = min(delay * 2, WRITER_RESTART_SECONDS[1])


async def serve(settings: Settings) -> None:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stopping.set)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port)
    tiers = load_tiers(settings)  # (a bad table stops the worker too: one line, at start)
    create_series(metrics.tasks, ("completed", "failed", "queued", "timed_out"), tiers)
    create_series(metrics.late_callbacks, metrics.LATE)
    create_series(metrics.callbacks_handled, tuple(Verdict))
    if settings.database_url:
        create_series(records_written, RECORD_OUTCOMES)
    freeze_startup_heap()
    await worker.run()
