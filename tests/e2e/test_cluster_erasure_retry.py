"""`DELETE /api/sessions/{id}` on a real 3-master Redis Cluster when one node refuses writes
for a moment (NOREPLICAS), then the client retries the erasure, as a 503 tells it to.

`TaskStore.erase_session` ran, in one cluster pipeline, the erasing EVAL on the session's
node (`{s:T:S}`) and the erased mark of each task's location on the task's node (`{t:ID}`):
two nodes, one could refuse while the other applied. The task's state was then gone, its
location unmarked, and the retried erasure (200) no longer found the task (its SCAN is of task
states): a retry of the original send with its Idempotency-Key was taken for a send that never
queued its task, and the erased message was sent again. Locations are marked first now.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.crc import key_slot

from services.cli.embedded import LocalCluster
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.core import keys
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, new_stack, redis_client

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster_stack(
    redis_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    postgres = PostgresServer(durable=False).start()
    stack: LocalStack | None = None
    try:
        asyncio.run(migrate(postgres.url()))
        stack = new_stack(
            redis_cluster,
            tmp_path_factory.mktemp("logs"),
            database_url=postgres.url(),
            **FAST_EXECUTOR,
        )
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        yield api
    finally:
        if stack is not None:
            stack.stop()
        postgres.cleanup()


def _node_port(cluster: LocalCluster, key: str) -> int:
    return cluster.node_of_slot(key_slot(key.encode())).port


async def _completed(http: httpx.AsyncClient, api: Child, tenant: str, task_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        reply = await http.get(f"{api.url}/api/chat/tasks/{task_id}", headers=auth(tenant))
        if reply.status_code == 200 and reply.json()["status"] == "completed":
            return
        assert time.monotonic() < deadline, f"task {task_id} never completed: {reply.text}"
        await asyncio.sleep(0.05)


async def test_an_erasure_retried_after_a_node_refused_writes_still_marks_its_tasks(
    redis_cluster: LocalCluster, cluster_stack: Child
) -> None:
    api = cluster_stack
    redis = redis_client(redis_cluster)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            # A session and its task on two different nodes (the task id is the api's).
            for _ in range(10):
                tenant, session = unique("t"), unique("s")
                body = {"message": "erase me", "session_id": session}
                first = await send(http, api.url, tenant, body, **{"Idempotency-Key": "k-1"})
                assert first.status_code == 202, first.text
                task_id = first.json()["task_id"]
                location_port = _node_port(redis_cluster, keys.task_location(task_id))
                if location_port != _node_port(redis_cluster, keys.session_tag(tenant, session)):
                    break
            else:
                pytest.fail("no task landed on another node than its session")
            await _completed(http, api, tenant, task_id)
            admin = SyncRedis(port=location_port)
            admin.config_set("min-replicas-to-write", 1)  # that node refuses writes
            try:
                refused = await http.delete(
                    f"{api.url}/api/sessions/{session}", headers=auth(tenant)
                )
            finally:
                admin.config_set("min-replicas-to-write", 0)
                admin.close()
            assert refused.status_code == 503, refused.text  # retry later, it says
            erased = await http.delete(f"{api.url}/api/sessions/{session}", headers=auth(tenant))
            assert erased.status_code == 200, erased.text  # the retry: erased
            again = await send(http, api.url, tenant, body, **{"Idempotency-Key": "k-1"})
            where = await redis.get(keys.task_location(task_id))
    finally:
        await redis.aclose()
    # Expected: as on one server, 409 `conflict` naming the erased task; nothing sent again.
    assert again.status_code == 409, (again.status_code, again.text, where)
    assert again.json()["error"]["details"] == {"task_id": task_id}
