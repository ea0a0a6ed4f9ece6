"""The api's app factory: `create_app(settings)` returns the ASGI app: the session sockets
(`/ws/{tenant_id}/{session_id}`, a plain ASGI handler: see `sockets`) in front of Litestar,
which serves everything else (REST, health, the lifespan).

Resources (the Redis pool, the delivery hub) are created in the lifespan and reach handlers
through `app.state.runtime` and dependency injection; nothing is created at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import MediaType, ScopeType
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.plugins.prometheus import PrometheusConfig

from services.api import chat, health, history, metrics, sockets
from services.api.admission import (
    QUOTA_REASONS,
    RATE_LIMIT_SCOPES,
    Admission,
    quota_rejections,
    rate_limit_rejections,
)
from services.api.auth import provide_principal
from services.api.chat_service import ChatService
from services.api.connections import Send
from services.api.delivery import SessionHub
from services.api.drain import drain
from services.api.http_tracing import name_after_route, redact_query_tokens, span_details
from services.api.internal import InternalServer
from services.api.json_request import JsonRequest
from services.api.models import StrictStructSchemaPlugin
from services.api.runtime import Runtime
from services.api.unrouted import UnroutedRequests
from services.core import clock, keys, telemetry
from services.core.auth import TokenVerifier
from services.core.errors import OrchestratorError
from services.core.quotas import QuotaCache, QuotaStore
from services.core.ratelimit import RateLimiter
from services.core.redis_client import REDIS_DOWN, REDIS_REFUSING, REFUSING_WORDS, create_redis
from services.core.scripts import Scripts
from services.core.settings import ConfigError, Settings, process_name
from services.core.task_metrics import create_series
from services.core.task_stop import cancel_and_wait
from services.core.tasks import TaskStore
from services.core.tenant_sockets import TenantSockets
from services.core.tiers import load_tiers
from services.core.usage import UsageCounter
from services.persistence.database import asyncpg_target, create_engine
from services.persistence.history import HistoryStore
from services.persistence.pool_share import PoolShare

log = logging.getLogger(__name__)

AnyRequest = Request[Any, Any, Any]

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


def _error(status: int, code: str, message: str, details: Any = None) -> Response[Any]:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return Response(body, status_code=status)


def _on_orchestrator_error(_: AnyRequest, exc: OrchestratorError) -> Response[Any]:
    if exc.code == "rate_limited" and exc.details.get("scope") == "tenant_reads":
        # Counted here: the database pool's share (services/persistence/pool_share.py) knows
        # no api metric; a send's refusals are counted where admission decides them.
        rate_limit_rejections.labels("tenant_reads").inc()
    response = _error(exc.status, exc.code, exc.message, exc.details)
    response.headers.update(exc.headers)
    return response


def _on_validation_error(request: AnyRequest, exc: ValidationException) -> Response[Any]:
    """Malformed JSON is 400; JSON of the wrong shape is 422 with the offending fields."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    if request.headers.get("content-length") == "0":  # Litestar's words for it: "'data'"
        return _error(400, "malformed_json", "request body is empty", {})
    if any("malformed" in str(item).lower() for item in extra) or not extra:
        return _error(400, "malformed_json", "request body is not valid JSON", {"errors": extra})
    return _error(422, "validation_error", _invalid_part(extra), {"errors": extra})


_PARTS = {"query": "query parameters are", "path": "path is", "header": "headers are"}


def _invalid_part(errors: list[Any]) -> str:
    """Name what was wrong: a bad `?limit=` said "request body is invalid" on a GET."""
    sources = {item.get("source") for item in errors if isinstance(item, dict)}
    parts = [_PARTS[source] for source in sorted(sources, key=str) if source in _PARTS]
    if len(parts) == 1 and len(sources) == 1:
        return f"{parts[0]} invalid"
    return "request is invalid" if parts else "request body is invalid"


# nginx's "client closed request": what the HTTP metrics record of a request whose client hung
# up (or was answered 400/408 by the protocol layer and closed) before its body was read.
CLIENT_CLOSED = 499


