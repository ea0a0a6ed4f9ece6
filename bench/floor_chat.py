"""The floor of the chat scenario: the same Redis hops as our chat path, and nothing else.

One asyncio process (uvloop, redis-py with hiredis) plays every part with no HTTP, no auth,
no sockets, no task state and no Lua: a "client" XADDs the message to an actions stream and
PUBLISHes its status event (one pipelined round trip, as our send does); an "executor" reads
actions with XREADGROUP in batches and XADDs the same reply our reference executor gives
(the same word-sized chunks when streaming, then the final answer) plus XACK, one round trip
per batch; a "worker" reads those callbacks with XREADGROUP in batches and PUBLISHes each as a
client frame plus XACK, one round trip per batch; a subscriber receives the frames. That
bounds what any design on Redis can reach for this path on this machine.

Commands (JSON lines on stdin, after the configuration line), as for our chat clients:
`saturate {seconds, warmup, stream}` with `sessions` conversations each sending its next
message when the last is answered, and `rate {rate, seconds, stream}` (open loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from array import array
from typing import Any

import msgspec
from redis.asyncio import Redis

from bench.common import pack_floats, reply, run_helper
from services.executor.agent import chunks_of, reply_for

ACTIONS = "{floor}:actions"
CALLBACKS = "{floor}:callbacks"
GROUP = "floor"
BATCH = 100
MESSAGE = "how fast is this"


class Frame(msgspec.Struct):
    type: str
    task_id: str


_frame = msgspec.json.Decoder(Frame)
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def channel(session: int) -> str:
    return f"{{floor:s{session}}}:events"


class Floor:
    def __init__(self, config: dict[str, Any]) -> None:
        url = config["redis_url"]
        self.client = Redis.from_url(url, max_connections=256)
        self.executor_redis = Redis.from_url(url)
        self.worker_redis = Redis.from_url(url)
        self.pubsub_redis = Redis.from_url(url)
        self.sessions: int = config["sessions"]
        self.seen: dict[str, list[float]] = {}
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.counter = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for stream in (ACTIONS, CALLBACKS):
            with contextlib.suppress(Exception):
                await self.client.xgroup_create(stream, GROUP, id="$", mkstream=True)
        self.pubsub = self.pubsub_redis.pubsub(ignore_subscribe_messages=True)
        names = [channel(i) for i in range(self.sessions)]
        for start in range(0, len(names), 500):
            await self.pubsub.subscribe(*names[start : start + 500])
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self._executor()),
            loop.create_task(self._worker()),
            loop.create_task(self._subscriber()),
        ]
        await asyncio.sleep(0.3)  # let the subscriptions settle

    async def _executor(self) -> None:
        redis = self.executor_redis
        while True:
            replies = await redis.xreadgroup(GROUP, "e", {ACTIONS: ">"}, count=BATCH, block=1000)
            if not replies:
                continue
            entries = replies[0][1]
            pipe = redis.pipeline(transaction=False)
            for _, fields in entries:
                action = _decode(fields[b"action"])
                text = reply_for(action["agent_id"], action["message"])
                base = {"task_id": action["task_id"], "session": action["session"]}
                if action["stream"]:
                    for seq, delta in enumerate(chunks_of(text), start=1):
                        chunk = {**base, "action_type": "execution.chunk", "seq": seq}
                        pipe.xadd(CALLBACKS, {"action": _encode({**chunk, "delta": delta})})
                done = {**base, "action_type": "execution.completed", "content": text}
                pipe.xadd(CALLBACKS, {"action": _encode(done)})
            pipe.xack(ACTIONS, GROUP, *[entry_id for entry_id, _ in entries])
            await pipe.execute()

    async def _worker(self) -> None:
        redis = self.worker_redis
        while True:
            replies = await redis.xreadgroup(GROUP, "w", {CALLBACKS: ">"}, count=BATCH, block=1000)
            if not replies:
                continue
            entries = replies[0][1]
            pipe = redis.pipeline(transaction=False)
            for entry_id, fields in entries:
                action = _decode(fields[b"action"])
                if action["action_type"] == "execution.chunk":
                    kind = "chat.chunk"
                    data = {"delta": action["delta"], "seq": action["seq"]}
                else:
                    kind = "chat.response"
                    data = {"content": action["content"], "role": "assistant"}
                frame = {"id": entry_id, "type": kind, "data": data, "task_id": action["task_id"]}
                pipe.publish(channel(action["session"]), _encode(frame))
            pipe.xack(CALLBACKS, GROUP, *[entry_id for entry_id, _ in entries])
            await pipe.execute()

    async def _subscriber(self) -> None:
        pubsub = self.pubsub
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            now = time.monotonic()
            frame = _frame.decode(message["data"])
            seen = self.seen.get(frame.task_id)
            if seen is None:
                seen = self.seen[frame.task_id] = [0.0, 0.0]
            if frame.type == "chat.chunk":
                if not seen[0]:
                    seen[0] = now
            elif frame.type == "chat.response":
                seen[1] = now
                waiter = self.waiters.pop(frame.task_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    async def send(
        self, session: int, stream: bool, due: float | None = None
    ) -> tuple[float, float]:
        self.counter += 1
        task_id = f"f{self.counter}"
        action = {
            "action_type": "chat.process",
            "tenant_id": "floor",
            "session": session,
            "task_id": task_id,
            "agent_id": "default",
            "message": MESSAGE,
            "stream": stream,
            "callback_queue": CALLBACKS,
        }
        status = {"type": "chat.status", "data": {"status": "processing"}, "task_id": task_id}
        started = time.monotonic() if due is None else due
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[task_id] = waiter
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(ACTIONS, {"action": _encode(action)})
        pipe.publish(channel(session), _encode(status))
        await pipe.execute()
        try:
            await asyncio.wait_for(waiter, 10)
        finally:
            self.waiters.pop(task_id, None)
        seen = self.seen.pop(task_id)
        ttfc = (seen[0] - started) * 1000 if seen[0] else 0.0
        return (seen[1] - started) * 1000, ttfc

    async def saturate(self, command: dict[str, Any]) -> dict[str, Any]:
        stream = command["stream"]
        started = time.monotonic()
        measure_from = started + command["warmup"]
        stop_at = measure_from + command["seconds"]
        counted = completed = 0
        errors = 0

        async def loop(session: int) -> None:
            nonlocal counted, completed, errors
            while time.monotonic() < stop_at:
                try:
                    await self.send(session, stream)
                except Exception:
                    errors += 1
                    continue
                completed += 1
                if time.monotonic() >= measure_from:
                    counted += 1

        await asyncio.gather(*(loop(i) for i in range(self.sessions)))
        return {
            "msgs_per_s": counted / command["seconds"],
            "completed": completed,
            "errors": errors,
        }

    async def rate(self, command: dict[str, Any]) -> dict[str, Any]:
        """Open loop, as our chat clients do it (a message due waits for a free session)."""
        rate: float = command["rate"]
        stream = command["stream"]
        total = int(rate * command["seconds"])
        free: asyncio.Queue[int] = asyncio.Queue()
        for session in range(self.sessions):
            free.put_nowait(session)
        latencies, ttfcs = array("f"), array("f")
        errors = waited = 0
        running: set[asyncio.Task[None]] = set()

        async def one(session: int, due: float) -> None:
            nonlocal errors
            try:
                latency, ttfc = await self.send(session, stream, due)
                latencies.append(latency)
                if ttfc:
                    ttfcs.append(ttfc)
            except Exception:
                errors += 1
            finally:
                free.put_nowait(session)

        started = time.monotonic()
        for sent in range(total):
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if free.empty():
                waited += 1
            task = asyncio.ensure_future(one(await free.get(), due))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running, timeout=15)
        return {
            "sent": total,
            "answered": len(latencies),
            "errors": errors,
            "waited": waited,
            "first_error": "",
            "samples": pack_floats(latencies),
            "ttfc": pack_floats(ttfcs),
            "elapsed": time.monotonic() - started,
        }


async def serve(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin.buffer:
            loop.call_soon_threadsafe(commands.put_nowait, msgspec.json.decode(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    floor = Floor(config)
    await floor.start()
    reply({"ready": True})
    while True:
        command = await commands.get()
        if command is None or command["cmd"] == "close":
            return
        if command["cmd"] == "saturate":
            reply(await floor.saturate(command))
        elif command["cmd"] == "rate":
            reply(await floor.rate(command))
        else:
            reply({"fatal": f"unknown command {command['cmd']!r}"})


def main() -> None:
    run_helper(serve)


if __name__ == "__main__":
    main()
