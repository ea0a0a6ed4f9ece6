"""The send's OpenAPI operation documents the headers our own code reads and writes."""

from __future__ import annotations

from typing import Any

from services.api.app import EXPOSED_HEADERS, create_app
from services.core.ids import PORTABLE_ID_PATTERN
from services.core.settings import load_settings


def send_operation() -> dict[str, Any]:
    app = create_app(load_settings(jwt_secret="openapi-test-secret-" + "x" * 24))
    schema = app.litestar.openapi_schema.to_schema()
    operation: dict[str, Any] = schema["paths"]["/api/chat/send"]["post"]
    return operation


def test_the_optional_request_headers_are_documented() -> None:
    headers = {p["name"]: p for p in send_operation()["parameters"] if p["in"] == "header"}
    assert set(headers) == {"Idempotency-Key", "X-Session-ID", "X-Agent-ID", "X-Tenant-ID"}
    assert not any(p["required"] for p in headers.values())
    assert headers["Idempotency-Key"]["schema"]["maxLength"] == 255
    assert headers["X-Session-ID"]["schema"]["pattern"] == PORTABLE_ID_PATTERN


def test_every_header_a_page_may_read_is_documented_on_the_answers() -> None:
    responses = send_operation()["responses"]
    documented = {name for status in ("202", "401", "429") for name in responses[status]["headers"]}
    assert documented == set(EXPOSED_HEADERS)
    assert "Retry-After" in responses["429"]["headers"]
    assert {"401", "403", "413", "422", "429", "503"} <= set(responses)
    for status in ("401", "403", "413", "422", "429", "503"):
        body = responses[status]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ErrorBody"}, status


def test_every_refusal_of_a_send_is_documented() -> None:
    """README: the OpenAPI lists every refusal with its error body (409 was missing)."""
    responses = send_operation()["responses"]
    assert {"400", "401", "403", "409", "413", "422", "429", "503"} <= set(responses)
    for code in ("agent_not_allowed", "streaming_not_allowed"):
        assert code in responses["403"]["description"]
    assert "idempotency_conflict" in responses["409"]["description"]
