"""`dead_letter` on a real 3-master Redis Cluster whose `{dlq}` node stalls (SIGSTOP: the
connection stays open, nothing answers, then it runs what it was sent).

The dead letter was one XADD: the cluster client never resends a command that timed out
(`ClusterClient`: "a timeout is not retried: the command may have run"). Since today it is a
cluster pipeline (XADD, then XTRIM to count what the cap dropped), and redis-py's cluster
pipeline resends a whole pipeline that timed out (`RedisCluster.ERRORS_ALLOW_RETRY`, which
`ClusterClient` narrows for single commands only): the XADD that ran late ran twice, so one
failed action is two dead letters (and `deadletters replay --all` queues it twice).

Found by the review of session 16's changes on a cluster. Fixed: the cluster pipelines retry
what single commands retry (no timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import psutil
import pytest
from redis.crc import key_slot
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.cli.embedded import LocalCluster
from services.core import keys
from services.core.streams import Entry, dead_letter
from tests.e2e.clients import unique
from tests.e2e.conftest import redis_client

pytestmark = pytest.mark.e2e


def _local_ports_to(port: int) -> set[int]:
    """This process's open TCP connections to `port` (their local ports)."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    }


async def _resent_or_failed(port: int, known: set[int], moving: asyncio.Future[None]) -> None:
    """Until the client sent the pipeline again on a new connection, or gave up."""
    async with asyncio.timeout(30):
        while not moving.done() and not _local_ports_to(port) - known:
            await asyncio.sleep(0.05)


async def test_a_dead_letter_answered_late_is_written_once(redis_cluster: LocalCluster) -> None:
    redis = redis_client(redis_cluster)
    node = redis_cluster.node_of_slot(key_slot(keys.DEAD_LETTERS.encode()))
    assert node.process is not None
    stream = f"{{dlq}}:hunt:{unique('src')}"  # on the same node: the connection is warm
    try:
        await redis.delete(keys.DEAD_LETTERS)
        entry_id = (await redis.xadd(stream, {"a": b"{}"})).decode()
        await redis.xgroup_create(stream, "g", id="0")
        await redis.xreadgroup("g", "c", {stream: ">"})
        entry = Entry(stream, entry_id, {b"a": b"{}"})
        known = _local_ports_to(node.port)
        os.kill(node.process.pid, signal.SIGSTOP)
        try:
            moving = asyncio.ensure_future(dead_letter(redis, entry, "g", "boom"))
            # The first XADD timed out: sent again on a new connection (or given up on).
            await _resent_or_failed(node.port, known, moving)
        finally:
            os.kill(node.process.pid, signal.SIGCONT)
        # A timeout raised is fine (the entry stays pending, dead-lettered again later).
        with contextlib.suppress(RedisTimeoutError):
            await asyncio.wait_for(moving, 30)
        letters = await redis.xrange(keys.DEAD_LETTERS)
        assert [fields[b"entry_id"].decode() for _, fields in letters] == [entry_id]
    finally:
        await redis.delete(keys.DEAD_LETTERS, stream)
        await redis.aclose()
