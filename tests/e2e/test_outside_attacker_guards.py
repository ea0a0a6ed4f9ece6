"""Guards (passing): attacks from outside that no other test tries.

- hand-made JWTs: non-finite time claims (`Infinity`/`NaN`, which Python's json reads), a `kid`
  that is not a string, an unknown `crit` extension, a header nested past the JSON decoder's stack
  (no signature needed), HS256 signed with the RS public key (algorithm confusion);
- raw WebSocket frames: invalid UTF-8, a continuation with no message, an uncompressed message
  fragmented past the size bound, a binary frame.
Each must be a clean refusal (401 / close 1008 / the documented close code), never a 500 or a
token accepted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.cli.embedded import RedisServer
from services.cli.stack import Child
from services.core.auth import TokenVerifier
from services.core.errors import Unauthorized
from services.core.settings import load_settings
from tests.e2e.clients import SECRET, token
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    redis = RedisServer().start()
    try:
        with lone_api(redis, tmp_path_factory.mktemp("logs")) as child:
            yield child
    finally:
        redis.cleanup()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(
    payload: str, header: dict[str, object] | None = None, key: bytes = SECRET.encode()
) -> str:
    """A token whose payload is this exact JSON text, HMAC-signed with `key`."""
    head = _b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(payload.encode())
    mac = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


LATER = int(time.time()) + 3600
HOSTILE = {
    "exp Infinity": signed('{"sub":"u","tenant_id":"ta","exp":Infinity}'),
    "exp NaN": signed('{"sub":"u","tenant_id":"ta","exp":NaN}'),
    "exp 1e400": signed('{"sub":"u","tenant_id":"ta","exp":1e400}'),
    "iat -Infinity": signed(f'{{"sub":"u","tenant_id":"ta","exp":{LATER},"iat":-Infinity}}'),
    "nbf NaN": signed(f'{{"sub":"u","tenant_id":"ta","exp":{LATER},"nbf":NaN}}'),
    "tenant with a colon": signed(f'{{"sub":"u","tenant_id":"ta:x","exp":{LATER}}}'),
    "tenant with a brace": signed(f'{{"sub":"u","tenant_id":"{{ta}}","exp":{LATER}}}'),
    "kid not a string": signed(
        f'{{"sub":"u","tenant_id":"ta","exp":{LATER}}}', {"alg": "HS256", "kid": {"a": 1}}
    ),
    "unknown crit": signed(
        f'{{"sub":"u","tenant_id":"ta","exp":{LATER}}}', {"alg": "HS256", "crit": ["x" * 300]}
    ),
    "alg none": signed(f'{{"sub":"u","tenant_id":"ta","exp":{LATER}}}', {"alg": "none"}).rsplit(
        ".", 1
    )[0]
    + ".",
    "header nested past the stack": _b64(b"[" * 20000) + "." + _b64(b"{}") + ".x",
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_tokens_are_a_401_and_a_1008_never_a_500(api: Child, name: str) -> None:
    """Expected: 401 `unauthorized` on REST and close 1008 on a socket for every one."""
    hostile = HOSTILE[name]
    async with httpx.AsyncClient(base_url=api.url) as http:
        reply = await http.get("/ws/stats", headers={"Authorization": f"Bearer {hostile}"})
    assert reply.status_code == 401, reply.text
    assert reply.json()["error"]["code"] == "unauthorized"
    async with websockets.connect(
        f"{api.ws_url}/ws/ta/s1",
        subprotocols=["orchestrator.v1", f"bearer.{hostile}"],  # type: ignore[list-item]
        open_timeout=5,
    ) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008


def test_hs256_signed_with_the_rs256_public_key_is_refused() -> None:
    """Algorithm confusion: with RS256 configured, a token HMAC-signed with the public key's
    PEM text (which an attacker can read) must not verify."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verifier = TokenVerifier(
        load_settings(jwt_algorithm="RS256", jwt_public_key=public_pem.decode())
    )
    forged = signed(f'{{"sub":"u","tenant_id":"ta","exp":{LATER}}}', key=public_pem)
    with pytest.raises(Unauthorized):
        verifier.verify(forged)


# Raw WebSocket frames (what `websockets` refuses to send).


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _frames_after(api: Child, data: bytes) -> list[tuple[int, bytes]]:
    """Open a socket (token in the query), send `data`, return the frames until close/quiet."""
    assert api.port is not None
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as conn:
        handshake = (
            f"GET /ws/ta/s-raw?token={token('ta')} HTTP/1.1\r\nHost: api\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        conn.sendall(handshake.encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += conn.recv(4096)
        head, received = received.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        conn.sendall(data)
        conn.settimeout(3)
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    frames, at = [], 0
    while at + 2 <= len(received):
        opcode, size = received[at] & 0x0F, received[at + 1] & 0x7F
        at += 2
        if size == 126:
            size, at = struct.unpack(">H", received[at : at + 2])[0], at + 2
        elif size == 127:
            size, at = struct.unpack(">Q", received[at : at + 8])[0], at + 8
        frames.append((opcode, received[at : at + size]))
        at += size
    return [(op, p) for op, p in frames if not (op == 1 and b'"connection.ack"' in p)]


def _close_code(frames: list[tuple[int, bytes]]) -> int | None:
    return next((struct.unpack(">H", p[:2])[0] for op, p in frames if op == 8), None)


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("invalid UTF-8 text", _frame(1, b'{"type":"ping","x":"\xff\xfe"}'), 1007),
        ("continuation with no message", _frame(0, b"abc"), 1002),
        (
            "uncompressed message fragmented past 2x MAX_FRAME_BYTES",
            b"".join(_frame(1 if i == 0 else 0, b"a" * 65536, fin=False) for i in range(17))
            + _frame(0, b"a"),
            1009,
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",  # frames hold random masks
)
def test_broken_frames_close_with_their_code(api: Child, name: str, data: bytes, code: int) -> None:
    """A frame that breaks the protocol closes the socket with RFC 6455's code for it; a
    message assembled from fragments is bounded like one frame (no unbounded buffer)."""
    assert _close_code(_frames_after(api, data)) == code, name


def test_a_binary_frame_gets_an_error_event_and_the_socket_stays(api: Child) -> None:
    frames = _frames_after(api, _frame(2, b'{"type":"ping"}') + _frame(1, b'{"type":"ping"}'))
    types = [json.loads(p)["type"] for op, p in frames if op == 1]
    assert types[:2] == ["error", "pong"], frames
