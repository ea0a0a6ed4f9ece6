"""A client process: hundreds of sockets (and, for chat, HTTP connections) on one uvloop.

Run by the benchmark as `python -m bench.clients` with its configuration as the first stdin
line, then commands (JSON lines) on stdin, answers on stdout:

- `connect {start_at, concurrency}`: open every socket (all at once when concurrency is 0),
  starting at the monotonic instant `start_at`; answers with successes, errors and the instant
  the last one became ready (`connection.ack` for us, the namespace `40` for Socket.IO, the
  upgrade for the echo floor).
- `record`: start (again) collecting latency samples of received events.
- `report`: events received since start, and the samples.
- `saturate` / `rate` (chat only): send messages (closed loop / open loop) and time them.
- `close`: close every socket politely and exit.

Sockets of the fleet are numbered `first .. first+count-1`; socket i is session `s<i>` of
tenant `bench-<i % tenants>` on target `i % len(targets)`. Every received event increments
this process's slot in the shared counters, so the emitter can read progress live.
Latency = receive instant - the instant the emitter put in the event (`"t":`, wall clock: one
clock for every process of the machine). For our frames, whose id is the session-log id (the
Redis server's clock in ms when the worker's script appended it), the latency is also split
in two: emitter -> log append, and log append -> client.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any

import msgspec

from bench.common import Counters, pack_floats, reply, run_helper
from bench.wsclient import HttpClient, WsClient

T_MARK = b'"t":'
ACK = b'"type":"connection.ack"'


def event_time(data: bytes) -> float:
    start = data.find(T_MARK)
    if start < 0:
        return 0.0
    start += 4
    return float(data[start : data.find(b",", start)])


class TryAgain(ConnectionError):
    """The server closed with 1013: try again later."""


class Fleet:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.mode: str = config["mode"]
        self.targets: list[tuple[str, int]] = [tuple(t) for t in config["targets"]]
        self.first: int = config["first"]
        self.count: int = config["count"]
        self.tenants: int = config.get("tenants", 1)
        self.tokens: dict[str, str] = config.get("tokens", {})
        self.counters = Counters(Path(config["counters"]), config["slots"], create=False)
        self.slot: int = config["slot"]
        self.sockets: list[WsClient] = []
        self.ready: dict[WsClient, asyncio.Future[float]] = {}
        self.recording = False
        self.samples: array[float] = array("f")
        self.to_log: array[float] = array("f")
        self.from_log: array[float] = array("f")
        self.received = 0
        self.retried = 0

    # the per-frame path: keep it short ---------------------------------------------------------

    def on_ours(self, ws: WsClient, data: bytes) -> None:
        waiter = self.ready.get(ws)
        if waiter is not None:
            if ACK in data and not waiter.done():
                waiter.set_result(time.monotonic())
                del self.ready[ws]
            return
        self._event(data)

    def on_socketio(self, ws: WsClient, data: bytes) -> None:
        kind = data[:2]
        if kind == b"42":
            self._event(data)
        elif data == b"2":
            ws.send_text(b"3")
        elif data[:1] == b"0":
            ws.send_text(b"40")
        elif kind == b"40":
            waiter = self.ready.pop(ws, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(time.monotonic())
        elif kind == b"44":
            waiter = self.ready.pop(ws, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionError(data.decode(errors="replace")))

    def on_echo(self, ws: WsClient, data: bytes) -> None:
        self._event(data)

    def _event(self, data: bytes) -> None:
        self.received += 1
        self.counters.view[self.slot] = self.received
        if self.recording:
            sent = event_time(data)
            if sent:
                now = time.time()
                self.samples.append((now - sent) * 1000)
                if data[:7] == b'{"id":"':
                    logged = int(data[7 : data.index(b"-", 7)])
                    self.to_log.append(logged - sent * 1000)
                    self.from_log.append(now * 1000 - logged)

    # connecting -------------------------------------------------------------------------------

    def path_of(self, i: int) -> tuple[str, list[str] | None]:
        if self.mode == "ours":
            tenant = f"bench-{i % self.tenants}"
            return f"/ws/{tenant}/s{i}", ["orchestrator.v1", "bearer." + self.tokens[tenant]]
        if self.mode == "socketio":
            return f"/socket.io/?EIO=4&transport=websocket&room=s{i}", None
        return "/", None

    async def open_one(self, i: int, gate: asyncio.Semaphore | None, retries: int) -> float:
        """Open socket i; a refusal with 1013 (try again later) is retried `retries` times."""
        for attempt in range(retries + 1):
            if gate is not None:
                await gate.acquire()
            try:
                return await self._open(i)
            except TryAgain:
                if attempt == retries:
                    raise
                self.retried += 1
            finally:
                if gate is not None:
                    gate.release()
            await asyncio.sleep(0.05 * (attempt + 1) + random.random() * 0.05)
        raise AssertionError("unreachable")

    async def _open(self, i: int) -> float:
        host, port = self.targets[i % len(self.targets)]
        path, subprotocols = self.path_of(i)
        handler = {"ours": self.on_ours, "socketio": self.on_socketio}.get(self.mode, self.on_echo)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[float] = loop.create_future()

        def factory() -> WsClient:
            client = WsClient(host, port, path, handler, subprotocols)
            self.ready[client] = waiter  # before any frame can arrive
            return client

        _, ws = await loop.create_connection(factory, host, port)
        try:
            await ws.opened
        except BaseException:
            self.ready.pop(ws, None)
            raise
        if self.mode == "echo":
            waiter.set_result(time.monotonic())
            self.ready.pop(ws, None)
        done, _ = await asyncio.wait([waiter, ws.closed], return_when="FIRST_COMPLETED")
        if waiter not in done:
            self.ready.pop(ws, None)
            if ws.close_code == 1013:
                raise TryAgain("closed with 1013 before ready")
            raise ConnectionError(f"closed before ready: code {ws.close_code}")
        self.sockets.append(ws)
        return waiter.result()

    async def connect(self, command: dict[str, Any]) -> dict[str, Any]:
        concurrency = command.get("concurrency", 0)
        gate = asyncio.Semaphore(concurrency) if concurrency else None
        delay = command.get("start_at", 0) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.monotonic()
        timeout = command.get("timeout", 60)
        retries = command.get("retries", 0)
        tasks = [
            asyncio.ensure_future(self.open_one(i, gate, retries))
            for i in range(self.first, self.first + self.count)
        ]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        errors = len(pending)
        last = started
        first_error = "timeout" if pending else ""
        for task in done:
            exc = task.exception()
            if exc is not None:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
            else:
                last = max(last, task.result())
        return {
            "ok": len(self.sockets),
            "errors": errors,
            "first_error": first_error,
            "started": started,
            "last_ready": last,
            "retried": self.retried,
        }

    def report(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "samples": pack_floats(self.samples),
            "to_log": pack_floats(self.to_log),
            "from_log": pack_floats(self.from_log),
            "open": sum(1 for ws in self.sockets if not ws.closed.done()),
        }

    async def close(self) -> None:
        for ws in self.sockets:
            with contextlib.suppress(Exception):
                ws.close()
        await asyncio.sleep(0.2)


class ChatSession:
    """A chat session of ours: its socket and a keep-alive HTTP connection of its own."""

    def __init__(self, fleet: ChatFleet, index: int) -> None:
        self.fleet = fleet
        self.tenant = f"bench-{index % fleet.tenants}"
        self.session = f"chat-{index}"
        self.target = fleet.targets[index % len(fleet.targets)]
        self.ws: WsClient | None = None
        self.http: HttpClient | None = None
        self.seen: dict[str, list[float]] = {}  # task id -> [first chunk, final, failed]
        self.final_ids: dict[str, str] = {}  # task id -> the session-log id of its answer
        self.waiters: dict[str, asyncio.Future[None]] = {}
        self.acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def open(self) -> None:
        host, port = self.target
        token = self.fleet.tokens[self.tenant]
        self.ws = await WsClient.connect(
            host,
            port,
            f"/ws/{self.tenant}/{self.session}",
            self.on_text,
            ["orchestrator.v1", "bearer." + token],
        )
        await asyncio.wait_for(self.acked, 30)
        self.http = await HttpClient.connect(host, port)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def on_text(self, ws: WsClient, data: bytes) -> None:
        if not self.acked.done():
            self.acked.set_result(None)
            return
        if b'"chat.' not in data:
            return
        now = time.monotonic()
        event = _event_decoder.decode(data)
        if event.task_id is None:
            return
        seen = self.seen.get(event.task_id)
        if seen is None:
            seen = self.seen[event.task_id] = [0.0, 0.0, 0.0]
        if event.type == "chat.chunk":
            if not seen[0]:
                seen[0] = now
        elif event.type == "chat.response":
            seen[1] = now
            if event.id is not None:
                self.final_ids[event.task_id] = event.id
        elif event.type in ("chat.error", "chat.cancelled"):
            seen[1] = seen[2] = now
        else:
            return
        if seen[1]:
            waiter = self.waiters.pop(event.task_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def send(self, stream: bool, due: float | None = None) -> tuple[float, float, str]:
        """(latency ms, time to first chunk ms or 0, task id) from `due` (default: now); raises
        on error."""
        assert self.http is not None
        body = msgspec.json.encode(
            {"message": "how fast is this", "stream": stream, "session_id": self.session}
        )
        started = time.monotonic() if due is None else due
        status, answer = await asyncio.wait_for(
            self.http.request("POST", "/api/chat/send", body, self.headers), 10
        )
        if status != 202:
            raise RuntimeError(f"send answered {status}: {answer[:200]!r}")
        task_id = msgspec.json.decode(answer)["task_id"]
        seen = self.seen.get(task_id)
        if seen is None or not seen[1]:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters[task_id] = waiter
            try:
                await asyncio.wait_for(waiter, 10)
            finally:
                self.waiters.pop(task_id, None)
            seen = self.seen[task_id]
        del self.seen[task_id]
        if seen[2]:
            raise RuntimeError("the task failed")
        ttfc = (seen[0] - started) * 1000 if seen[0] else 0.0
        return (seen[1] - started) * 1000, ttfc, task_id


class Event(msgspec.Struct):
    type: str
    task_id: str | None = None
    id: str | None = None


_event_decoder = msgspec.json.Decoder(Event)


class ChatFleet:
    def __init__(self, config: dict[str, Any]) -> None:
        self.targets: list[tuple[str, int]] = [tuple(t) for t in config["targets"]]
        self.tenants: int = config.get("tenants", 1)
        self.tokens: dict[str, str] = config["tokens"]
        self.counters = Counters(Path(config["counters"]), config["slots"], create=False)
        self.slot: int = config["slot"]
        self.sessions = [
            ChatSession(self, i) for i in range(config["first"], config["first"] + config["count"])
        ]
        self.done = 0

    async def connect(self, command: dict[str, Any]) -> dict[str, Any]:
        results = await asyncio.gather(
            *(session.open() for session in self.sessions), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        return {
            "ok": len(results) - len(errors),
            "errors": len(errors),
            "first_error": repr(errors[0]) if errors else "",
        }

    async def saturate(self, command: dict[str, Any]) -> dict[str, Any]:
        """Every session sends its next message as soon as the previous one is answered."""
        await _until(command["start_at"])
        stop_at = command["start_at"] + command["seconds"]
        stream = command["stream"]
        errors: list[str] = []
        latencies = array("f")

        async def loop(session: ChatSession) -> None:
            while time.monotonic() < stop_at:
                try:
                    latency, _, task_id = await session.send(stream)
                    session.final_ids.pop(task_id, None)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.05)
                    continue
                self.done += 1
                self.counters.view[self.slot] = self.done
                latencies.append(latency)

        await asyncio.gather(*(loop(session) for session in self.sessions))
        return {"errors": len(errors), "first_error": errors[0] if errors else ""}

    async def rate(self, command: dict[str, Any]) -> dict[str, Any]:
        """Open loop: `rate` messages per second from this process, each on a free session.

        A message due while every session is busy waits for one, and its latency still counts
        from the instant it was due (no coordinated omission); `waited` says how many did.
        """
        await _until(command["start_at"])
        rate: float = command["rate"]
        seconds: float = command["seconds"]
        stream = command["stream"]
        free: asyncio.Queue[ChatSession] = asyncio.Queue()
        for session in random.sample(self.sessions, len(self.sessions)):
            free.put_nowait(session)
        latencies, ttfcs = array("f"), array("f")
        errors: list[str] = []
        waited = 0
        running: set[asyncio.Task[None]] = set()
        # task id -> [due, answered] (wall-clock ms, to compare with Redis's stream ids) and the
        # session-log id of the answer: bench.chat_hops splits each message's time per hop.
        hops: dict[str, list[Any]] = {}
        wall = time.time() - time.monotonic()

        async def one(session: ChatSession, due: float) -> None:
            try:
                latency, ttfc, task_id = await session.send(stream, due)
                latencies.append(latency)
                if ttfc:
                    ttfcs.append(ttfc)
                logged = session.final_ids.pop(task_id, None)
                if logged is not None:
                    hops[task_id] = [(due + wall) * 1000, (due + wall) * 1000 + latency, logged]
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                free.put_nowait(session)

        started = time.monotonic()
        total = int(rate * seconds)
        for sent in range(total):
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if free.empty():
                waited += 1
            session = await free.get()
            task = asyncio.ensure_future(one(session, due))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running, timeout=15)
        return {
            "sent": total,
            "answered": len(latencies),
            "errors": len(errors),
            "waited": waited,
            "first_error": errors[0] if errors else "",
            "samples": pack_floats(latencies),
            "ttfc": pack_floats(ttfcs),
            "hops": hops,
            "elapsed": time.monotonic() - started,
        }

    async def close(self) -> None:
        for session in self.sessions:
            if session.ws is not None:
                session.ws.close()
            if session.http is not None:
                session.http.close()
        await asyncio.sleep(0.2)


async def _until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def serve(config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin.buffer:
            loop.call_soon_threadsafe(commands.put_nowait, msgspec.json.decode(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    fleet: Fleet | ChatFleet = ChatFleet(config) if config["mode"] == "chat" else Fleet(config)
    while True:
        command = await commands.get()
        if command is None or command["cmd"] == "close":
            await fleet.close()
            reply({"closed": True})
            return
        name = command["cmd"]
        if name == "connect":
            reply(await fleet.connect(command))
        elif name == "record" and isinstance(fleet, Fleet):
            fleet.samples, fleet.to_log, fleet.from_log = array("f"), array("f"), array("f")
            fleet.recording = True
            reply({"recording": True})
        elif name == "report" and isinstance(fleet, Fleet):
            reply(fleet.report())
        elif name == "saturate" and isinstance(fleet, ChatFleet):
            reply(await fleet.saturate(command))
        elif name == "rate" and isinstance(fleet, ChatFleet):
            reply(await fleet.rate(command))
        else:
            reply({"fatal": f"unknown command {name!r}"})


def main() -> None:
    run_helper(serve)


if __name__ == "__main__":
    main()
