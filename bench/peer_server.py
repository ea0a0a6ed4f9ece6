"""The servers we are compared with, each in a process of its own.

`python -m bench.peer_server` (configuration on the first stdin line):

- `socketio`: python-socketio's ASGI app on uvicorn, set up the way its documentation
  recommends for several processes: `AsyncRedisManager` on the shared Redis, websocket
  transport only, uvloop, httptools, and the same uvicorn websocket implementation (read from
  our `serve_api.py`), ping interval and no compression as our api. A client joins the room
  named by `?room=` when it connects.
- `echo`: a bare `websockets` echo server (compression off, like our api): the floor of what
  a Python process holds per open socket.

Both exit as soon as their stdin closes.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

import uvloop

from bench.common import exit_when_parent_leaves, helper_setup


def serve_socketio(config: dict[str, Any]) -> None:
    import socketio
    import uvicorn

    manager = socketio.AsyncRedisManager(config["redis_url"])
    sio = socketio.AsyncServer(
        async_mode="asgi", client_manager=manager, transports=["websocket"], logger=False
    )

    @sio.event  # type: ignore[misc]
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        room = parse_qs(environ.get("QUERY_STRING", "")).get("room")
        if room:
            await sio.enter_room(sid, room[0])

    app = socketio.ASGIApp(sio)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=config["port"],
        loop="uvloop",
        http="httptools",
        ws=config.get("ws", "websockets"),
        ws_ping_interval=30.0,
        ws_ping_timeout=10.0,
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


def serve_echo(config: dict[str, Any]) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(socket: ServerConnection) -> None:
        async for message in socket:
            await socket.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", config["port"], compression=None, backlog=2048):
            await asyncio.Future()

    uvloop.run(main())


def main() -> None:
    config = helper_setup()
    exit_when_parent_leaves()
    if config["kind"] == "socketio":
        serve_socketio(config)
    else:
        serve_echo(config)


if __name__ == "__main__":
    main()
