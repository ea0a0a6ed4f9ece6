"""Requests the router answers itself (404 on an unknown path, 405 on a wrong method) in the
HTTP metrics.

Litestar's Prometheus middleware is part of each route's stack, so a request that matches no
route never reaches it: a scan of unknown paths, or a frontend calling a route with the wrong
method, was invisible on the dashboard and in the error-ratio alerts. Such requests are
counted in the same metrics under one path label, `UNROUTED_PATH`: a label per unknown path
would let any client, without a token, create series without bound.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from litestar.plugins.prometheus import PrometheusConfig, PrometheusMiddleware

from services.api.connections import Message, Send
from services.api.sockets import Receive, Scope

UNROUTED_PATH = "<unrouted>"

App = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _never(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    raise AssertionError("only the metric accessors of this middleware are used")


class UnroutedRequests:
    """Calls `app` for an HTTP request and counts it when no route took it."""

    __slots__ = ("_app", "_app_name", "_metrics")

    def __init__(self, app: App, config: PrometheusConfig) -> None:
        self._app = app
        self._app_name = config.app_name
        # Its metric accessors, so the series are the very ones the routed requests use.
        self._metrics = PrometheusMiddleware(_never, config)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500  # unless the app starts an answer

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, watched)
        finally:
            if "route_handler" not in scope:  # set by the router on a match
                self._count(scope["method"], status, time.perf_counter() - started)

    def _count(self, method: str, status: int, seconds: float) -> None:
        # The label order of Litestar's middleware: the series are created by whichever
        # request comes first.
        labels: dict[str, str | int | float] = {
            "method": method,
            "path": UNROUTED_PATH,
            "status_code": status,
            "app_name": self._app_name,
        }
        values = list(labels.values())
        self._metrics.request_count(labels).labels(*values).inc()
        self._metrics.request_time(labels).labels(*values).observe(seconds)
        if status >= 500:
            self._metrics.requests_error_count(labels).labels(*values).inc()
