"""The configured verification keys (services/core/jwt_keys.py, ORCHESTRATOR_JWT_PUBLIC_KEY)
as an operator writes them during a rotation: PEM bundles and the tokens they verify."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.core.auth import TokenVerifier
from services.core.errors import Unauthorized
from services.core.jwt_keys import VerificationKey, verification_keys
from services.core.settings import ConfigError, load_settings


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> str:
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public.decode()


def claims() -> dict[str, Any]:
    return {"sub": "u1", "tenant_id": "t1", "exp": int(time.time()) + 600}


@pytest.mark.parametrize(
    "damage",
    [
        ("-----END PUBLIC KEY-----", "-----END PUBLIC KEY----"),  # a dash lost in a paste
        ("-----BEGIN PUBLIC KEY-----", "-----BEGIN PUBLIC KEY---- "),
        ("-----END PUBLIC KEY-----", "-----END RSA PUBLIC KEY-----"),  # footer of another type
    ],
    ids=["footer-dash", "header-space", "footer-type"],
)
def test_a_bundle_with_a_damaged_key_block_is_refused_at_start(damage: tuple[str, str]) -> None:
    """An operator adds the new key to the bundle before the issuer signs with it; its block
    is damaged in the paste. The api starts with the old key alone and says nothing (text
    outside a well-formed block is skipped, and the damaged block is not one), so at the
    issuer's switch every new token is a 401 and every client is signed out. Expected: a
    ConfigError at start, as for a block that is well formed but not a usable key."""
    old, new = new_key(), new_key()
    damaged = pem(new).replace(*damage)
    settings = load_settings(jwt_algorithm="RS256", jwt_public_key=pem(old) + damaged)
    keys: list[VerificationKey] | str
    try:
        keys = verification_keys(settings)
    except ConfigError as refused:
        keys = str(refused)
    if isinstance(keys, str):
        assert "ORCHESTRATOR_JWT_PUBLIC_KEY" in keys, keys
        return
    verifier = TokenVerifier(settings)
    with pytest.raises(Unauthorized):  # what the issuer's switch brings
        verifier.verify(jwt.encode(claims(), new, algorithm="RS256"))
    pytest.fail(f"started with {len(keys)} of the 2 keys, the damaged one silently left out")


def test_a_bundle_with_crlf_line_ends_and_notes_between_keys_verifies_with_each() -> None:
    """Guard: a bundle written on Windows (CRLF) with a comment line before each key (as
    `openssl` and key stores print them) verifies tokens of each of its keys."""
    old, new = new_key(), new_key()
    bundle = "old key:\r\n" + pem(old).replace("\n", "\r\n") + "new key:\r\n"
    bundle += pem(new).replace("\n", "\r\n")
    verifier = TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=bundle))
    for key in (old, new):
        assert verifier.verify(jwt.encode(claims(), key, algorithm="RS256")).user_id == "u1"


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@pytest.mark.parametrize("alg", ["HS256", "none"])
def test_key_confusion_tokens_are_refused_by_an_rs256_bundle(alg: str) -> None:
    """Guard: the classic attacks on a public-key set, an HS256 token whose HMAC key is the
    public key's PEM text and an unsigned `alg: none` token, are 401s (the verifier allows
    the configured algorithm only)."""
    key = new_key()
    verifier = TokenVerifier(load_settings(jwt_algorithm="RS256", jwt_public_key=pem(key)))
    head = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims()).encode())
    signature = b""
    if alg == "HS256":
        signature = _b64(hmac.new(pem(key).encode(), head + b"." + body, hashlib.sha256).digest())
    with pytest.raises(Unauthorized):
        verifier.verify((head + b"." + body + b"." + signature).decode())
