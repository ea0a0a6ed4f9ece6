"""The backend process of the delivery scenario: pushes events at sockets through Redis.

`python -m bench.emitter` (configuration on the first stdin line, commands after it). Kinds:

- `ours`: what an AES does to reach a session: one `websocket.send` action (the contract's
  `action` field, encoded by `services.core.actions`) XADDed to the session's callback
  partition `{cb:N}:callbacks`. The worker applies it (session log + SPUBLISH, one script),
  the api holding the session's socket forwards it. The real path, worker included.
- `ours_direct`: the worker's own script (`session_event.lua`: dedupe, log append, SPUBLISH)
  called from here: our path without the worker hop, the closest twin of the peer's emitter.
- `peer`: python-socketio's write-only `AsyncRedisManager.emit(..., room=<session>)`, the way
  a Python team pushes from a worker process; every api process receives every event on the
  one `socketio` channel and keeps those for its rooms.

Batches are pipelined on every kind (for the peer: the manager's own `emit` writes into a
redis-py pipeline instead of awaiting each PUBLISH), so the emitter is never what limits a
side, and costs both sides as little CPU as possible.

Commands: `saturate {seconds, warmup, window}`: closed loop, at most `window` events sent
and not yet received by the clients (read live from the shared counters); answers the
received rate over `seconds` after `warmup`. `rate {rate, seconds}`: open loop at a fixed
rate. Both then wait (bounded) until the clients received everything, and report any loss.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
from redis.asyncio import Redis

from bench.common import Counters, reply, run_helper
from services.core import keys
from services.core.actions import ACTION_FIELD, WebsocketSend, encode_action
from services.core.events import MESSAGE, event_body
from services.core.scripts import Scripts

DRAIN_SECONDS = 10.0
BATCH = 200
DEDUPE_TTL_SECONDS = 86_400


class Emitter:
    def __init__(self, config: dict[str, Any]) -> None:
        self.kind: str = config["kind"]
        self.sockets: int = config["sockets"]
        self.tenants: int = config.get("tenants", 1)
        self.partitions: int = config.get("partitions", 8)
        self.padding = "x" * config.get("payload_bytes", 64)
        self.counters = Counters(Path(config["counters"]), config["slots"], create=False)
        self.redis = Redis.from_url(config["redis_url"], max_connections=16)
        self.next = 0
        self.emitted = 0
        self.scripts = Scripts(self.redis)
        self.manager: Any = None
        if self.kind == "peer":
            import socketio

            self.manager = socketio.AsyncRedisManager(config["redis_url"], write_only=True)
            self.manager._redis_connect()

    def received(self) -> int:
        return self.counters.total()

    def _target(self) -> tuple[str, str]:
        i = self.next % self.sockets
        self.next += 1
        return f"bench-{i % self.tenants}", f"s{i}"

    async def emit(self, count: int) -> None:
        """Send `count` events in one pipelined round trip."""
        pipe = self.redis.pipeline(transaction=False)
        now = time.time  # wall clock: the client also splits it at the log id (Redis time)
        if self.kind == "ours":
            for _ in range(count):
                tenant, session = self._target()
                action = WebsocketSend(
                    tenant_id=tenant,
                    session_id=session,
                    message={"t": now(), "p": self.padding},
                )
                stream = keys.callback_stream(keys.partition_of(tenant, session, self.partitions))
                pipe.xadd(stream, {ACTION_FIELD: encode_action(action)})
        elif self.kind == "ours_direct":
            for _ in range(count):
                tenant, session = self._target()
                action_id = f"{self.emitted}-{self.next}"
                body = event_body(MESSAGE, {"t": now(), "p": self.padding})
                await self.scripts.session_event(
                    keys=[
                        keys.session_dedupe(tenant, session, action_id),
                        keys.session_log(tenant, session),
                    ],
                    args=[
                        body,
                        1000,
                        3_600_000,
                        keys.session_channel(tenant, session),
                        DEDUPE_TTL_SECONDS,
                    ],
                    client=pipe,
                )
        else:
            manager = self.manager
            real = manager.redis
            manager.redis = pipe  # the manager's own emit, queued on a pipeline
            try:
                for _ in range(count):
                    _, session = self._target()
                    await manager.emit("m", {"t": now(), "p": self.padding}, room=session)
            finally:
                manager.redis = real
        await pipe.execute()
        self.emitted += count

    async def saturate(self, command: dict[str, Any]) -> dict[str, Any]:
        window: int = command["window"]
        warmup: float = command["warmup"]
        seconds: float = command["seconds"]
        started = time.monotonic()
        first = self.emitted
        measure_from = started + warmup
        measure_to = measure_from + seconds
        mark: tuple[float, int] | None = None
        while True:
            now = time.monotonic()
            if mark is None and now >= measure_from:
                mark = (now, self.received())
            if now >= measure_to:
                break
            room = window - (self.emitted - self.received())
            if room <= 0:
                await asyncio.sleep(0.0005)
                continue
            await self.emit(min(room, BATCH))
        end = (time.monotonic(), self.received())
        assert mark is not None
        rate = (end[1] - mark[1]) / (end[0] - mark[0])
        lost = await self.drain()
        return {
            "events_per_s": rate,
            "emitted": self.emitted,
            "delivered": self.emitted - first - lost,
            "lost": lost,
        }

    async def rate(self, command: dict[str, Any]) -> dict[str, Any]:
        rate: float = command["rate"]
        seconds: float = command["seconds"]
        total = int(rate * seconds)
        first = self.emitted
        started = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            if due > sent:
                count = min(due - sent, BATCH)
                await self.emit(count)
                sent += count
            else:
                await asyncio.sleep(0.001)
        elapsed = time.monotonic() - started
        lost = await self.drain()
        return {
            "emitted": self.emitted - first,
            "elapsed": elapsed,
            "achieved_rate": sent / elapsed,
            "lost": lost,
        }

    async def drain(self) -> int:
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.received() < self.emitted and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # the count is in shared memory: nothing to wait on
        return max(0, self.emitted - self.received())

    async def reset(self) -> dict[str, Any]:
        """Align with the clients' counters (after a restart of the count)."""
        self.emitted = self.received()
        return {"emitted": self.emitted}


async def serve(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin.buffer:
            loop.call_soon_threadsafe(commands.put_nowait, msgspec.json.decode(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    emitter = Emitter(config)
    await emitter.reset()
    reply({"ready": True})
    while True:
        command = await commands.get()
        if command is None or command["cmd"] == "close":
            await emitter.redis.aclose()
            return
        if command["cmd"] == "saturate":
            reply(await emitter.saturate(command))
        elif command["cmd"] == "rate":
            reply(await emitter.rate(command))
        elif command["cmd"] == "reset":
            reply(await emitter.reset())
        else:
            reply({"fatal": f"unknown command {command['cmd']!r}"})


def main() -> None:
    run_helper(serve)


if __name__ == "__main__":
    main()
