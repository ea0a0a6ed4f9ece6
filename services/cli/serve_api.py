"""Run the api on uvicorn with the settings that matter for sockets (pings, compression)."""

from __future__ import annotations

import uvicorn

from services.api.app import create_app
from services.api.drain import DrainingServer
from services.api.http_protocol import bounded_protocol
from services.api.ws_protocol import BoundedWSProtocol
from services.core.heap import freeze_startup_heap
from services.core.listening import METRICS_PORT, check_can_listen
from services.core.settings import Settings

# How long uvicorn waits, after SIGTERM, for its connections and requests to end. The sockets
# are closed by then (the drain ran first) and a REST request is short. In Kubernetes SIGTERM
# comes after the preStop drain, which may use its window plus `drain.OVERRUN_SECONDS`, and the
# kubelet kills the pod at window + api.drain.marginSeconds (15 by default): uvicorn's wait
# plus the lifespan's shutdown must fit in what is left, 12 s, not in the window again.
GRACEFUL_SHUTDOWN_SECONDS = 5
# An idle keep-alive connection is kept longer than the proxies in front keep theirs: at
# uvicorn's 5 s, a POST that ingress-nginx (60 s upstream keep-alive) or a cloud load balancer
# (60 s idle timeout) wrote onto a connection the api was closing got a 502, which the proxy
# does not retry for a POST.
KEEP_ALIVE_SECONDS = 75


def serve_api(settings: Settings, *, host: str, port: int) -> None:
    app = create_app(settings, internal_host=host)
    # One line for an address that cannot be had, before anything starts: the internal port
    # opens in the lifespan, where a failure is a traceback.
    check_can_listen(host, port, "--port")
    if settings.metrics_port:
        check_can_listen(host, settings.metrics_port, METRICS_PORT)
    freeze_startup_heap()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        # httptools, with a bounded request head (size and time)
        http=bounded_protocol(settings.http_max_head_bytes, settings.http_head_timeout_seconds),
        interface="asgi3",  # `Api.__call__` returns the handler's awaitable: no frame of its own
        # Per idle socket (bench/memory_profile.py, 2 000 sockets, RSS): wsproto 19.0 KB,
        # websockets-sansio 21.3 KB (~3 us less api CPU per delivered event, but it answers an
        # empty Sec-WebSocket-Protocol header with 400), the legacy "websockets" one ~29 KB.
        # bench/ reads this line: the peer runs on the same implementation (for a class, its
        # `uvicorn_implementation`). Bounded (services/api/ws_protocol.py): a client that does
        # not read is not read, inflation stops at ws_max_size, an unflushable close aborts.
        ws=BoundedWSProtocol,
        ws_max_size=settings.max_frame_bytes * 2,
        ws_ping_interval=settings.websocket_ping_interval,
        ws_ping_timeout=settings.websocket_ping_timeout,
        ws_per_message_deflate=settings.websocket_compression,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    server = DrainingServer(
        config, settings.drain_seconds, lambda: getattr(app.state, "runtime", None)
    )
    server.run()
