"""An api pod after Redis spent a few seconds in a long Lua script (BUSY replies), and after a
message on a session's channel it cannot read. Written by the review of this session's changes.

README "Reliability" (Redis faults): "sockets stay open and get an `error` event
(`unavailable`); every process reconnects with backoff by itself ... each socket is caught up
from its session log when delivery resumes". aca8e19: "an unexpected error in the reader is
an outage (hold, reconnect, catch up), logged" — a `BUSY` reply is such an error (a plain
ResponseError for redis-py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from tests.e2e.clients import connect, next_event
from tests.e2e.conftest import lone_api, redis_client

pytestmark = pytest.mark.e2e

# Busy for ARGV[1] seconds, as any script that runs past `busy-reply-threshold` is.
SPIN = """
local t = redis.call('TIME')
while true do
  local n = redis.call('TIME')
  if (n[1] - t[1]) * 1000000 + (n[2] - t[2]) >= tonumber(ARGV[1]) * 1000000 then break end
end
return 1
"""


async def _delivered(redis: Redis, ws, channel: str, event_id: str) -> bool:  # type: ignore[no-untyped-def]
    """Publish a frame on `channel` as the worker does; True once the socket has it."""
    frame = json.dumps({"id": event_id, "type": "message", "data": {}}, separators=(",", ":"))
    await redis.execute_command("SPUBLISH", channel, frame)
    try:
        while True:
            if (await next_event(ws, timeout=0.5))["id"] == event_id:
                return True
    except TimeoutError:
        return False


async def test_after_a_busy_script_the_pod_delivers_again(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """Once the script has ended, an open socket gets the events published on its session's
    channel again (after its `error` event and catch-up), and a new socket opens (a BUSY
    reply is a ResponseError to redis-py: on one server it ended the lane's reader)."""
    with lone_api(own_redis, tmp_path / "logs") as api:
        redis = redis_client(own_redis)
        spinner = Redis(host="127.0.0.1", port=own_redis.port, socket_timeout=30)
        try:
            await redis.config_set("busy-reply-threshold", 100)  # Valkey/Redis 7: ms
            ws, _ = await connect(api.ws_url, "busy", "open")
            channel = "{s:busy:open}:events"
            await spinner.eval(SPIN, 0, 5)  # the api's watchdog PING gets BUSY meanwhile
            first = await next_event(ws, timeout=5)
            assert first["type"] == "error", first  # told of the interruption

            got_it, n = False, 0
            deadline = asyncio.get_running_loop().time() + 7  # the reconnect backoff is 2 s
            while not got_it and asyncio.get_running_loop().time() < deadline:
                got_it = await _delivered(redis, ws, channel, f"9999999999999-{n}")
                n += 1
            receivers = int(await redis.execute_command("SPUBLISH", channel, "{}"))
            async with httpx.AsyncClient() as http:
                ready = (await http.get(f"{api.url}/health/ready")).status_code
            refusal = None
            try:
                await connect(api.ws_url, "busy", "later")
            except websockets.ConnectionClosedError as exc:
                refusal = exc.rcvd and (exc.rcvd.code, exc.rcvd.reason)
        finally:
            await redis.aclose()
            await spinner.aclose()
        tail = [line for line in api.output(tail=200_000).splitlines() if "delivery" in line]
    assert (got_it, refusal) == (True, None), (
        f"after the script: open socket delivered={got_it}, SPUBLISH receivers={receivers}, "
        f"new socket refusal={refusal}, /health/ready={ready}; api delivery log tail:\n"
        + "\n".join(line[:200] for line in tail[-4:])
    )


async def test_a_message_the_pod_cannot_read_does_not_end_its_delivery(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """A frame on a session's channel that is not one of ours (its id not first: published by
    hand, or by another version) is dropped; the next events are delivered and new sockets
    open. It raised out of the lane's reader, which ended: the pod delivered nothing more and
    refused every new socket 1013, in silence, with readiness 200."""
    with lone_api(own_redis, tmp_path / "logs") as api:
        redis = redis_client(own_redis)
        try:
            ws, _ = await connect(api.ws_url, "odd", "open")
            channel = "{s:odd:open}:events"
            spaced = json.dumps({"id": "9999999999999-0", "type": "message", "data": {}})
            await redis.execute_command("SPUBLISH", channel, spaced)
            assert await _delivered(redis, ws, channel, "9999999999999-1")
            later, ack = await connect(api.ws_url, "odd", "later")
            assert ack["type"] == "connection.ack"
            await later.close()
            await ws.close()
        finally:
            await redis.aclose()
