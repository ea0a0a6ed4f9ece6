"""The OpenAPI document a real api serves, against what the api really answers: every answer
is declared with a body that conforms to the declared schema (clients generate SDKs from it),
the probes need no token, the examples show real codes, the ids use a portable pattern, and a
401 names the bearer scheme.

The request cases were found by fuzzing the document with schemathesis, then pinned.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import lone_api, new_stack

WATCHED_HEADERS = {
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "retry-after",
    "idempotent-replayed",
    "location",
}


def fetch_document(base: str) -> dict[str, Any]:
    reply = httpx.get(f"{base}/schema/openapi.json", timeout=10)
    assert reply.status_code == 200, reply.text
    doc: dict[str, Any] = reply.json()
    return doc


def schema_validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    """A validator of `schema` whose `#/components/...` references resolve in `doc`."""
    root = {**doc, "__checked": schema}
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", DRAFT202012.create_resource(root)
    )
    return Draft202012Validator({"$ref": "urn:openapi#/__checked"}, registry=registry)


def declared(doc: dict[str, Any], method: str, path: str, status: int) -> dict[str, Any] | None:
    """The response object the document declares for `status` (or `nXX`, `default`)."""
    responses = doc["paths"][path][method.lower()]["responses"]
    found: dict[str, Any] | None = (
        responses.get(str(status))
        or responses.get(f"{str(status)[0]}XX")
        or responses.get("default")
    )
    return found


def violations(doc: dict[str, Any], method: str, path: str, reply: httpx.Response) -> list[str]:
    """What in `reply` the document does not declare or allow: its status, its body (against
    the declared schema), the headers the API documents somewhere (rate limits, Retry-After,
    Idempotent-Replayed, Location)."""
    where = f"{method} {path} -> {reply.status_code}"
    response = declared(doc, method, path, reply.status_code)
    if response is None:
        return [f"{where}: status not declared (body {reply.text[:300]})"]
    problems: list[str] = []
    media = (response.get("content") or {}).get("application/json")
    if media is not None and "schema" in media:
        try:
            body = reply.json()
        except ValueError:
            return [f"{where}: body is not JSON: {reply.text[:200]!r}"]
        validator = schema_validator(doc, media["schema"])
        problems += [
            f"{where}: body {reply.text[:200]} violates the schema: {error.message[:200]}"
            for error in validator.iter_errors(body)
        ]
    documented = {name.lower() for name in response.get("headers") or {}}
    problems += [
        f"{where}: header {name} not declared"
        for name in reply.headers
        if name.lower() in WATCHED_HEADERS and name.lower() not in documented
    ]
    return problems


@dataclass
class Live:
    api: Child
    doc: dict[str, Any]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """An api with PostgreSQL, so that every operation is served (no worker: nothing here
    needs a task to run)."""
    redis = RedisServer().start()
    postgres = PostgresServer(durable=False).start()
    stack = new_stack(redis, tmp_path_factory.mktemp("logs"), database_url=postgres.url())
    try:
        asyncio.run(migrate(postgres.url()))
        api = stack.start_api()
        stack.wait_ready(api)
        yield Live(api, fetch_document(api.url))
    finally:
        stack.stop()
        postgres.cleanup()
        redis.cleanup()


TENANT = unique("oa")
# Made at collection and used until the case runs, which on a loaded 2-core CI machine came
# more than the default 10 minutes later (every case then answered 401 token expired).
H = auth(TENANT, ttl=86_400)
JSON = {**H, "Content-Type": "application/json"}

# (operation method, operation path, request path, request kwargs, expected status)
Case = tuple[str, str, str, dict[str, Any], int]

# 400 answers: every operation declares Litestar's `{"status_code", "detail", "extra"}` for
# 400, while the api answers its own error shape `{"error": {...}}`.
BAD_REQUESTS: list[Case] = [
    ("POST", "/api/chat/send", "/api/chat/send", {"content": b"{", "headers": JSON}, 400),
    (
        "POST",
        "/api/chat/send",
        "/api/chat/send",
        {"json": {"message": "hi"}, "headers": {**H, "X-Session-ID": "a b"}},
        400,
    ),
    ("POST", "/api/chat/status", "/api/chat/status", {"content": b"\x00", "headers": JSON}, 400),
    ("POST", "/api/chat/cancel", "/api/chat/cancel", {"content": b"\x00", "headers": JSON}, 400),
    (
        "GET",
        "/api/sessions/{session_id}/messages",
        "/api/sessions/s1/messages?cursor=garbage",
        {"headers": H},
        400,
    ),
    (
        "GET",
        "/api/sessions/{session_id}/messages",
        "/api/sessions/s1/messages?after_event_id=garbage",
        {"headers": H},
        400,
    ),
]

# Refusals the api answers (in the documented error shape) that the document does not list
# for the operation at all: only `POST /api/chat/send` lists its 401/403/404/409/413/422/503.
UNDECLARED: list[Case] = [
    ("POST", "/api/chat/status", "/api/chat/status", {"json": {"task_id": "0"}}, 401),
    ("POST", "/api/chat/status", "/api/chat/status", {"json": {"task_id": "0"}, "headers": H}, 404),
    (
        "POST",
        "/api/chat/status",
        "/api/chat/status",
        {"json": {"task_id": "a b"}, "headers": H},
        422,
    ),
    (
        "POST",
        "/api/chat/status",
        "/api/chat/status",
        {"json": {"task_id": "0"}, "headers": {**H, "X-Tenant-ID": "other"}},
        403,
    ),
    (
        "POST",
        "/api/chat/status",
        "/api/chat/status",
        {"json": {"task_id": "x" * 2_000_000}, "headers": H},
        413,
    ),
    ("GET", "/api/chat/tasks/{task_id}", "/api/chat/tasks/0", {}, 401),
    ("GET", "/api/chat/tasks/{task_id}", "/api/chat/tasks/0", {"headers": H}, 404),
    ("GET", "/api/chat/tasks/{task_id}", "/api/chat/tasks/a%20b", {"headers": H}, 422),
    ("POST", "/api/chat/cancel", "/api/chat/cancel", {"json": {"task_id": "0"}}, 401),
    ("POST", "/api/chat/cancel", "/api/chat/cancel", {"json": {"task_id": "0"}, "headers": H}, 404),
    ("GET", "/api/sessions/{session_id}/messages", "/api/sessions/0/messages", {}, 401),
    ("GET", "/api/sessions/{session_id}/messages", "/api/sessions/0/messages", {"headers": H}, 404),
    (
        "GET",
        "/api/sessions/{session_id}/messages",
        "/api/sessions/0/messages?limit=0",
        {"headers": H},
        422,
    ),
    ("DELETE", "/api/sessions/{session_id}", "/api/sessions/0", {}, 401),
    ("DELETE", "/api/sessions/{session_id}", "/api/sessions/0", {"headers": H}, 404),
    ("GET", "/api/usage", "/api/usage", {}, 401),
    ("GET", "/api/usage", "/api/usage?from=garbage", {"headers": H}, 422),
    ("GET", "/api/usage", "/api/usage?from=2026-01-02&to=2026-01-01", {"headers": H}, 422),
    ("GET", "/ws/stats", "/ws/stats", {}, 401),
    ("GET", "/ws/stats", "/ws/stats", {"headers": {**H, "X-Tenant-ID": "other"}}, 403),
]


def _ids(cases: list[Case]) -> list[str]:
    return [f"{c[0]} {c[2][:60]} {c[4]} #{n}" for n, c in enumerate(cases)]


def _check(live: Live, case: Case) -> None:
    method, operation, path, kwargs, expected = case
    reply = httpx.request(method, f"{live.api.url}{path}", timeout=10, **kwargs)
    assert reply.status_code == expected, reply.text
    body = reply.json()
    assert set(body["error"]) == {"code", "message", "details"}, body  # README's one shape
    assert violations(live.doc, method, operation, reply) == []


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=_ids(BAD_REQUESTS))
def test_a_400_conforms_to_the_400_schema_the_document_declares(live: Live, case: Case) -> None:
    _check(live, case)


@pytest.mark.parametrize("case", UNDECLARED, ids=_ids(UNDECLARED))
def test_every_refusal_an_operation_answers_is_declared(live: Live, case: Case) -> None:
    _check(live, case)


def test_a_cancel_of_a_final_task_409_is_declared(live: Live) -> None:
    """README: `POST /api/chat/cancel` answers 409 when the task is already final."""
    http = httpx.Client(base_url=live.api.url, timeout=10, headers=H)
    task_id = http.post("/api/chat/send", json={"message": "hi"}).json()["task_id"]
    assert http.post("/api/chat/cancel", json={"task_id": task_id}).status_code == 200
    again = http.post("/api/chat/cancel", json={"task_id": task_id})
    assert again.status_code == 409, again.text
    assert violations(live.doc, "POST", "/api/chat/cancel", again) == []


@pytest.mark.parametrize(
    ("path", "schema_name", "body"),
    [
        ("/api/chat/send", "SendRequest", {"message": "hi", "stram": True}),
        ("/api/chat/status", "TaskRequest", {"task_id": "0", "tenant": "x"}),
    ],
)
def test_a_body_the_document_allows_is_not_refused_as_having_unknown_fields(
    live: Live, path: str, schema_name: str, body: dict[str, Any]
) -> None:
    """The api refuses unknown body fields (README: 422, so that a typo is not ignored), but
    the request schemas do not say so (no `additionalProperties: false`): a client validating
    against the document sends a body it thinks valid and gets a 422."""
    schema = {"$ref": f"#/components/schemas/{schema_name}"}
    allowed = schema_validator(live.doc, schema).is_valid(body)
    reply = httpx.post(f"{live.api.url}{path}", json=body, headers=H, timeout=10)
    refused_as_unknown = reply.status_code == 422 and "unknown field" in reply.text
    assert not (allowed and refused_as_unknown), (
        f"the document allows {body} for {path}, the api answers {reply.status_code} {reply.text}"
    )


README = Path(__file__).resolve().parents[2] / "README.md"
PROBES = ["/health", "/health/ready", "/health/detailed"]


def effective_security(doc: dict[str, Any], method: str, path: str) -> list[dict[str, Any]]:
    operation = doc["paths"][path][method]
    security: list[dict[str, Any]] = operation.get("security", doc.get("security", []))
    return security


@pytest.mark.parametrize("path", PROBES)
def test_the_probes_are_not_documented_as_needing_a_token(live: Live, path: str) -> None:
    """The probes answer without a token (kubelet has none), yet the document's top-level
    `security: [{bearer: []}]` applies to them and they do not override it: an SDK sends (or
    demands) a bearer token for a liveness probe, and a doc reader thinks one is needed."""
    reply = httpx.get(f"{live.api.url}{path}", timeout=10)
    assert reply.status_code == 200, reply.text
    security = effective_security(live.doc, "get", path)
    assert security == [] or {} in security, (
        f"{path} answers without a token, documented {security}"
    )


@pytest.mark.parametrize("path", ["/health/ready", "/health/detailed"])
def test_the_probes_503_while_redis_is_down_is_declared(tmp_path: Path, path: str) -> None:
    """README: `/health/ready` is 503 when Redis does not answer, `/health/detailed` 503
    `degraded`; the document declares only a 200 for either."""
    redis = RedisServer().start()
    try:
        with lone_api(redis, tmp_path) as api:
            doc = fetch_document(api.url)
            redis.stop()
            reply = httpx.get(f"{api.url}{path}", timeout=30)
            assert reply.status_code == 503, reply.text
            assert violations(doc, "GET", path, reply) == []
    finally:
        redis.cleanup()


def test_an_unknown_path_under_schema_answers_in_the_one_error_shape(live: Live) -> None:
    """README: errors have one shape everywhere (only a refused CORS preflight is plain text).
    Every other unknown path answers `{"error": {...}}`; one under /schema answers HTML."""
    assert httpx.get(f"{live.api.url}/nope", timeout=10).json()["error"]["code"] == "not_found"
    reply = httpx.get(f"{live.api.url}/schema/nope", timeout=10)
    assert reply.status_code == 404
    assert reply.headers["content-type"].startswith("application/json"), (
        reply.headers["content-type"],
        reply.text[:120],
    )
    assert reply.json()["error"]["code"] == "not_found"


def _readme_codes() -> set[str]:
    """The error codes README's error table names."""
    text = README.read_text()
    table = text[text.index("**Errors** have one shape") :]
    table = table[: table.index("\n\n", table.index("| status | codes |"))]
    return set(re.findall(r"`([a-z_]+)`", table))


