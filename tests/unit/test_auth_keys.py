"""Weak or misplaced JWT keys are configuration errors at start (RFC 7518 §3.2-3.4), never a
forgeable secret nor a 500 on every request; the secrets the product itself makes still pass."""

from __future__ import annotations

import secrets
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.core.auth import TokenVerifier, issue_token
from services.core.settings import ConfigError, load_settings

AsymmetricKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def pems(key: AsymmetricKey) -> tuple[str, str]:
    """(private PEM, public PEM) of `key`."""
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


@pytest.fixture(scope="module")
def rsa_2048() -> tuple[str, str]:
    return pems(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.mark.parametrize(("algorithm", "least"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_a_secret_shorter_than_the_hash_is_refused(algorithm: str, least: int) -> None:
    for secret in ("#", "#" * (least - 1)):
        settings = load_settings(jwt_algorithm=algorithm, jwt_secret=secret)
        with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_SECRET: too short") as refused:
            TokenVerifier(settings)
        assert f"at least {least}" in str(refused.value)
        assert "#" not in str(refused.value)  # the secret is never quoted
        with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_SECRET: too short"):
            issue_token(settings, tenant_id="acme", user_id="u", ttl_seconds=60)
    TokenVerifier(load_settings(jwt_algorithm=algorithm, jwt_secret="s" * least))


def test_the_length_is_counted_in_bytes_not_characters() -> None:
    """RFC 7518 counts key bits: 16 two-byte characters are 32 bytes."""
    TokenVerifier(load_settings(jwt_secret="é" * 16))
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_SECRET"):
        TokenVerifier(load_settings(jwt_secret="é" * 15 + "e"))


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_the_secrets_the_product_and_its_suite_make_are_accepted(
    algorithm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.cli.dev import ensure_dev_secret
    from tests.e2e.clients import SECRET

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    made = [ensure_dev_secret()]  # `orchestrator dev`: 64 characters
    if algorithm == "HS256":
        made += [SECRET, "k" * 32]  # the e2e suite's (43 characters), the unit tests'
        # The chart's generated secret: `randAlphaNum 48` (HS512 needs 64: see the report).
        made.append("".join(secrets.choice("abcXYZ019") for _ in range(48)))
    for secret in made:
        settings = load_settings(jwt_algorithm=algorithm, jwt_secret=secret)
        token = issue_token(settings, tenant_id="acme", user_id="u", ttl_seconds=60)
        assert TokenVerifier(settings).verify(token).tenant_id == "acme"


def test_a_private_key_given_as_the_public_key_is_refused(rsa_2048: tuple[str, str]) -> None:
    """PyJWT reads it, then every request failed with AttributeError (no `verify`): a 500."""
    private, _ = rsa_2048
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PUBLIC_KEY: a private key") as bad:
        TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=private))
    assert "BEGIN" not in str(bad.value)
    ec_private, _ = pems(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PUBLIC_KEY: a private key"):
        TokenVerifier(load_settings(jwt_algorithm="ES256", jwt_public_key=ec_private))


def test_a_public_key_given_as_the_private_key_is_refused(rsa_2048: tuple[str, str]) -> None:
    """`orchestrator token` with it failed with AttributeError (no `sign`): a traceback."""
    _, public = rsa_2048
    signer = load_settings(jwt_algorithm="RS256", jwt_private_key=public)
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PRIVATE_KEY: a public key"):
        issue_token(signer, tenant_id="acme", user_id="u", ttl_seconds=60)


def test_an_rsa_key_under_2048_bits_is_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    private, public = pems(weak)
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PUBLIC_KEY: a 1024-bit RSA key"):
        TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=public))
    signer = load_settings(jwt_algorithm="RS256", jwt_private_key=private)
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PRIVATE_KEY: a 1024-bit RSA key"):
        issue_token(signer, tenant_id="acme", user_id="u", ttl_seconds=60)


@pytest.mark.parametrize("pyjwt_checks_curves", [True, False])
@pytest.mark.parametrize(
    ("algorithm", "curve"),
    [("ES256", ec.SECP384R1()), ("ES256", ec.SECP256K1()), ("ES384", ec.SECP256R1())],
)
def test_an_ec_key_on_another_curve_than_the_algorithms_is_refused(
    algorithm: str,
    curve: ec.EllipticCurve,
    pyjwt_checks_curves: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The installed PyJWT refuses it too; older ones that pyproject allows (>=2.10) do not."""
    if not pyjwt_checks_curves:
        checker = jwt.get_algorithm_by_name(algorithm)
        monkeypatch.setattr(checker, "expected_curve", None, raising=False)
    private, public = pems(ec.generate_private_key(curve))
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PUBLIC_KEY") as bad:
        TokenVerifier(load_settings(jwt_algorithm=algorithm, jwt_public_key=public))
    assert curve.name in str(bad.value)
    signer = load_settings(jwt_algorithm=algorithm, jwt_private_key=private)
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PRIVATE_KEY"):
        issue_token(signer, tenant_id="acme", user_id="u", ttl_seconds=60)


@pytest.mark.parametrize(
    ("algorithm", "curve"), [("ES256", ec.SECP256R1()), ("ES384", ec.SECP384R1())]
)
def test_an_ec_key_on_the_algorithms_curve_signs_and_verifies(
    algorithm: str, curve: ec.EllipticCurve
) -> None:
    private, public = pems(ec.generate_private_key(curve))
    signer = load_settings(jwt_algorithm=algorithm, jwt_private_key=private)
    token = issue_token(signer, tenant_id="acme", user_id="u", ttl_seconds=60)
    verifier = TokenVerifier(load_settings(jwt_algorithm=algorithm, jwt_public_key=public))
    assert verifier.verify(token).user_id == "u"
