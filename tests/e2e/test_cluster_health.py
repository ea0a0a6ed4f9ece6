"""/health/detailed and the eviction-policy check on a real 3-master Redis Cluster.

Both looked at one node only: the write probe was one key (`{health}:probe:POD`, one slot,
one node) and `CONFIG GET maxmemory-policy` went to the client's default node, so a node of
the cluster refusing writes, or evicting, was invisible to the operator. One probe key per
primary now, and every primary's policy.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.crc import key_slot

from services.cli.embedded import LocalCluster, RedisServer
from services.cli.stack import Child
from services.core import keys
from tests.e2e.clients import send, unique
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster_api(
    redis_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    with lone_api(redis_cluster, tmp_path_factory.mktemp("logs")) as api:
        yield api


def _other_primary(cluster: LocalCluster, *avoid_slots: int) -> RedisServer:
    """A primary that serves none of these slots."""
    avoided = {cluster.node_of_slot(slot).port for slot in avoid_slots}
    for slot in (0, 6000, 12000, 16383):
        node = cluster.node_of_slot(slot)
        if node.port not in avoided:
            return node
    raise LookupError("every primary serves an avoided slot")


def _session_on(cluster: LocalCluster, node: RedisServer, tenant: str) -> str:
    while True:
        session = unique("s")
        if (
            cluster.node_of_slot(key_slot(keys.session_tag(tenant, session).encode())).port
            == node.port
        ):
            return session


async def test_health_detailed_sees_a_cluster_node_refusing_writes(
    redis_cluster: LocalCluster, cluster_api: Child
) -> None:
    """README: /health/detailed answers 503 `degraded`, redis `refusing_writes`, while Redis
    refuses writes. On a cluster, a primary other than the one of `{health}` refusing writes
    (NOREPLICAS: min-replicas-to-write unmet) makes sends to its sessions 503, and the probe
    still says redis "up", 200."""
    node = _other_primary(redis_cluster, key_slot(b"{health}"))
    admin = SyncRedis(port=node.port)
    tenant = unique("t")
    session = _session_on(redis_cluster, node, tenant)
    admin.config_set("min-replicas-to-write", 1)
    try:
        async with httpx.AsyncClient() as http:
            sent = await send(
                http, cluster_api.url, tenant, {"message": "hi", "session_id": session}
            )
            detailed = await http.get(f"{cluster_api.url}/health/detailed", timeout=10)
    finally:
        admin.config_set("min-replicas-to-write", 0)
        admin.close()
    # The outage is real: a send to a session of that node is refused.
    assert sent.status_code == 503, sent.text
    body = detailed.json()
    assert (detailed.status_code, body["status"]) == (503, "degraded"), body
    assert body["components"]["redis"]["status"] == "refusing_writes", body


async def test_health_detailed_sees_an_evicting_cluster_node(
    redis_cluster: LocalCluster, cluster_api: Child
) -> None:
    """README: an evicting `maxmemory-policy` silently deletes task states, leases, streams;
    /health/detailed shows the policy. On a cluster only the client's default node (here the
    primary of slot 0) is asked: another primary under `allkeys-lru` shows as `noeviction`."""
    node = _other_primary(redis_cluster, 0)
    admin = SyncRedis(port=node.port)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    try:
        async with httpx.AsyncClient() as http:
            detailed = await http.get(f"{cluster_api.url}/health/detailed", timeout=10)
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.close()
    redis_state = detailed.json()["components"]["redis"]
    assert redis_state["maxmemory_policy"] != "noeviction", redis_state
    assert "warning" in redis_state, redis_state
