"""The floor of the worker's round: what the joint loop does for `websocket.send`, with
nothing around it, in the leanest loop Python runs it in (a helper of `bench.worker_vs_floor`).

One connection (a raw `asyncio.Protocol` on uvloop, hiredis for packing and replies). Per
entry read, the worker's decode (`decode_callback`), its event body and one EVALSHA of its
own `session_event.lua` (dedupe, session log, SPUBLISH); then one write holds the round's
script calls, their XACKs and the next blocking XREADGROUP over every partition stream (the
worker defers its acks under a light load: the floor does a little more Redis work, not
less). No leases, metrics, failure handling or deadlines: a bound on what the worker's round
can cost, not a design. Configuration on the first stdin line: `{redis_url, partitions}`; answers
`{"ready": true}` once its group and script are in place, and exits when stdin closes.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis

from bench.common import exit_when_parent_leaves, reply, run_helper
from services.core import events, keys
from services.core.actions import ACTION_FIELD, WebsocketSend, decode_callback

FIELD = ACTION_FIELD.encode()
GROUP = "floor"
BATCH = 100  # entries per read, the worker's default batch
BLOCK_MS = 100
LOG_MAXLEN = 1_000
LOG_TTL_MS = 3_600_000
MARK_TTL_SECONDS = 600


class _Replies(asyncio.Protocol):
    """Replies parsed by hiredis as they arrive; `take(n)` waits for the next n."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.ready: list[Any] = []
        self.waiting: list[tuple[int, asyncio.Future[list[Any]]]] = []
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (item := self.reader.gets()) is not False:
            self.ready.append(item)
        self._hand_out()

    def connection_lost(self, exc: Exception | None) -> None:
        for _, future in self.waiting:
            if not future.done():
                future.set_exception(ConnectionError("redis closed the connection"))

    def _hand_out(self) -> None:
        while self.waiting and len(self.ready) >= self.waiting[0][0]:
            count, future = self.waiting.pop(0)
            taken, self.ready = self.ready[:count], self.ready[count:]
            future.set_result(taken)

    def send(self, commands: list[tuple[Any, ...]]) -> None:
        assert self.transport is not None
        self.transport.writelines([hiredis.pack_command(command) for command in commands])

    def take(self, count: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append((count, future))
        self._hand_out()
        return future


async def _ask(conn: _Replies, *command: Any) -> Any:
    conn.send([command])
    (answer,) = await conn.take(1)
    return answer


async def floor_loop(config: dict[str, Any]) -> None:
    """What the joint loop does for `websocket.send`, with nothing else around it."""
    address = urlsplit(config["redis_url"])
    _, conn = await asyncio.get_running_loop().create_connection(
        _Replies, address.hostname, address.port
    )
    streams = [keys.callback_stream(p) for p in range(config["partitions"])]
    for stream in streams:  # from now on: what the worker left in the streams is not ours
        await _ask(conn, "XGROUP", "DESTROY", stream, GROUP)
        await _ask(conn, "XGROUP", "CREATE", stream, GROUP, "$", "MKSTREAM")
    script = (files("services.core") / "lua" / "session_event.lua").read_text()
    sha = await _ask(conn, "SCRIPT", "LOAD", script)
    read = ("XREADGROUP", "GROUP", GROUP, "floor", "COUNT", BATCH, "BLOCK", BLOCK_MS)
    read += ("STREAMS", *streams, *[">"] * len(streams))
    exit_when_parent_leaves()
    reply({"ready": True})
    conn.send([read])
    while True:
        (answer,) = await conn.take(1)
        commands: list[tuple[Any, ...]] = []
        acks: list[tuple[Any, ...]] = []
        for stream, entries in answer or []:
            previous: dict[tuple[str, str], str] = {}
            ids = []
            for raw_id, fields in entries:
                entry_id = raw_id.decode()
                action = decode_callback(dict(zip(fields[::2], fields[1::2], strict=True))[FIELD])
                assert isinstance(action, WebsocketSend)
                tenant, sid = action.tenant_id, action.session_id
                body = events.event_body(events.MESSAGE, action.message, action.task_id)
                commands.append(
                    (
                        "EVALSHA", sha, 2,
                        keys.session_applied(tenant, sid), keys.session_log(tenant, sid),
                        body, LOG_MAXLEN, LOG_TTL_MS, keys.session_channel(tenant, sid),
                        MARK_TTL_SECONDS, entry_id, previous.get((tenant, sid), ""), stream,
                    )
                )  # fmt: skip
                previous[(tenant, sid)] = entry_id
                ids.append(entry_id)
            acks.append(("XACK", stream, GROUP, *ids))
        conn.send([*commands, *acks, read])
        if commands:
            await conn.take(len(commands) + len(acks))


def main() -> None:
    run_helper(floor_loop)


if __name__ == "__main__":
    main()
