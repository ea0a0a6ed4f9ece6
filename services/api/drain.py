"""Graceful drain of an api process: not ready, no new sockets, sockets closed gradually.

Closing every socket at once would send every client to the other pods in the same instant;
closing them spread over `ORCHESTRATOR_DRAIN_SECONDS` (with jitter) keeps the reconnect storm
flat. Clients get 1012 ("service restart"), reconnect through the ingress to another pod and
resume from their `last_event_id`, so nothing is lost.

In Kubernetes the drain starts from the preStop hook (`GET /drain` on the internal port),
because uvicorn closes all sockets at once as soon as it gets SIGTERM; outside Kubernetes it
starts on SIGTERM, before uvicorn's own shutdown (`DrainingServer`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from types import FrameType

import uvicorn

from services.api.connections import CLOSE_RESTART
from services.api.runtime import Runtime

log = logging.getLogger(__name__)


async def drain(runtime: Runtime, window: float) -> int:
    """Close every socket of this process within `window` seconds; return how many."""
    if runtime.drained is not None:
        await runtime.drained.wait()
        return 0
    runtime.draining = True
    runtime.drained = asyncio.Event()
    connections = list(runtime.hub.connections)
    random.shuffle(connections)
    log.info("draining %d sockets over %.1f s", len(connections), window)
    loop = asyncio.get_running_loop()
    started = loop.time()
    count = len(connections)
    for index, conn in enumerate(connections):
        due = started + window * index / max(1, count)
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await conn.flush()
        conn.close_soon(CLOSE_RESTART, "server draining: reconnect")
    for conn in connections:
        await conn.closing()
    runtime.drained.set()
    return count


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on the first SIGTERM/SIGINT and exits when done (or on a second)."""

    def __init__(
        self, config: uvicorn.Config, window: float, runtime_of: Callable[[], Runtime | None]
    ) -> None:
        super().__init__(config)
        self.window = window
        self.runtime_of = runtime_of
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime = self.runtime_of()
        if self._draining or runtime is None:
            super().handle_exit(sig, frame)  # a second signal, or not started: stop now
            return
        self._draining = True
        loop = asyncio.get_event_loop()

        async def drain_then_exit() -> None:
            try:
                await drain(runtime, self.window)
            finally:
                super(DrainingServer, self).handle_exit(sig, frame)

        # Signal handlers run between bytecodes: hand the work to the loop, waking it up.
        loop.call_soon_threadsafe(
            lambda: runtime.background.add(loop.create_task(drain_then_exit()))
        )
