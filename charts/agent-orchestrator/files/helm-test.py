# The `helm test` check (templates/tests/test-connection.yaml), run with the api image's Python.
# API_URL: the api Service. With ORCHESTRATOR_JWT_SECRET it signs a token (`orchestrator token`)
# and expects connection.ack; without (RS*/ES*: no private key here) a completed handshake
# is enough.
import asyncio
import json
import os
import subprocess
import sys
import urllib.request

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

api = os.environ["API_URL"].rstrip("/")
with urllib.request.urlopen(api + "/health/ready", timeout=10) as response:
    if response.status != 200:
        sys.exit(f"/health/ready answered {response.status}")
print("ready: /health/ready answered 200")

protocols = ["orchestrator.v1"]
if os.environ.get("ORCHESTRATOR_JWT_SECRET"):
    token = subprocess.run(
        ["orchestrator", "token", "--tenant", "helm-test", "--user", "helm-test", "--ttl", "120"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    protocols.append("bearer." + token)


async def handshake():
    url = "ws" + api.removeprefix("http") + "/ws/helm-test/helm-test-session"
    async with connect(url, subprotocols=protocols, open_timeout=10) as socket:
        print("websocket: handshake completed, subprotocol", socket.subprotocol)
        try:
            frame = json.loads(await asyncio.wait_for(socket.recv(), 10))
        except ConnectionClosed as closed:
            if len(protocols) > 1:
                sys.exit(f"socket closed before connection.ack: {closed}")
            print("websocket: closed without a token, as expected:", closed)
            return
        if frame.get("type") != "connection.ack":
            sys.exit(f"expected connection.ack, got {frame}")
        print("websocket: connection.ack received")


asyncio.run(handshake())
