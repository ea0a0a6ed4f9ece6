"""The api's internal port (`ORCHESTRATOR_METRICS_PORT`): `/metrics` and `/drain`.

It runs in the app's own event loop (not a thread), so `/drain`, called by the Kubernetes
preStop hook, drives the same drain as SIGTERM and answers when every socket is closed. The
port is meant for the kubelet and Prometheus only; the chart's NetworkPolicy keeps it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 8192
# `/drain` acts only on a request carrying this header (the chart's preStop `httpGet` sends
# it). No web page can: an <img>, a form or a link sends no custom header, and a script's
# cross-origin request with one needs a CORS preflight, which this port never approves. A
# plain GET from a browser to an http address carries neither `Origin` nor `Sec-Fetch-*`.
DRAIN_HEADER = "x-orchestrator-drain"


def _header(head: str, name: str) -> str:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return ""


def _from_a_browser(head: str) -> bool:
    """`Origin` or any `Sec-Fetch-*` header: only browsers send them (README says so)."""
    for line in head.split("\r\n")[1:]:
        key = line.partition(":")[0].strip().lower()
        if key == "origin" or key.startswith("sec-fetch-"):
            return True
    return False


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class InternalServer:
    def __init__(
        self, port: int, drain: Callable[[], Awaitable[int]], *, host: str = "0.0.0.0"
    ) -> None:
        self.port = port
        self.drain = drain
        # The api's own address: an api bound to loopback (`orchestrator dev`) must not offer
        # its unauthenticated /drain to other hosts. In a pod it is 0.0.0.0, and the chart's
        # NetworkPolicy keeps the port to the kubelet and Prometheus.
        self.host = host
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            head = request[:MAX_REQUEST_BYTES].decode("latin-1")
            method, path, *_ = head.split(" ", 2)
            path = path.split("?", 1)[0]
            if method != "GET":
                reply = _response("405 Method Not Allowed", b"GET only\n")
            elif path == "/metrics":
                # OpenMetrics when Prometheus asks for it: the format that carries exemplars.
                encode, content_type = choose_encoder(_header(head, "accept"))
                reply = _response("200 OK", encode(REGISTRY), content_type)
            elif path == "/drain" and (not _header(head, DRAIN_HEADER) or _from_a_browser(head)):
                reply = _response("403 Forbidden", b"send X-Orchestrator-Drain (not a browser)\n")
            elif path == "/drain":
                closed = await self.drain()
                reply = _response("200 OK", f"drained {closed} sockets\n".encode())
            elif path == "/health":
                reply = _response("200 OK", b"ok\n")
            else:
                reply = _response("404 Not Found", b"not found\n")
            writer.write(reply)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
