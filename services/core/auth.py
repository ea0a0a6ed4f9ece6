"""Client tokens: verify the JWT of every request and socket, and issue tokens for the CLI.

Claims: `sub` (the user), `tenant_id`, `exp`; `aud`/`iss` are checked when configured. The
tier is never read from the token or a header: it comes from the quota store alone.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from services.core.errors import Unauthorized, Unavailable
from services.core.ids import is_valid_id
from services.core.jwks import RETRY_UNLOADED_SECONDS, KeySetSource
from services.core.jwt_keys import candidates, usable_key, verification_keys
from services.core.lone_surrogates import has_lone_surrogate, repaired_text
from services.core.settings import ConfigError, Settings

LEEWAY_SECONDS = 10
# OpenID Connect Core 2: a `sub` is at most 255 ASCII characters. History keys its users'
# sessions by it in a btree index, whose rows hold at most 2704 bytes: a longer one was
# answered, then never written (the writer retried its batch as an outage).
MAX_SUB_CHARS = 255
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
    """Checks signature, expiry, audience and issuer; maps every failure to 401 (but a key
    the identity provider's set may hold and was not read yet: 503, retry)."""

    def __init__(self, settings: Settings) -> None:
        # Parsed and judged now, not on the first request: a key PyJWT cannot read, a private
        # key where the public one belongs (no `verify`: a 500 per request) or a weak one stops
        # the process at start.
        self._keys = verification_keys(settings)
        self.source = (
            KeySetSource(
                settings.jwt_jwks_url, settings.jwt_algorithm, settings.jwt_jwks_refresh_seconds
            )
            if settings.jwt_jwks_url
            else None
        )
        self._algorithms = [settings.jwt_algorithm]
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._generation = 0  # the provider's `generation` the cache holds tokens of

    async def start(self) -> None:
        if self.source is not None:
            await self.source.start()

    async def stop(self) -> None:
        if self.source is not None:
            await self.source.stop()

    @property
    def ready(self) -> bool:
        """False while no key could verify any token (the provider's set not read yet)."""
        return bool(self._keys) or (self.source is not None and self.source.loaded)

    def verify(self, token: str) -> Principal:
        """The token's principal; a token verified before is not decoded again until it expires.

        Only successes are remembered, by the whole token string, until the token's `exp` (with
        the same leeway as the check): a token that passed every check passes them again until
        then, so the result is the same without the signature's cost on every request.
        """
        source = self.source
        if source is not None and source.generation != self._generation:
            # The provider removed a key: a token it verified is not kept until its `exp`.
            self._verified.clear()
            self._generation = source.generation
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
            claims = self._verified_claims(token)
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        for claim in _TIME_CLAIMS:
            if claim in claims and not _is_number(claims[claim]):
                # PyJWT takes "1795787520" for a date (int() of the string); RFC 7519 says a
                # NumericDate is a JSON number.
                raise Unauthorized(f"invalid token: {claim} must be a number")
        tenant_id = claims.get("tenant_id")
        if not isinstance(tenant_id, str) or not is_valid_id(tenant_id):
            raise Unauthorized("token has no valid tenant_id claim")
        sub = str(claims["sub"])
        if has_lone_surrogate(sub):
            raise Unauthorized("invalid token: sub holds a lone UTF-16 surrogate, not Unicode")
        if "\x00" in sub:  # history stores it as U+FFFD: two users would be one there
            raise Unauthorized("invalid token: sub holds a NUL character")
        if not sub or len(sub) > MAX_SUB_CHARS:  # history's user: none, or past its index
            raise Unauthorized(f"invalid token: sub must be 1 to {MAX_SUB_CHARS} characters")
        name = claims.get("name")
        try:
            expires = float(claims["exp"])
        except OverflowError:  # an integer beyond a float: signed by the key, still not valid
            raise Unauthorized("invalid token: exp out of range") from None
        principal = Principal(
            tenant_id,
            sub,
            repaired_text(name) if isinstance(name, str) else None,
            valid_until=expires + LEEWAY_SECONDS,
        )
        return principal, expires

    def _verified_claims(self, token: str) -> dict[str, Any]:
        """The claims of a token one of the keys signed. PyJWT checks the signature before
        any claim, so only a bad signature means "try the next key"; an expired token or a
        wrong audience is refused by the first key that verifies it."""
        header = jwt.get_unverified_header(token)
        source = self.source
        keys = candidates([*self._keys, *source.keys] if source else self._keys, header)
        try:
            if not keys:
                raise jwt.InvalidSignatureError("no configured key has the token's kid")
            for key in keys[:-1]:
                try:
                    return self._claims(token, key.key)
                except jwt.InvalidSignatureError:
                    continue
            return self._claims(token, keys[-1].key)
        except jwt.InvalidSignatureError:
            if source is not None:
                self._maybe_not_read_yet(source, header)
            raise

    def _maybe_not_read_yet(self, source: KeySetSource, header: dict[str, Any]) -> None:
        """A 503 to retry rather than a 401 (a client signs in again on a 401) when the key
        may just not be read yet: no set read so far, or a `kid` the provider may have added
        since the last read (which starts a read)."""
        if not self.ready:
            raise Unavailable(
                "the identity provider's signing keys are not read yet",
                headers={"Retry-After": str(int(RETRY_UNLOADED_SECONDS))},
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or source.knows(kid):
            return
        wait = source.wait_for(kid)
        if wait is not None:
            raise Unavailable(
                "the token's signing key is being read from the identity provider",
                headers={"Retry-After": str(math.ceil(wait))},
            )

    def _claims(self, token: str, key: Any) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=self._algorithms,
            audience=self._audience,
            issuer=self._issuer,
            leeway=LEEWAY_SECONDS,
            # `aud` checked also without an audience of ours: a token that names one is for
            # that service and refused here (RFC 7519 4.1.3, RFC 8725 3.9), as PyJWT does by
            # default.
            options={"require": ["exp", "sub"]},
        )
        return claims


# A JSON string may hold a lone UTF-16 surrogate ("\ud83d": RFC 8259 8.2), and a JavaScript
# auth server that cuts a display name at n UTF-16 units signs one. PyJWT reads it with the
# stdlib json, which keeps it; nothing can encode it to UTF-8, so the first send of such a
# token was a 500 (a socket's, a 1011 close). The name is only shown (the user is `sub`): it
# is repaired (services/core/lone_surrogates.py) and its owner can still send.


_TIME_CLAIMS = ("exp", "nbf", "iat")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
    variable = (
        "ORCHESTRATOR_JWT_PRIVATE_KEY" if settings.uses_public_key else "ORCHESTRATOR_JWT_SECRET"
    )
    prepared = usable_key(settings.jwt_algorithm, key, variable, signing=True)
    try:
        return jwt.encode(claims, prepared, algorithm=settings.jwt_algorithm)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise ConfigError(f"{variable}: not a usable {settings.jwt_algorithm} key") from None
