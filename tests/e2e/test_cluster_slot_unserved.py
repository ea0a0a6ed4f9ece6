"""A real 3-master Redis Cluster with a slot no primary serves (`CLUSTER DELSLOTS` of the
`{aes}` slot: the state a reshard or `--cluster fix` gone wrong leaves, and that the client's
`require_full_coverage=False` is there to ride out).

redis-py's cluster client then raises a bare `KeyError` (its slot cache has no entry for the
slot, `NodesManager.get_node_from_slot`), which `ClusterClient.execute_command` neither maps
to a lost connection nor lets reach the REDIS_DOWN handler: /health/detailed and every send
answer 500 `internal_error` instead of 503 (`degraded` / `unavailable`).

Found by the review of session 16's changes on a cluster. Fixed: a slot-map `KeyError` is an
outage (SlotNotCoveredError), as is MOVED/ASK out of a transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.crc import key_slot

from services.cli.embedded import LocalCluster
from services.cli.stack import Child
from tests.e2e.clients import auth, unique
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api(own_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    with lone_api(own_cluster, tmp_path_factory.mktemp("logs")) as child:
        slot = key_slot(b"{aes}")
        for node in own_cluster.nodes:
            admin = SyncRedis(port=node.port)
            admin.execute_command("CLUSTER", "DELSLOTS", slot)
            admin.close()
        yield child


async def test_health_detailed_with_a_slot_without_a_primary_is_503_degraded(api: Child) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        answers = [await http.get("/health/detailed") for _ in range(3)]
    assert [a.status_code for a in answers] == [503] * 3, [a.text for a in answers]
    assert all(a.json()["status"] == "degraded" for a in answers), [a.text for a in answers]


async def test_a_send_with_the_aes_slot_unserved_is_503_unavailable(api: Child) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        answers = [
            await http.post(
                "/api/chat/send",
                json={"message": "hi", "session_id": unique("s")},
                headers=auth(unique("t")),
            )
            for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [503] * 3, [a.text for a in answers]
    assert all(a.json()["error"]["code"] == "unavailable" for a in answers)