def _on_http_error(_: AnyRequest, exc: HTTPException) -> Response[Any]:
    if exc.status_code == 500 and "client disconnected" in str(exc.detail):
        # Litestar raises a 500 when the client goes away mid-body; nobody receives it, but
        # the metrics recorded a server error, which an anonymous client could repeat at will
        # to set off the critical OrchestratorHighErrorRate alert.
        return _error(CLIENT_CLOSED, "client_closed", "the client closed the connection")
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    # Litestar answers a body its decoder refused (truncated, blank, a number out of range)
    # with a 400 whose cause is the decoder's error, worded by msgspec.
    undecodable = isinstance(exc.__cause__, SerializationException)
    if exc.status_code == 400 and (undecodable or "malformed" in str(exc.detail).lower()):
        code = "malformed_json"
    response = _error(exc.status_code, code, str(exc.detail))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def _on_too_deep(_: AnyRequest, exc: RecursionError) -> Response[Any]:
    """A body nested deeper than the JSON decoder's stack (a few KB of brackets) is bad input,
    not a server fault: one line, without the traceback (2 KB of log for 1 KB of brackets,
    from a client without a token: more log than input)."""
    log.warning("request body nested too deeply: %s", exc)
    return _error(400, "malformed_json", "request body is nested too deeply")


def _on_not_utf8(_: AnyRequest, exc: UnicodeDecodeError) -> Response[Any]:
    """msgspec raises this, not a decode error, for a JSON string that is not UTF-8 (a client
    sending latin-1, say): bad input like any other malformed body."""
    return _error(400, "malformed_json", "request body is not valid UTF-8 JSON")


def _on_redis_down(_: AnyRequest, exc: Exception) -> Response[Any]:
    log.warning("redis unavailable: %s", type(exc).__name__)
    return _error(503, "unavailable", "redis unavailable, retry later")


def _on_redis_refusing(_: AnyRequest, exc: Exception) -> Response[Any]:
    log.warning("redis refuses writes: %s", exc)
    return _error(503, "unavailable", REFUSING_WORDS)


def _on_unexpected(_: AnyRequest, exc: Exception) -> Response[Any]:
    log.exception("unhandled error", exc_info=exc)
    return _error(500, "internal_error", "internal error")


async def keep_sockets_counted(runtime: Runtime) -> None:
    """Refresh this pod's sockets in the per-tenant counts before they expire: a pass every
    third of the ttl, timed from when the last one began (a slow pass must not push the next
    one past the members' expiry)."""
    interval = runtime.settings.connection_ttl_seconds / 3
    sockets = runtime.admission.sockets
    loop = asyncio.get_running_loop()
    began = loop.time()
    while True:
        await asyncio.sleep(max(0.0, began + interval - loop.time()))
        began = loop.time()
        by_tenant: dict[str, list[str]] = defaultdict(list)
        for conn in list(runtime.hub.connections):
            by_tenant[conn.tenant_id].append(conn.connection_id)
        try:
            failed = await sockets.refresh_all(by_tenant)
        except REDIS_DOWN:
            continue  # counted again at the next refresh once Redis is back
        except Exception:
            # Whatever it is, this task must not end: nothing awaits it, and the pod's sockets
            # would silently drop out of every tenant's count for good.
            log.warning("refreshing the socket counts failed", exc_info=True)
            continue
        for tenant_id, error in failed.items():
            # A read-only replica after a failover, out of memory, a key of the wrong type.
            log.warning(
                "refreshing the socket count of a tenant failed",
                exc_info=error,
                extra={"tenant_id": tenant_id},
            )


def provide_runtime(request: AnyRequest) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# Response headers a page must be able to read: a browser hides every header of a cross-origin
# response but a safelisted few unless the response names it (a page could not see its
# remaining rate, when to retry after a 429, that a send was a replay, or that a 401's token
# was expired or bad rather than missing).
EXPOSED_HEADERS = [
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "Retry-After",
    "Idempotent-Replayed",
    "WWW-Authenticate",
]


SCHEMA_PATH = "/schema"


def _schema_not_found(response: Response[Any]) -> Response[Any]:
    """Litestar answers an unknown path under /schema with an HTML page: the one error
    shape instead, as for every other unknown path."""
    if response.status_code != 404:
        return response
    refusal = _error(404, "not_found", "Not Found")
    refusal.media_type = MediaType.JSON  # else the route's HTML, which a dict cannot be
    return refusal


