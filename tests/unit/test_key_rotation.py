"""Rotating the token keys without breaking clients: tokens signed with any configured key
verify (several PEM keys, an identity provider's JSON Web Key Set picked by `kid`, the
previous HS secret), and an unfit key in the set still stops the process at start."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.core.auth import TokenVerifier
from services.core.errors import Unauthorized
from services.core.jwt_keys import MAX_KEYS
from services.core.settings import ConfigError, load_settings
from tests.unit.test_auth_keys import pems

CLAIMS = {"sub": "u1", "tenant_id": "acme"}


def signed(key: Any, algorithm: str, **header: str) -> str:
    claims = {**CLAIMS, "exp": int(time.time()) + 60}
    return jwt.encode(claims, key, algorithm=algorithm, headers=header or None)


def jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, **fields: str) -> dict[str, Any]:
    """The public half of `key` as a JWK, with `fields` (kid, use, alg) added."""
    algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    document = json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(key.public_key()))
    return {**document, **fields}


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


def test_tokens_of_every_key_in_a_pem_bundle_verify(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    """During a rotation the issuer's old and new public keys are both configured: a token
    of either verifies, one of a third key does not (the bundle held only the first key
    before: the old key's tokens failed the moment the new one was added)."""
    old, new, stranger = rsa_keys
    bundle = pems(old)[1] + pems(new)[1]
    verifier = TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=bundle))
    for key in (old, new):
        assert verifier.verify(signed(key, "RS256")).user_id == "u1"
    with pytest.raises(Unauthorized, match="invalid token"):
        verifier.verify(signed(stranger, "RS256"))


def test_an_unfit_key_anywhere_in_a_bundle_stops_the_start(
    rsa_keys: list[rsa.RSAPrivateKey],
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    bundle = pems(rsa_keys[0])[1] + pems(weak)[1]
    with pytest.raises(ConfigError, match=r"JWT_PUBLIC_KEY \(key 2 of 2\): a 1024-bit RSA key"):
        TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=bundle))
    private = pems(rsa_keys[1])[0]  # the issuer's secret half pasted by mistake
    with pytest.raises(ConfigError, match=r"\(key 2 of 2\): a private key"):
        TokenVerifier(
            load_settings(jwt_algorithm="RS256", jwt_public_key=pems(rsa_keys[0])[1] + private)
        )


def test_a_key_set_picks_the_key_by_kid(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    """An identity provider's JWKS document as the key: the token's `kid` names its key."""
    old, new, _ = rsa_keys
    document = {"keys": [jwk(old, kid="2026-10"), jwk(new, kid="2026-11", use="sig")]}
    verifier = TokenVerifier(
        load_settings(jwt_algorithm="RS256", jwt_public_key=json.dumps(document))
    )
    assert verifier.verify(signed(new, "RS256", kid="2026-11")).tenant_id == "acme"
    assert verifier.verify(signed(old, "RS256", kid="2026-10")).tenant_id == "acme"
    assert verifier.verify(signed(old, "RS256")).tenant_id == "acme"  # no kid: each is tried
    with pytest.raises(Unauthorized, match="no configured key has the token's kid"):
        verifier.verify(signed(new, "RS256", kid="2027-01"))
    with pytest.raises(Unauthorized, match="invalid token"):  # the kid of another key
        verifier.verify(signed(old, "RS256", kid="2026-11"))


def test_a_key_set_leaves_out_keys_for_other_uses(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    """A provider's set also holds encryption keys and keys of other algorithms: not errors,
    not candidates; a set with none for our algorithm is."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    document = {
        "keys": [
            jwk(rsa_keys[0], kid="enc", use="enc"),
            jwk(rsa_keys[1], kid="ps", alg="PS256"),
            jwk(ec_key, kid="ec"),
            jwk(rsa_keys[2], kid="mine", alg="RS256"),
        ]
    }
    verifier = TokenVerifier(
        load_settings(jwt_algorithm="RS256", jwt_public_key=json.dumps(document))
    )
    assert verifier.verify(signed(rsa_keys[2], "RS256", kid="mine")).user_id == "u1"
    with pytest.raises(Unauthorized):
        verifier.verify(signed(rsa_keys[0], "RS256", kid="enc"))
    only_ec = json.dumps({"keys": [jwk(ec_key, kid="ec")]})
    with pytest.raises(ConfigError, match="holds no RS256 signing key"):
        TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=only_ec))
    signing_ec = TokenVerifier(load_settings(jwt_algorithm="ES256", jwt_public_key=only_ec))
    assert signing_ec.verify(signed(ec_key, "ES256", kid="ec")).user_id == "u1"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "not a JSON Web Key Set"),
        ('{"keys": "x"}', '"keys" list of objects'),
        ('{"keys": [{"kty": "RSA", "n": "AQAB"}]}', r"\(key #1\): not a usable RS256 key"),
    ],
)
def test_a_broken_key_set_is_named_at_start(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=text))


def test_the_number_of_keys_is_bounded(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    """Each key is one signature check for a token none verifies."""
    many = json.dumps({"keys": [jwk(rsa_keys[0], kid=str(i)) for i in range(MAX_KEYS + 1)]})
    with pytest.raises(ConfigError, match=f"at most {MAX_KEYS}"):
        TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=many))


def test_the_previous_secret_verifies_until_it_is_removed() -> None:
    current, previous = "c" * 32, "p" * 32
    rotating = TokenVerifier(load_settings(jwt_secret=current, jwt_previous_secret=previous))
    for secret in (current, previous):
        assert rotating.verify(signed(secret, "HS256")).user_id == "u1"
    done = TokenVerifier(load_settings(jwt_secret=current))
    with pytest.raises(Unauthorized, match="Signature verification failed"):
        done.verify(signed(previous, "HS256"))
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_PREVIOUS_SECRET: too short"):
        TokenVerifier(load_settings(jwt_secret=current, jwt_previous_secret="short"))


def test_claims_are_judged_by_the_key_that_verifies(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    """An expired token of the second key is "expired", not a signature failure of the first."""
    old, new, _ = rsa_keys
    bundle = pems(old)[1] + pems(new)[1]
    verifier = TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=bundle))
    stale = jwt.encode({**CLAIMS, "exp": int(time.time()) - 3600}, new, algorithm="RS256")
    with pytest.raises(Unauthorized, match="token expired"):
        verifier.verify(stale)


def test_a_jwks_url_needs_a_public_key_algorithm_and_a_web_address() -> None:
    with pytest.raises(ConfigError, match="ORCHESTRATOR_JWT_JWKS_URL: a key set holds public"):
        TokenVerifier(load_settings(jwt_secret="s" * 32, jwt_jwks_url="https://idp.example/k"))
    with pytest.raises(ConfigError, match="JWKS_URL: must start with https://"):
        load_settings(jwt_algorithm="RS256", jwt_jwks_url="file:///etc/passwd")
    with pytest.raises(ConfigError, match="or ORCHESTRATOR_JWT_JWKS_URL"):
        TokenVerifier(load_settings(jwt_algorithm="RS256"))
    unread = TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_jwks_url="https://idp/k"))
    assert not unread.ready  # nothing verifies until the provider's set is read