def test_the_error_examples_show_codes_the_api_answers(live: Live) -> None:
    """The examples of ErrorBody / ErrorDetail (shown by Swagger/Redoc for every 4xx/5xx and
    used by mock servers) are random strings generated by Litestar, e.g. `"code":
    "hmGJHERyPYwSLUcVNYZo"`: a code the API never answers and a client cannot match on."""
    codes = _readme_codes()
    assert {"unauthorized", "rate_limited", "not_found"} <= codes
    schemas = live.doc["components"]["schemas"]
    shown = [example["error"]["code"] for example in schemas["ErrorBody"].get("examples", [])]
    shown += [example["code"] for example in schemas["ErrorDetail"].get("examples", [])]
    shown += [
        example["value"]["error"]["code"]
        for path in live.doc["paths"].values()
        for operation in path.values()
        for response in operation["responses"].values()
        for example in (response.get("content") or {})
        .get("application/json", {})
        .get("examples", {})
        .values()
        if "error" in example["value"]
    ]
    assert "unauthorized" in shown  # the refusals show real codes, not no examples at all
    unknown = [code for code in shown if code not in codes]
    assert not unknown, f"examples show error codes the API does not have: {unknown}"


def _patterns(node: Any, where: str = "#") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("pattern"), str):
            found.append((where, node["pattern"]))
        for key, value in node.items():
            found += _patterns(value, f"{where}/{key}")
    elif isinstance(node, list):
        for n, value in enumerate(node):
            found += _patterns(value, f"{where}/{n}")
    return found


