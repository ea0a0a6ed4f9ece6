"""A planned (manual) failover on a real Redis Cluster (found in session 11's review).

`CLUSTER FAILOVER` on a replica demotes the primary while it is alive: the server answers every
client blocked on it with `-UNBLOCKED ... (master -> replica?)` (a plain ResponseError), not a
lost connection nor a MOVED. Processes must ride through it like through a SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from redis.crc import key_slot

from services.cli.embedded import LocalCluster, RedisServer, _command
from services.core import keys
from services.core.actions import ACTION_FIELD, ChatProcess, User, encode_action, utcnow
from services.core.redis_client import create_redis
from services.core.settings import load_settings
from services.executor.main import Executor

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster(masters=3, replicas=1).start()
    yield cluster
    cluster.cleanup()


def replica_of(cluster: LocalCluster, primary: RedisServer) -> RedisServer:
    primary_id = _command(primary.port, "CLUSTER", "MYID")
    for node in cluster.nodes:
        role = _command(node.port, "INFO", "replication")
        if role.get("role") == "slave" and int(role.get("master_port", 0)) == primary.port:
            return node
    raise LookupError(f"no replica of {primary_id}")


def wait_promoted(cluster: LocalCluster, node: RedisServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _command(node.port, "INFO", "replication").get("role") != "master":
        assert time.monotonic() < deadline, "manual failover did not complete"
        time.sleep(0.05)
    cluster.wait_ready(timeout)


async def test_the_executor_keeps_consuming_across_a_manual_cluster_failover(
    replicated_cluster: LocalCluster,
) -> None:
    settings = load_settings(
        redis_url=replicated_cluster.url,
        redis_mode="cluster",
        worker_sleep_seconds=5,  # the executor stays blocked in XREADGROUP through the switch
        pod_name="hunt-executor",
    )
    executor = Executor(settings)
    running = asyncio.create_task(executor.run())
    client = create_redis(settings)
    try:
        aes_node = replicated_cluster.node_of_slot(key_slot(keys.aes_stream("normal").encode()))

        def blocked() -> bool:  # the executor waits in XREADGROUP on the {aes} node
            return int(_command(aes_node.port, "INFO", "clients").get("blocked_clients", 0)) > 0

        async with asyncio.timeout(15):
            while not blocked():
                assert not running.done(), f"executor died: {running.exception()!r}"
                await asyncio.sleep(0.05)
        replica = replica_of(replicated_cluster, aes_node)
        _command(replica.port, "CLUSTER", "FAILOVER")  # a planned switch (an upgrade)
        await asyncio.to_thread(wait_promoted, replicated_cluster, replica)

        # It rode through (it died of UNBLOCKED) and answers what is sent after the switch.
        callback_queue = keys.callback_stream(0)
        action = ChatProcess(
            tenant_id="t1",
            session_id="s1",
            task_id="task-after-failover",
            agent_id="a1",
            message="hello",
            user=User(id="u1"),
            callback_queue=callback_queue,
            deadline=utcnow() + timedelta(seconds=60),
        )
        await client.xadd(keys.aes_stream("normal"), {ACTION_FIELD: encode_action(action)})
        async with asyncio.timeout(15):
            while not await client.xlen(callback_queue):
                assert not running.done(), f"executor died: {running.exception()!r}"
                await asyncio.sleep(0.1)
    finally:
        executor.stopping.set()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await client.aclose()
        await executor.redis.aclose()
