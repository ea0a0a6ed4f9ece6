"""The paged resume (`read_since` + `read_page`, a MULTI of XINFO + XRANGE on the session's
node) on a real 3-master Redis Cluster while the session's slot moves (found by the review of
this session's changes on a cluster).

A slot *half* migrated (the log key already MIGRATEd, the slot not yet handed over, as during
every `valkey-cli --cluster reshard`): the source answers ASK, redis-py's cluster transaction
follows it without ASKING, the target answers MOVED back, and the read raised `MovedError`:
the socket was closed 1011 "internal error". It is an outage to ride through now: 1013 "try
again", and once the slot is handed over the same resume is served whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import websockets
from redis import Redis as SyncRedis
from redis.crc import key_slot

from services.api.session_log import read_page, read_since
from services.cli.embedded import LocalCluster, RedisServer
from services.cli.stack import Child
from services.core import keys
from services.core.events import event_body
from services.core.redis_client import REDIS_DOWN
from tests.e2e.clients import token, unique
from tests.e2e.conftest import redis_client
from tests.e2e.test_cluster_health import cluster_api

pytestmark = pytest.mark.e2e

__all__ = ["cluster_api"]  # the fixture used here

PAGE = 100
EVENTS = 3 * PAGE + 20


async def _fill(
    cluster: LocalCluster, tenant: str, session: str, events: int = EVENTS
) -> list[str]:
    redis = redis_client(cluster)
    try:
        ids = []
        for n in range(events):
            body = event_body("chat.chunk", {"delta": str(n), "seq": n}, "t1")
            ids.append((await redis.xadd(keys.session_log(tenant, session), {"e": body})).decode())
        return ids
    finally:
        await redis.aclose()


def _other_primary(cluster: LocalCluster, port: int) -> RedisServer:
    return next(
        cluster.node_of_slot(s)
        for s in (0, 6000, 12000, 16383)
        if cluster.node_of_slot(s).port != port
    )


@contextmanager
def _half_migrated(cluster: LocalCluster, key: str) -> Iterator[None]:
    """`key` MIGRATEd to another primary, its slot still MIGRATING/IMPORTING; handed over
    (SETSLOT NODE everywhere) on the way out."""
    slot = key_slot(key.encode())
    source = cluster.node_of_slot(slot)
    target = _other_primary(cluster, source.port)
    src, dst = SyncRedis(port=source.port), SyncRedis(port=target.port)
    source_id, target_id = (
        src.execute_command("CLUSTER", "MYID"),
        dst.execute_command("CLUSTER", "MYID"),
    )
    try:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", key)
        yield
    finally:
        for node in (target, source, *cluster.nodes):
            admin = SyncRedis(port=node.port)
            admin.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            admin.close()
        src.close()
        dst.close()
        cluster.wait_ready()


async def test_a_page_read_while_its_slot_is_half_migrated_is_an_outage_then_whole(
    redis_cluster: LocalCluster,
) -> None:
    tenant, session = unique("t"), unique("s")
    ids = await _fill(redis_cluster, tenant, session)
    redis = redis_client(redis_cluster)
    try:
        first = await read_since(redis, tenant, session, "0-0", page=PAGE)
        got = [event_id for event_id, _ in first.events]
        with (
            _half_migrated(redis_cluster, keys.session_log(tenant, session)),
            pytest.raises(REDIS_DOWN),
        ):
            await read_page(redis, tenant, session, got[-1], page=PAGE)
        page = await read_page(redis, tenant, session, got[-1], page=PAGE)
        assert not page.gap, page
        assert [event_id for event_id, _ in page.events] == ids[PAGE : 2 * PAGE]
    finally:
        await redis.aclose()


async def _until_closed(ws: websockets.ClientConnection) -> None:
    while True:
        await ws.recv()


async def test_a_resume_while_the_sessions_slot_is_half_migrated_is_told_to_try_again(
    redis_cluster: LocalCluster, cluster_api: Child
) -> None:
    tenant, session = unique("t"), unique("s")
    ids = await _fill(redis_cluster, tenant, session, events=20)
    url = f"{cluster_api.ws_url}/ws/{tenant}/{session}?last_event_id=0-0"
    protocols = ["orchestrator.v1", f"bearer.{token(tenant)}"]
    with _half_migrated(redis_cluster, keys.session_log(tenant, session)):
        async with websockets.connect(url, subprotocols=protocols, open_timeout=10) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await _until_closed(ws)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1013, closed.value.rcvd  # try again: not 1011
    # Once the slot is handed over, the same resume is served whole (the api resubscribes
    # the session's channel on its new node first: until then it says "try again" too).
    deadline = time.monotonic() + 30
    refused: list[int | None] = []
    frames: list[dict[str, object]] = []
    while not frames and time.monotonic() < deadline:
        async with websockets.connect(url, subprotocols=protocols, open_timeout=10) as ws:
            try:
                frames = [json.loads(await ws.recv()) for _ in range(1 + len(ids))]
            except websockets.ConnectionClosed as again:
                refused.append(again.rcvd.code if again.rcvd else None)
    assert set(refused) <= {1013}, refused
    assert frames, f"the resume was never served: {refused}"
    assert frames[0]["type"] == "connection.ack", frames[0]
    assert [frame["id"] for frame in frames[1:]] == ids
