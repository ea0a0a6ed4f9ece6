"""`orchestrator worker`: hold partition leases and run one consumer per owned partition.

On SIGTERM the worker stops reading, lets each consumer finish the batch in hand (effects
applied and acknowledged), gives its leases back so another worker takes over at once, and
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from prometheus_client import start_http_server

from services.core.redis_client import REDIS_DOWN, create_redis
from services.core.scripts import Scripts
from services.core.settings import Settings
from services.core.tasks import TaskStore
from services.worker.callbacks import CallbackEffects
from services.worker.leases import PartitionLeases
from services.worker.partition import PartitionConsumer

log = logging.getLogger(__name__)


def worker_name(settings: Settings) -> str:
    return settings.pod_name or f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker_id = worker_name(settings)
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
        self.consumers: dict[int, tuple[PartitionConsumer, asyncio.Task[None]]] = {}
        self.stopping = asyncio.Event()

    def _start_consumer(self, partition: int) -> None:
        consumer = PartitionConsumer(
            self.redis, self.effects, self.tasks, self.settings, self.worker_id, partition
        )
        task = asyncio.get_running_loop().create_task(consumer.run())
        self.consumers[partition] = (consumer, task)

    async def _stop_consumer(self, partition: int) -> None:
        consumer, task = self.consumers.pop(partition)
        consumer.stop()
        with contextlib.suppress(Exception):
            await task

    async def _rebalance(self) -> None:
        live = await self.leases.live_workers()
        for partition in await self.leases.renew():
            log.info("lost partition %s", partition)
            await self._stop_consumer(partition)
        for partition in self.leases.surplus(live):
            await self._stop_consumer(partition)
            await self.leases.release(partition)
        for partition in await self.leases.acquire(live):
            log.info("took partition %s", partition)
            self._start_consumer(partition)

    async def run(self) -> None:
        interval = self.settings.partition_lease_seconds / 3
        log.info("worker %s started", self.worker_id)
        while not self.stopping.is_set():
            try:
                await self._rebalance()
            except REDIS_DOWN as exc:
                log.warning("rebalance failed, redis unavailable: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)
        for partition in list(self.consumers):
            await self._stop_consumer(partition)
        with contextlib.suppress(*REDIS_DOWN):
            await self.leases.leave()
        await self.redis.aclose()
        log.info("worker %s stopped", self.worker_id)


async def serve(settings: Settings) -> None:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stopping.set)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    await worker.run()
