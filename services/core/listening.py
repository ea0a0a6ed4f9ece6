"""Listening sockets a process opens at start, refused in one line when they cannot be had.

A taken `ORCHESTRATOR_METRICS_PORT` (9090 is also Prometheus's own default) or a `--host` that
does not resolve surfaced as a traceback: from prometheus_client's server in the worker and
the executor, and from the api's lifespan (uvicorn's "Application startup failed").
"""

from __future__ import annotations

import socket

from prometheus_client import start_http_server

from services.core.settings import ConfigError

METRICS_PORT = "ORCHESTRATOR_METRICS_PORT"


def serve_metrics(port: int) -> None:
    """Prometheus's exposition on `port` (all addresses), in a thread of its own."""
    try:
        start_http_server(port)
    except OSError as exc:
        raise ConfigError(f"{METRICS_PORT}: cannot listen on port {port} ({_why(exc)})") from None


def check_can_listen(host: str, port: int, setting: str) -> None:
    """Bind `host:port` once and let it go, before a server that would fail there with a
    traceback starts (the api's internal port opens inside its lifespan)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host: cannot resolve {host!r} ({_why(exc)})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot listen on {host}:{port} ({_why(exc)})") from None


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
