"""What the HTTP spans of the api may say: the route's template, never the client's text.

Litestar's default names a span after the raw path (`GET /api/chat/tasks/<an id>`): span
names must be of low cardinality (OTel), and a path is whatever a client sends, a token
included (`GET /nope/<JWT>`). And the ASGI instrumentation records the full URL with its query
string: a socket URL fetched as plain HTTP (a proxy that drops `Upgrade`) or any request with
`?token=` exported the bearer token to whoever reads traces. Only OTel's own short list of
query parameters (AWS, Google signatures) is redacted upstream.
"""

from __future__ import annotations

import re
from typing import Any

from opentelemetry import trace
from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE
from opentelemetry.trace import Span

# Every attribute the ASGI instrumentation may fill with the request's query string (the old
# semantic conventions, the new ones, or both with `OTEL_SEMCONV_STABILITY_OPT_IN`).
_URL_ATTRIBUTES = ("http.url", "http.target", "url.full", "url.query")
_SECRET_PARAMETER = re.compile(r"((?:^|[?&])(?:token|access_token)=)[^&#]*", re.IGNORECASE)
REDACTED = "REDACTED"


def span_details(scope: Any) -> tuple[str, dict[str, str]]:
    """The span's name and route: `<method> <template>` once Litestar has routed the request,
    the method alone otherwise (the tracing middleware starts the span before routing:
    `name_after_route` names it again once routed)."""
    method = str(scope.get("method", "")).strip() or "HTTP"
    template = scope.get("path_template")
    if isinstance(template, str) and template:
        return f"{method} {template}", {HTTP_ROUTE: template}
    return method, {}


async def name_after_route(request: Any) -> None:
    """A `before_request` hook (routing is done by then): the request's server span named
    `<method> <route template>` with `http.route`, as OpenTelemetry's HTTP conventions ask.
    Named at its start, before routing, every REST span was `POST` or `GET` alone, and a
    trace backend could not tell a send from a cancel or an erasure."""
    span = trace.get_current_span()
    if span.is_recording():
        name, attributes = span_details(request.scope)
        span.update_name(name)
        span.set_attributes(attributes)


def redact_query_tokens(span: Span, scope: Any) -> None:
    """A server request hook: the URL attributes again, with any token's value redacted."""
    attributes = getattr(span, "attributes", None) or {}
    for name in _URL_ATTRIBUTES:
        value = attributes.get(name)
        if isinstance(value, str) and _SECRET_PARAMETER.search(value):
            span.set_attribute(name, _SECRET_PARAMETER.sub(rf"\g<1>{REDACTED}", value))
