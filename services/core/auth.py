"""Client tokens: verify the JWT of every request and socket, and issue tokens for the CLI.

Claims: `sub` (the user), `tenant_id`, `exp`; `aud`/`iss` are checked when configured. The
tier is never read from the token or a header: it comes from the quota store alone.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from services.core.errors import Unauthorized
from services.core.ids import is_valid_id
from services.core.settings import ConfigError, Settings

LEEWAY_SECONDS = 10
VERIFIED_CACHE_SIZE = 4096  # distinct tokens remembered per process (LRU)
MAX_CACHED_TOKEN_CHARS = 4096  # longer tokens are verified every time, never kept


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    user_id: str
    name: str | None = None
    # When the token stops being valid (its `exp` plus the leeway, epoch seconds): a socket
    # outlives its handshake, so what it asks for later is checked against this.
    valid_until: float = float("inf")

    def expired(self) -> bool:
        return time.time() >= self.valid_until


def dev_secret_path() -> Path:
    """Where `orchestrator dev` keeps this machine's generated secret for `orchestrator token`."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "agent-orchestrator" / "jwt-secret"


def read_dev_secret() -> str | None:
    path = dev_secret_path()
    return path.read_text().strip() if path.exists() else None


class TokenVerifier:
    """Checks signature, expiry, audience and issuer; maps every failure to 401."""

    def __init__(self, settings: Settings) -> None:
        key = settings.jwt_public_key if settings.uses_public_key else settings.jwt_secret
        variable = (
            "ORCHESTRATOR_JWT_PUBLIC_KEY" if settings.uses_public_key else "ORCHESTRATOR_JWT_SECRET"
        )
        if not key:
            raise ConfigError(f"{variable}: must be set for {settings.jwt_algorithm} tokens")
        # Parsed now, not on the first request: a key PyJWT cannot read (a truncated PEM, a
        # PEM given as an HS secret) stops the process at start instead of failing every
        # request with a 500.
        try:
            self._key: Any = jwt.get_algorithm_by_name(settings.jwt_algorithm).prepare_key(key)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            # PyJWT's own words name the problem, never the key; others' might quote it.
            why = f" ({exc})" if isinstance(exc, jwt.PyJWTError) else ""
            raise ConfigError(
                f"{variable}: not a usable {settings.jwt_algorithm} key{why}"
            ) from None
        self._algorithms = [settings.jwt_algorithm]
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def verify(self, token: str) -> Principal:
        """The token's principal; a token verified before is not decoded again until it expires.

        Only successes are remembered, by the whole token string, until the token's `exp` (with
        the same leeway as the check): a token that passed every check passes them again until
        then, so the result is the same without the signature's cost on every request.
        """
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
            raise Unauthorized("token expired")
        principal, exp = self._decode(token)
        if len(token) <= MAX_CACHED_TOKEN_CHARS:
            self._verified[token] = (principal, exp + LEEWAY_SECONDS)
            if len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)
        return principal

    def _decode(self, token: str) -> tuple[Principal, float]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        tenant_id = claims.get("tenant_id")
        if not isinstance(tenant_id, str) or not is_valid_id(tenant_id):
            raise Unauthorized("token has no valid tenant_id claim")
        sub = claims["sub"]
        name = claims.get("name")
        try:
            expires = float(claims["exp"])
        except OverflowError:  # an integer beyond a float: signed by the key, still not valid
            raise Unauthorized("invalid token: exp out of range") from None
        principal = Principal(
            tenant_id,
            str(sub),
            name if isinstance(name, str) else None,
            valid_until=expires + LEEWAY_SECONDS,
        )
        return principal, expires


def issue_token(
    settings: Settings, *, tenant_id: str, user_id: str, ttl_seconds: int, secret: str | None = None
) -> str:
    """Sign a client token with the configured key (HS secret or the private key)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "tenant_id": tenant_id,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.uses_public_key:
        if not settings.jwt_private_key:
            raise ConfigError(
                f"ORCHESTRATOR_JWT_PRIVATE_KEY: must be set to sign {settings.jwt_algorithm} tokens"
            )
        key = settings.jwt_private_key
    else:
        key = secret or settings.jwt_secret or read_dev_secret() or ""
        if not key:
            raise ConfigError(
                "ORCHESTRATOR_JWT_SECRET: not set (and no secret from `orchestrator dev` found)"
            )
    try:
        return jwt.encode(claims, key, algorithm=settings.jwt_algorithm)
    except (jwt.PyJWTError, ValueError, TypeError):
        variable = (
            "ORCHESTRATOR_JWT_PRIVATE_KEY"
            if settings.uses_public_key
            else "ORCHESTRATOR_JWT_SECRET"
        )
        raise ConfigError(f"{variable}: not a usable {settings.jwt_algorithm} key") from None
