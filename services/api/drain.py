"""Graceful drain of an api process: not ready, no new sockets, sockets closed gradually.

Closing every socket at once would send every client to the other pods in the same instant;
closing them spread over `ORCHESTRATOR_DRAIN_SECONDS` (with jitter) keeps the reconnect storm
flat. Clients get 1012 ("service restart"), reconnect through the ingress to another pod and
resume from their `last_event_id`, so nothing is lost.

The drain ends at most `OVERRUN_SECONDS` after its window whatever the clients do: each socket
is flushed and closed by a task of its own at its due time, so a client that stops reading
delays no other socket, and a socket still open at the deadline (its client takes neither its
frames nor the close frame) has its TCP connection aborted. Its client sees the connection drop
and resumes like after a 1012. The kubelet kills the pod `api.drain.marginSeconds` after the
window: uvicorn's own shutdown runs in what is left of it.

In Kubernetes the drain starts from the preStop hook (`GET /drain` on the internal port),
because uvicorn closes all sockets at once as soon as it gets SIGTERM; outside Kubernetes it
starts on SIGTERM, before uvicorn's own shutdown (`DrainingServer`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from types import FrameType

import uvicorn

from services.api.connections import CLOSE_RESTART, FLUSH_TIMEOUT_SECONDS, ClientConnection
from services.api.runtime import Runtime

log = logging.getLogger(__name__)

# How long a drain may run past its window: the last socket's flush, then its close frame to a
# client that reads. Sockets still open after that are aborted.
OVERRUN_SECONDS = FLUSH_TIMEOUT_SECONDS + 1.0


async def drain(runtime: Runtime, window: float) -> int:
    """Close every socket of this process within `window` seconds (plus at most
    `OVERRUN_SECONDS`); return how many."""
    if runtime.drained is not None:
        await runtime.drained.wait()
        return 0
    runtime.draining = True
    runtime.drained = asyncio.Event()
    try:
        return await _Drain(runtime, window).run()
    finally:
        runtime.drained.set()  # also if cancelled: a second /drain must not wait for ever


class _Drain:
    """One drain: a close task per socket at its due time, and an abort at the deadline."""

    def __init__(self, runtime: Runtime, window: float) -> None:
        self.runtime = runtime
        self.window = window
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.deadline = self.started + window + OVERRUN_SECONDS
        self.seen: set[ClientConnection] = set()
        self.closing: dict[asyncio.Task[None], ClientConnection] = {}

    async def run(self) -> int:
        connections = self._unseen()
        random.shuffle(connections)
        log.info("draining %d sockets over %.1f s", len(connections), self.window)
        count = len(connections)
        for index, conn in enumerate(connections):
            due = self.started + self.window * index / max(1, count)
            delay = due - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._close(conn)
        await self._close_latecomers()
        return len(self.seen)

    def _unseen(self) -> list[ClientConnection]:
        """Sockets of the pod this drain has not started to close: at first all of them, later
        those that attached after (their handshake passed the `draining` check before it)."""
        fresh = [conn for conn in self.runtime.hub.connections if conn not in self.seen]
        self.seen.update(fresh)
        return fresh

    def _close(self, conn: ClientConnection) -> None:
        task = self.loop.create_task(_flush_and_close(conn))
        self.closing[task] = conn
        task.add_done_callback(self.closing.pop)

    async def _close_latecomers(self) -> None:
        """Wait for the closes under way, closing sockets attached meanwhile, until none is
        left or the deadline; then abort what is still open."""
        while True:
            for conn in self._unseen():
                self._close(conn)
            if not self.closing:
                return
            remaining = self.deadline - self.loop.time()
            if remaining <= 0:
                self._abort(list(self.closing.values()))
                return
            await asyncio.wait(list(self.closing), timeout=remaining)

    def _abort(self, connections: Iterable[ClientConnection]) -> None:
        aborted = list(connections)
        log.warning("drain out of time: aborting %d sockets that take nothing", len(aborted))
        for conn in aborted:
            conn.abort()
        for task in list(self.closing):
            task.cancel()


async def _flush_and_close(conn: ClientConnection) -> None:
    """Send what the socket has queued (bounded), then the close frame, and wait for it."""
    await conn.flush()
    conn.close_soon(CLOSE_RESTART, "server draining: reconnect")
    await conn.closing()


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