def _openapi_config() -> OpenAPIConfig:
    """The document: bearer tokens everywhere but where an operation says `security: []`."""
    return OpenAPIConfig(
        title="Agent Orchestrator",
        version="1",
        path=SCHEMA_PATH,
        openapi_router=Router(
            SCHEMA_PATH,
            route_handlers=[],
            include_in_schema=False,
            after_request=_schema_not_found,
        ),
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")
            }
        ),
        security=[{"bearer": []}],
    )


def _cors(settings: Settings) -> CORSConfig | None:
    """CORS for the pages of `ORCHESTRATOR_ALLOWED_ORIGINS`; none when the list is empty."""
    if not settings.allowed_origins:
        return None
    return CORSConfig(
        expose_headers=EXPOSED_HEADERS,
        allow_origins=list(settings.allowed_origins),
        allow_headers=[
            "Authorization",
            "Content-Type",
            "Idempotency-Key",
            "X-Session-ID",
            "X-Agent-ID",
            "X-Tenant-ID",
        ],
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
    )


def _tracing_plugins() -> list[OpenTelemetryPlugin]:
    """The HTTP tracing middleware, only when traces go somewhere: unsampled spans still cost
    the middleware's per-request work (about a tenth of the api's CPU on the chat path)."""
    if not telemetry.exporter_configured():
        return []
    return [
        OpenTelemetryPlugin(
            OpenTelemetryConfig(
                # Sockets are traced per frame by the handlers: one span per socket lifetime
                # (hours) is useless, and so are per-frame ASGI spans.
                scopes={ScopeType.HTTP},
                exclude=["^/health", "^/schema"],
                exclude_spans=["receive", "send"],
                scope_span_details_extractor=span_details,
                server_request_hook_handler=redact_query_tokens,
            )
        )
    ]


class Api:
    """The api's ASGI app: session sockets straight to `sockets.session_socket`, everything
    else (REST, health, lifespan, other websocket paths) to Litestar.

    `__call__` returns the handler's coroutine instead of awaiting it, so a socket's task
    holds no frame of this dispatcher (uvicorn is told the interface is ASGI 3).
    """

    __slots__ = ("http", "litestar")

    def __init__(self, litestar: Litestar, prometheus: PrometheusConfig) -> None:
        self.litestar = litestar
        self.http = UnroutedRequests(litestar, prometheus)  # type: ignore[arg-type]

    @property
    def state(self) -> State:
        return self.litestar.state

    def __call__(
        self, scope: sockets.Scope, receive: sockets.Receive, send: Send
    ) -> Awaitable[None]:
        if scope["type"] == "websocket":
            ids = sockets.socket_ids(scope["path"])
            if ids is not None:
                runtime: Runtime = self.litestar.state.runtime
                return sockets.session_socket(runtime, scope, receive, send, *ids)
        elif scope["type"] == "http":
            return self.http(scope, receive, send)
        return self.litestar(scope, receive, send)  # type: ignore[arg-type]


