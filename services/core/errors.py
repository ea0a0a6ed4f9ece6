"""The one exception hierarchy; the api maps it to the one JSON error shape of DESIGN §3."""

from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    """An error a client can act on: a stable `code`, an HTTP status and optional details."""

    code = "internal_error"
    status = 500

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(OrchestratorError):
    code, status = "bad_request", 400


class InvalidInput(OrchestratorError):
    code, status = "validation_error", 422


# RFC 9110 15.5.2: a 401 names the scheme to authenticate with; RFC 6750 3: a bearer token
# that was given and refused adds `error="invalid_token"` (none when no token came).
BEARER_CHALLENGE = "Bearer"
INVALID_TOKEN_CHALLENGE = 'Bearer error="invalid_token"'  # noqa: S105 (a scheme, no secret)


class Unauthorized(OrchestratorError):
    """A 401 carrying `WWW-Authenticate`, so that clients and proxies that act on the challenge
    (re-authenticate, refresh a token) do."""

    code, status = "unauthorized", 401

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(
            message,
            details=details,
            headers={"WWW-Authenticate": BEARER_CHALLENGE, **(headers or {})},
            code=code,
        )

    def of_a_token(self) -> Unauthorized:
        """The refusal of a token that was given: `error="invalid_token"` (RFC 6750 3.1)."""
        self.headers["WWW-Authenticate"] = INVALID_TOKEN_CHALLENGE
        return self


class Forbidden(OrchestratorError):
    code, status = "forbidden", 403


class NotFound(OrchestratorError):
    code, status = "not_found", 404


class Conflict(OrchestratorError):
    code, status = "conflict", 409


class PayloadTooLarge(OrchestratorError):
    code, status = "payload_too_large", 413


class RateLimited(OrchestratorError):
    code, status = "rate_limited", 429


class Unavailable(OrchestratorError):
    code, status = "unavailable", 503
