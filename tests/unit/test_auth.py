"""Client tokens: HS256 with a secret, RS256/ES256 with a public key; every failure is 401."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.core.auth import TokenVerifier, issue_token, usable_key
from services.core.errors import Unauthorized
from services.core.settings import ConfigError, load_settings
from tests.unit.test_auth_keys import pems


def pem_pair(algorithm: str) -> tuple[str, str]:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm.startswith("RS"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    return pems(key)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_asymmetric_tokens_verify_with_the_public_key_only(algorithm: str) -> None:
    private, public = pem_pair(algorithm)
    signer = load_settings(jwt_algorithm=algorithm, jwt_private_key=private)
    token = issue_token(signer, tenant_id="acme", user_id="ada", ttl_seconds=60)
    verifier = TokenVerifier(load_settings(jwt_algorithm=algorithm, jwt_public_key=public))
    principal = verifier.verify(token)
    assert (principal.tenant_id, principal.user_id) == ("acme", "ada")
    _, other_public = pem_pair(algorithm)
    stranger = TokenVerifier(load_settings(jwt_algorithm=algorithm, jwt_public_key=other_public))
    with pytest.raises(Unauthorized):
        stranger.verify(token)


def test_audience_and_issuer_are_checked_when_configured() -> None:
    settings = load_settings(jwt_secret="s" * 32, jwt_audience="chat", jwt_issuer="idp")
    verifier = TokenVerifier(settings)
    good = issue_token(settings, tenant_id="acme", user_id="u", ttl_seconds=60)
    assert verifier.verify(good).tenant_id == "acme"
    wrong_audience = jwt.encode(
        {"sub": "u", "tenant_id": "acme", "exp": time.time() + 60, "aud": "other", "iss": "idp"},
        "s" * 32,
        algorithm="HS256",
    )
    with pytest.raises(Unauthorized):
        verifier.verify(wrong_audience)


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "u", "exp": 2**40},  # no tenant
        {"sub": "u", "tenant_id": "bad tenant", "exp": 2**40},
        {"tenant_id": "acme", "exp": 2**40},  # no subject
        {"sub": "u", "tenant_id": "acme"},  # no expiry
        {"sub": "u", "tenant_id": "acme", "exp": 10**400},  # beyond a float: was a 500
    ],
)
def test_tokens_without_the_required_claims_are_refused(claims: dict[str, object]) -> None:
    verifier = TokenVerifier(load_settings(jwt_secret="k" * 32))
    with pytest.raises(Unauthorized):
        verifier.verify(jwt.encode(claims, "k" * 32, algorithm="HS256"))


def test_the_none_algorithm_is_never_accepted() -> None:
    verifier = TokenVerifier(load_settings(jwt_secret="k" * 32))
    unsigned = jwt.encode({"sub": "u", "tenant_id": "a", "exp": 2**40}, None, algorithm="none")
    with pytest.raises(Unauthorized):
        verifier.verify(unsigned)


def test_a_public_key_algorithm_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PUBLIC_KEY"):
        TokenVerifier(load_settings(jwt_algorithm="RS256"))


def test_a_key_that_cannot_be_read_is_a_config_error_at_start() -> None:
    """Found on the first request, it made every authenticated request a 500."""
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PUBLIC_KEY: not a usable RS256"):
        TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key="not-a-pem-key"))
    _, public = pem_pair("RS256")
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_SECRET: not a usable HS256") as bad:
        TokenVerifier(load_settings(jwt_secret=public))  # a PEM given as the HMAC secret
    assert "BEGIN" not in str(bad.value)  # the message never quotes the key


def test_a_verified_token_is_remembered_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from services.core import auth

    settings = load_settings(jwt_secret="k" * 32)
    verifier = TokenVerifier(settings)
    token = issue_token(settings, tenant_id="acme", user_id="ada", ttl_seconds=60)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    first = verifier.verify(token)
    decoded: list[str] = []
    real_decode = jwt.decode
    monkeypatch.setattr(
        auth.jwt,
        "decode",
        lambda token, *a, **k: decoded.append(token) or real_decode(token, *a, **k),
    )
    assert verifier.verify(token) == first  # from the cache: not decoded again
    assert decoded == []
    # Past `exp` plus the leeway the check allows, the remembered token is refused as expired.
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: exp + auth.LEEWAY_SECONDS - 1))
    assert verifier.verify(token) == first
    monkeypatch.setattr(auth, "time", SimpleNamespace(time=lambda: exp + auth.LEEWAY_SECONDS))
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(token)
    assert decoded == []


def test_failures_are_not_remembered_and_the_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.core import auth

    monkeypatch.setattr(auth, "VERIFIED_CACHE_SIZE", 3)
    settings = load_settings(jwt_secret="k" * 32)
    verifier = TokenVerifier(settings)
    forged = jwt.encode({"sub": "u", "tenant_id": "acme", "exp": 2**40}, "x" * 32, "HS256")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verifier.verify(forged)
    tokens = [
        issue_token(settings, tenant_id="acme", user_id=f"u{n}", ttl_seconds=60) for n in range(5)
    ]
    for token in tokens:
        assert verifier.verify(token).user_id.startswith("u")
    assert list(verifier._verified) == tokens[-3:]


def test_a_token_for_an_audience_is_refused_when_none_is_configured() -> None:
    """A token naming an audience was issued for that service: without one of ours configured
    it was accepted all the same (verify_aud off), a token reused across services (RFC 8725
    3.9). RFC 7519 4.1.3: rejected."""
    verifier = TokenVerifier(load_settings(jwt_secret="s" * 32))
    claims = {"sub": "u", "tenant_id": "acme", "exp": time.time() + 60}
    plain = jwt.encode(claims, "s" * 32, algorithm="HS256")
    for_billing = jwt.encode({**claims, "aud": "billing-service"}, "s" * 32, algorithm="HS256")
    assert verifier.verify(plain).tenant_id == "acme"
    with pytest.raises(Unauthorized):
        verifier.verify(for_billing)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_a_time_claim_that_is_not_a_number_is_refused(claim: str) -> None:
    """PyJWT took `exp: "1795787520"` (a string) for a date; RFC 7519's NumericDate is a JSON
    number."""
    verifier = TokenVerifier(load_settings(jwt_secret="s" * 32))
    now = int(time.time())
    claims: dict[str, object] = {"sub": "u", "tenant_id": "acme", "exp": now + 60, "iat": now}
    claims[claim] = str(now + 60 if claim == "exp" else now - 10)
    with pytest.raises(Unauthorized, match=f"{claim} must be a number"):
        verifier.verify(jwt.encode(claims, "s" * 32, algorithm="HS256"))


def test_a_key_of_the_wrong_type_is_named_in_words_at_start() -> None:
    """An RSA key for ES256 stopped the process with PyJWT's words: "Expected one of
    <generator object ...>". It says what ES256 needs now."""
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    text = pem.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(ConfigError) as refused:
        usable_key("ES256", text, "ORCHESTRATOR_JWT_PUBLIC_KEY", signing=False)
    assert str(refused.value) == (
        "ORCHESTRATOR_JWT_PUBLIC_KEY: not a usable ES256 key (a PEM EC key on P-256)"
    )


def test_a_secret_ending_with_a_line_break_is_named_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A secret mounted from a file written with `echo` ends with a newline, which is part of
    the key: the issuer signs with the text without it, and every token was refused as
    `invalid_token` with nothing in the api's log saying why. The start now says which
    variable ends so (never the secret itself), and the key is still used as given."""
    secret = "k" * 32
    verifier = TokenVerifier(load_settings(jwt_secret=secret + "\n"))
    warned = [r.getMessage() for r in caplog.records if "line break" in r.getMessage()]
    assert len(warned) == 1
    assert "ORCHESTRATOR_JWT_SECRET" in warned[0]
    assert secret not in caplog.text
    claims = {"sub": "u", "tenant_id": "t", "exp": 2**40}
    with pytest.raises(Unauthorized):
        verifier.verify(jwt.encode(claims, secret, algorithm="HS256"))
    assert verifier.verify(jwt.encode(claims, secret + "\n", algorithm="HS256"))
    caplog.clear()
    TokenVerifier(load_settings(jwt_secret=secret))
    assert "line break" not in caplog.text
