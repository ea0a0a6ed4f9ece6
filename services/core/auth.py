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
from cryptography.hazmat.primitives.asymmetric import ec, rsa

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
        # Parsed and judged now, not on the first request: a key PyJWT cannot read, a private
        # key where the public one belongs (no `verify`: a 500 per request) or a weak one stops
        # the process at start.
        self._key: Any = usable_key(settings.jwt_algorithm, key, variable, signing=False)
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
                # `aud` checked also without an audience of ours: a token that names one is
                # for that service and refused here (RFC 7519 4.1.3, RFC 8725 3.9), as PyJWT
                # does by default.
                options={"require": ["exp", "sub"]},
            )
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
        if _lone_surrogate(sub):
            raise Unauthorized("invalid token: sub holds a lone UTF-16 surrogate, not Unicode")
        name = claims.get("name")
        try:
            expires = float(claims["exp"])
        except OverflowError:  # an integer beyond a float: signed by the key, still not valid
            raise Unauthorized("invalid token: exp out of range") from None
        principal = Principal(
            tenant_id,
            sub,
            _repaired(name) if isinstance(name, str) else None,
            valid_until=expires + LEEWAY_SECONDS,
        )
        return principal, expires


# A JSON string may hold a lone UTF-16 surrogate ("\ud83d": RFC 8259 8.2), and a JavaScript
# auth server that cuts a display name at n UTF-16 units signs one. PyJWT reads it with the
# stdlib json, which keeps it; nothing can encode it to UTF-8, so the first send of such a
# token was a 500 (a socket's, a 1011 close).
_SURROGATES = range(0xD800, 0xE000)


def _lone_surrogate(text: str) -> bool:
    """Whether `text` holds a surrogate code point (the stdlib json joins a valid pair)."""
    return not text.isascii() and any(ord(char) in _SURROGATES for char in text)


def _repaired(name: str) -> str:
    """The display name with each lone surrogate made U+FFFD, as a UTF-8 decoder does with a
    bad byte: a name is only shown (the user is `sub`), and its owner can still send."""
    if not _lone_surrogate(name):
        return name
    return "".join("\ufffd" if ord(char) in _SURROGATES else char for char in name)


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


# RFC 7518 §3.2: an HMAC key at least as long as the hash's output.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
# RFC 7518 §3.3: RSA keys of 2048 bits or more.
MIN_RSA_BITS = 2048
# RFC 7518 §3.4: each ES algorithm names its curve.
CURVE_OF = {"ES256": "secp256r1", "ES384": "secp384r1"}


def usable_key(algorithm: str, key: str, variable: str, *, signing: bool) -> Any:
    """`key` parsed for `algorithm`, or a ConfigError naming `variable` (never quoting the key).

    Checked here rather than left to PyJWT on use: PyJWT reads a private key given to verify (and
    then fails every request without a `verify`), and only warns about a short HMAC secret or RSA
    key, which lets tokens be forged; both are refused before the process serves anything.
    """
    try:
        prepared = jwt.get_algorithm_by_name(algorithm).prepare_key(key)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        # What the algorithm needs, in our words, then PyJWT's when they say more (a curve's
        # name); not when they name a generator object (a key of the wrong type), and never
        # another library's, which might quote the key.
        why = str(exc) if isinstance(exc, jwt.PyJWTError) else ""
        detail = f"; {why}" if why and "<generator" not in why else ""
        wanted = _wanted(algorithm)
        raise ConfigError(f"{variable}: not a usable {algorithm} key ({wanted}{detail})") from None
    problem = key_problem(algorithm, prepared, signing=signing)
    if problem:
        raise ConfigError(f"{variable}: {problem}")
    return prepared


def _wanted(algorithm: str) -> str:
    """What a key for `algorithm` is, in words an operator reads at start."""
    if algorithm.startswith("HS"):
        return "a shared secret string"
    if algorithm.startswith(("RS", "PS")):
        return "a PEM RSA key of 2048 bits or more"
    curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}.get(algorithm, "its curve")
    return f"a PEM EC key on {curve}"


def key_problem(algorithm: str, prepared: Any, *, signing: bool) -> str | None:
    """What makes a parsed key unfit for `algorithm` in this role, or None when it is fit."""
    if isinstance(prepared, bytes):
        return _secret_problem(algorithm, prepared)
    return _role_problem(algorithm, prepared, signing=signing) or _strength_problem(
        algorithm, prepared
    )


def _secret_problem(algorithm: str, secret: bytes) -> str | None:
    """A shorter HMAC secret can be brute-forced, and then anyone can forge any tenant's token."""
    least = MIN_SECRET_BYTES.get(algorithm, 0)
    if len(secret) >= least:
        return None
    return (
        f"too short for {algorithm}: {len(secret)} bytes, at least {least} needed "
        f"(RFC 7518 §3.2; `openssl rand -base64 {least}` makes one)"
    )


def _role_problem(algorithm: str, key: Any, *, signing: bool) -> str | None:
    """Signing needs the private half, verifying the public one: PyJWT reads either for both."""
    private = isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey))
    if signing and not private:
        return f"a public key; signing {algorithm} tokens needs the private key"
    if not signing and private:
        return (
            f"a private key; verifying {algorithm} tokens needs the public key "
            "(the private one signs tokens and belongs only to their issuer)"
        )
    return None


def _strength_problem(algorithm: str, key: Any) -> str | None:
    """An RSA key under 2048 bits, or an EC key on another curve than the algorithm's."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)) and key.key_size < MIN_RSA_BITS:
        return (
            f"a {key.key_size}-bit RSA key; {algorithm} needs at least {MIN_RSA_BITS} bits "
            "(RFC 7518 §3.3)"
        )
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        expected = CURVE_OF.get(algorithm, key.curve.name)
        if key.curve.name != expected:
            return f"a {key.curve.name} key; {algorithm} needs a {expected} key (RFC 7518 §3.4)"
    return None