def test_the_id_patterns_are_portable_to_every_regex_dialect(live: Live) -> None:
    """Every id pattern of the document is Python's `^[A-Za-z0-9_-]{1,64}$(?!\\n)`: a lookahead,
    outside JSON Schema's interoperable regex subset (2020-12 core, 6.4) and refused by RE2
    (Go's `regexp`: generated Go clients cannot compile their validators) and by Rust's
    `regex`. The project knows: `schemas/` publishes `PORTABLE_ID_PATTERN` for that reason,
    but the OpenAPI document, from which clients generate SDKs, does not."""
    patterns = _patterns(live.doc)
    assert patterns, "the document has id patterns"
    lookaround = [(where, p) for where, p in patterns if "(?" in p]
    assert not lookaround, lookaround[:3]
    # ...while the api still refuses what Python's `$` lets through (a final newline).
    reply = httpx.post(f"{live.api.url}/api/chat/status", json={"task_id": "s1\n"}, headers=H)
    assert reply.status_code == 422, reply.text
    reply = httpx.get(f"{live.api.url}/api/chat/tasks/s1%0A", headers=H, timeout=10)
    assert reply.status_code == 422, reply.text


@pytest.mark.parametrize(
    "authorization", [None, "Bearer not-a-jwt"], ids=["no-token", "garbage-token"]
)
def test_a_401_names_the_bearer_scheme(live: Live, authorization: str | None) -> None:
    """The document declares an `http`/`bearer` security scheme; RFC 9110 (15.5.2) says a 401
    MUST carry `WWW-Authenticate`, and RFC 6750 (3) gives it for bearer tokens
    (`Bearer error="invalid_token"`). The api's 401s carry none: clients and proxies that act
    on the challenge (re-authenticate, refresh a token) do not."""
    headers = {"Authorization": authorization} if authorization else {}
    reply = httpx.post(
        f"{live.api.url}/api/chat/send", json={"message": "hi"}, headers=headers, timeout=10
    )
    assert reply.status_code == 401, reply.text
    challenge = reply.headers.get("www-authenticate", "")
    assert challenge.lower().startswith("bearer"), dict(reply.headers)
    # RFC 6750 3.1: an error code only when a token was given.
    assert ("invalid_token" in challenge) == (authorization is not None), challenge


def test_every_authenticated_operation_documents_x_tenant_id_and_the_one_error_shape(
    live: Live,
) -> None:
    """`provide_principal` reads X-Tenant-ID on every route behind the token (403 on a
    mismatch): the document names it wherever it applies, and no operation keeps Litestar's
    default `{status_code, detail, extra}` error schema, a shape the api never sends."""
    for path, item in live.doc["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
            public = operation.get("security") == []
            assert ("X-Tenant-ID" in headers) == (not public), where
            assert public or "403" in operation["responses"], where
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")) and path != "/health/detailed":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (where, status)
