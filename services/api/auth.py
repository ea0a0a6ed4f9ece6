"""Who is calling: the bearer token of a request, checked against the seed's headers."""

from __future__ import annotations

import re
from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from services.api.runtime import Runtime
from services.core.auth import Principal
from services.core.errors import BadRequest, Forbidden, Unauthorized
from services.core.ids import is_valid_id
from services.core.logs import bind_for_this_task

# A proxy's id of the request (ingress-nginx sends its `$req_id`; other proxies a UUID): bound
# to the request's log lines, so that an error line leads to the proxy's access log line.
# Visible ASCII only, and short: a client may send it too, and it must not forge log content.
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization: Bearer <token>")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be 'Bearer <token>'")
    return token.strip()


def provide_principal(
    request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]
) -> Principal:
    """Depends on `runtime` so that Litestar resolves the two one after the other: handlers
    take both, and dependencies of the same level are resolved in an anyio task group per
    request (two tasks and a cancel scope: about a tenth of the api's CPU per chat send)."""
    token = bearer_token(request.headers.get("authorization"))
    try:
        principal = runtime.verifier.verify(token)
    except Unauthorized as refused:
        refused.of_a_token()
        raise
    claimed = request.headers.get("x-tenant-id")
    if claimed is not None and claimed != principal.tenant_id:
        raise Forbidden("X-Tenant-ID does not match the token's tenant")
    # Every later line of the request names whose it was (a 503 while Redis is down too).
    fields = {"tenant_id": principal.tenant_id}
    session = request.path_params.get("session_id") or request.headers.get("x-session-id")
    if isinstance(session, str) and is_valid_id(session):
        fields["session_id"] = session
    proxy_id = request.headers.get("x-request-id")
    if proxy_id is not None and REQUEST_ID.fullmatch(proxy_id):
        fields["x_request_id"] = proxy_id
    bind_for_this_task(**fields)
    return principal


def header_id(request: Request[Any, Any, Any], name: str) -> str | None:
    """An optional id header of the seed (X-Session-ID, X-Agent-ID), validated."""
    value = request.headers.get(name)
    if value is None:
        return None
    if not is_valid_id(value):
        raise BadRequest(f"{name} must match [A-Za-z0-9_-]{{1,64}}")
    return value


def pick(body_value: str | None, header_value: str | None, name: str) -> str | None:
    if body_value and header_value and body_value != header_value:
        raise BadRequest(f"{name} in the body disagrees with its header")
    return body_value or header_value
