"""The keys client tokens are signed and verified with, and the checks that each is fit.

Verification takes more than one key, so keys can be rotated.
A deployment verifying with a single key breaks every client the moment the key changes: the
tokens already handed out are signed with the old one, and an identity provider starts
signing with its new key before every pod has it. So the verifier takes a set: several PEM
public keys (a bundle), or the JSON Web Key Set an identity provider publishes (its
`jwks_uri` document), where a token's `kid` header picks the key; for a shared HS secret, the
previous secret beside the current one until the tokens signed with it have expired.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.core.settings import ConfigError, Settings

log = logging.getLogger(__name__)

MAX_KEYS = 16
"""A token that no key verifies costs one signature check per candidate key: bounded."""

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)

# What a JWK of each algorithm family is (RFC 7518 §6.1): a key of another type in a shared
# set is meant for something else and is left out, not an error.
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC"}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    key: Any  # as PyJWT's algorithm prepared it
    kid: str | None = None

    @property
    def identity(self) -> object:
        """What tells this key from another across two reads of a set (its id and numbers)."""
        numbers = getattr(self.key, "public_numbers", None)
        return (self.kid, numbers() if numbers is not None else self.key)


def verification_keys(settings: Settings) -> list[VerificationKey]:
    """Every key a token may be verified with, each checked as `usable_key` checks one; a
    ConfigError (naming the variable, never quoting a key) when one is unfit or none is set."""
    algorithm = settings.jwt_algorithm
    if settings.jwt_jwks_url and not settings.uses_public_key:
        raise ConfigError(
            f"ORCHESTRATOR_JWT_JWKS_URL: a key set holds public keys; {algorithm} verifies with "
            "a shared secret (set ORCHESTRATOR_JWT_ALGORITHM to the provider's RS* or ES*)"
        )
    if not settings.uses_public_key:
        secrets = [("ORCHESTRATOR_JWT_SECRET", settings.jwt_secret)]
        if settings.jwt_previous_secret:
            secrets.append(("ORCHESTRATOR_JWT_PREVIOUS_SECRET", settings.jwt_previous_secret))
        if not settings.jwt_secret:
            raise ConfigError(f"ORCHESTRATOR_JWT_SECRET: must be set for {algorithm} tokens")
        for variable, secret in secrets:
            if secret and secret != secret.rstrip("\r\n"):
                # Every byte is the key, as the issuer's library takes it too; but a secret
                # written with `echo` or mounted from a file usually ends so by accident, and
                # every token then fails as `invalid_token` with nothing saying why.
                log.warning(
                    "%s ends with a line break, which is part of the key: tokens signed "
                    "with the secret without it are refused",
                    variable,
                )
        return [
            VerificationKey(usable_key(algorithm, secret or "", variable, signing=False))
            for variable, secret in secrets
        ]
    variable = "ORCHESTRATOR_JWT_PUBLIC_KEY"
    text = (settings.jwt_public_key or "").strip()
    if not text:
        if settings.jwt_jwks_url:
            return []  # the provider's keys only, read by the api at start (jwks.py)
        raise ConfigError(
            f"{variable}: must be set for {algorithm} tokens (or ORCHESTRATOR_JWT_JWKS_URL)"
        )
    if text.startswith("{"):
        keys = key_set(algorithm, text, variable)
    else:
        blocks = [match.group(0) for match in _PEM_BLOCK.finditer(text)] or [text]
        if len(blocks) > 1 or blocks[0] != text:
            left = _PEM_BLOCK.sub("", text)
            if "-----BEGIN" in left or "-----END" in left:
                # A damaged block skipped would start the api without that key, and every
                # token of the issuer's new key would be refused when it switches to it.
                raise ConfigError(f"{variable}: a PEM block whose BEGIN and END lines do not pair")
        keys = []
        for index, block in enumerate(blocks):
            where = _nth(variable, index, len(blocks))
            keys.append(VerificationKey(usable_key(algorithm, block, where, signing=False)))
    if len(keys) > MAX_KEYS:
        raise ConfigError(f"{variable}: {len(keys)} keys, at most {MAX_KEYS} are accepted")
    return keys


def _nth(variable: str, index: int, count: int) -> str:
    return variable if count == 1 else f"{variable} (key {index + 1} of {count})"


def key_set(
    algorithm: str, text: str, variable: str, *, strict: bool = True
) -> list[VerificationKey]:
    """The keys of a JWK Set (RFC 7517 §5) or of a single JWK that `algorithm` verifies with.

    `strict` (a set in the configuration): an unfit key is a ConfigError, for whoever wrote
    it to fix. Not strict (a set read from the provider at run time): an unfit key is left
    out with a warning, so that one bad key the provider adds does not refuse every token."""
    try:
        document = json.loads(text)
    except ValueError:
        raise ConfigError(f"{variable}: not a JSON Web Key Set (not valid JSON)") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if entries is None and isinstance(document, dict) and "kty" in document:
        entries = [document]  # one key, as a JWK
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f'{variable}: a JSON Web Key Set needs a "keys" list of objects')
    keys: list[VerificationKey] = []
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        name = str(entry.get("kid") or f"#{index + 1}")
        if not _meant_for(entry, algorithm):
            skipped.append(name)
            continue
        where = f"{variable} (key {name})"
        problem: str | None = f"not a usable {algorithm} key"
        with contextlib.suppress(jwt.PyJWTError, ValueError, TypeError, KeyError):
            prepared = jwt.get_algorithm_by_name(algorithm).from_jwk(entry)
            problem = key_problem(algorithm, prepared, signing=False)
        if problem:
            if strict:
                raise ConfigError(f"{where}: {problem}")
            log.warning("%s: %s; left out", where, problem)
            continue
        kid = entry.get("kid")
        keys.append(VerificationKey(prepared, kid if isinstance(kid, str) else None))
    if not keys:
        raise ConfigError(f"{variable}: the key set holds no {algorithm} signing key")
    if skipped:
        log.info(
            "JWT key set: %d keys for %s, %d for other uses left out (%s)",
            len(keys),
            algorithm,
            len(skipped),
            ", ".join(skipped),
        )
    return keys


def _meant_for(entry: dict[str, Any], algorithm: str) -> bool:
    """Whether a JWK of a shared set is a signing key of `algorithm`'s type: an identity
    provider's set may also hold encryption keys and keys of other algorithms."""
    if entry.get("use", "sig") != "sig":
        return False
    if "alg" in entry and entry["alg"] != algorithm:
        return False
    if algorithm.startswith("ES") and "crv" in entry:
        curve = {"ES256": "P-256", "ES384": "P-384"}.get(algorithm)
        if entry["crv"] != curve:
            return False
    return entry.get("kty") == _KEY_TYPE.get(algorithm[:2])


def candidates(keys: list[VerificationKey], header: dict[str, Any]) -> list[VerificationKey]:
    """The keys worth trying for a token: the one its `kid` names when keys carry ids (an
    identity provider's set), otherwise (and keys without an id) every one, in order."""
    kid = header.get("kid")
    if not isinstance(kid, str) or not any(key.kid for key in keys):
        return keys
    return [key for key in keys if key.kid is None or key.kid == kid]


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