def create_app(
    settings: Settings, *, pod_id: str | None = None, internal_host: str = "0.0.0.0"
) -> Api:
    verifier = TokenVerifier(settings)  # fail at start, not at the first request
    if settings.database_url:  # one line now, not a traceback from the lifespan
        asyncpg_target(settings.database_url)
    tiers = load_tiers(settings)
    if settings.default_tier not in tiers:
        raise ConfigError(
            f"ORCHESTRATOR_DEFAULT_TIER: unknown tier {settings.default_tier!r}; "
            f"known: {', '.join(tiers)}"
        )
    create_series(metrics.tasks, ("accepted", "cancelled"), tiers)
    create_series(metrics.tasks_submitted, keys.PRIORITIES)
    create_series(rate_limit_rejections, RATE_LIMIT_SCOPES)
    create_series(quota_rejections, QUOTA_REASONS)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Each part is stopped in reverse order of its start, whether the api stops or a later
        # part fails to start (the parts started before it are stopped, not left running).
        async with contextlib.AsyncExitStack() as started:
            runtime = await _start(app, started)
            log.info("api %s ready", runtime.pod_id)
            yield
        log.info("api %s stopped%s", runtime.pod_id, " after draining" if runtime.draining else "")

    async def _start(app: Litestar, started: contextlib.AsyncExitStack) -> Runtime:
        await verifier.start()  # an identity provider's keys, when ORCHESTRATOR_JWT_JWKS_URL
        started.push_async_callback(verifier.stop)
        redis = create_redis(settings)
        started.push_async_callback(redis.aclose)
        scripts = Scripts(redis)
        with contextlib.suppress(*REDIS_DOWN):  # else loaded on the first NOSCRIPT
            await scripts.load()
        tasks = TaskStore(redis, scripts, settings)
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):  # else at the first erasure
            await tasks.mark_index_start()
        name = pod_id or process_name(settings)
        hub = SessionHub(redis, name, log_ttl_ms=settings.session_log_ttl_seconds * 1000)
        await hub.start()
        started.push_async_callback(hub.stop)
        store = QuotaStore(redis, settings, tiers)
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):  # else the CLI cannot check
            await store.publish_tiers()
        quotas = QuotaCache(store, settings.validation_cache_ttl)
        await quotas.start()
        started.push_async_callback(quotas.stop)
        admission = Admission(
            quotas,
            RateLimiter(redis),
            UsageCounter(redis),
            TenantSockets(redis, settings.connection_ttl_seconds),
            settings,
        )
        runtime = Runtime(
            settings=settings,
            pod_id=name,
            redis=redis,
            verifier=verifier,
            hub=hub,
            chat=ChatService(redis, tasks, admission, settings),
            admission=admission,
        )
        if settings.database_url:
            engine = create_engine(settings)
            started.push_async_callback(engine.dispose)
            share = PoolShare(
                settings.database_pool_size, settings.database_connect_timeout_seconds
            )
            runtime.history = HistoryStore(engine, page_max=settings.history_page_max, share=share)
            runtime.database = engine
            runtime.chat.history = runtime.history
        # Before Redis and the database are closed: the sends the shutdown cut finish first.
        started.push_async_callback(runtime.chat.stop)
        with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING):
            await clock.sync(redis)  # created_at and deadlines: on Redis's clock
        loop = asyncio.get_running_loop()
        syncing = loop.create_task(clock.keep_synced(redis))
        heartbeat = loop.create_task(keep_sockets_counted(runtime))
        started.push_async_callback(cancel_and_wait, heartbeat, syncing)
        app.state.runtime = runtime
        if settings.metrics_port:
            internal = InternalServer(
                settings.metrics_port,
                lambda: drain(runtime, settings.drain_seconds),
                host=internal_host,
            )
            await internal.start()
            started.push_async_callback(internal.stop)
        return runtime

    exception_handlers: dict[Any, Any] = {
        OrchestratorError: _on_orchestrator_error,
        ValidationException: _on_validation_error,
        HTTPException: _on_http_error,
        RecursionError: _on_too_deep,
        UnicodeDecodeError: _on_not_utf8,
        **dict.fromkeys(REDIS_DOWN, _on_redis_down),
        **dict.fromkeys(REDIS_REFUSING, _on_redis_refusing),
        Exception: _on_unexpected,
    }
    prometheus = PrometheusConfig(
        app_name="agent-orchestrator",
        prefix=metrics.HTTP_METRICS_PREFIX,
        group_path=True,
        scopes={ScopeType.HTTP},
        buckets=list(metrics.HTTP_BUCKETS),
        exclude=["^/health$", "^/health/ready$"],  # the probes, not /health/detailed
        exemplars=lambda _: telemetry.exemplar() or {},
    )
    tracing = _tracing_plugins()
    litestar = Litestar(
        route_handlers=[
            chat.send_message,
            chat.task_status,
            chat.get_task,
            chat.cancel_task,
            history.user_sessions,
            history.session_messages,
            history.erase_session,
            history.tenant_usage,
            health.health,
            health.ready,
            health.detailed,
            health.socket_stats,
        ],
        dependencies={
            "principal": Provide(provide_principal, sync_to_thread=False),
            "runtime": Provide(provide_runtime, sync_to_thread=False),
        },
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        cors_config=_cors(settings),
        openapi_config=_openapi_config(),
        request_max_body_size=settings.max_body_bytes,
        request_class=JsonRequest,
        plugins=[StrictStructSchemaPlugin(), *tracing],
        # Only with tracing on: a hook per request costs every send otherwise.
        before_request=name_after_route if tracing else None,
        middleware=[prometheus.middleware],
        logging_config=None,
        debug=False,
    )
    return Api(litestar, prometheus)
