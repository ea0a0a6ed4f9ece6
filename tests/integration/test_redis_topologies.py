"""Redis topologies (issue 11) on real servers: the client of each mode, a wrong mode refused
at start in one line, scripts in cluster pipelines, and the delivery hub's per-node lanes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from services.api.connections import ClientConnection
from services.api.delivery import SessionHub
from services.cli.embedded import LocalCluster, LocalSentinel, RedisServer
from services.core import events, keys
from services.core.redis_client import ClusterClient, create_redis, is_cluster
from services.core.scripts import Scripts, missing_script
from services.core.settings import Settings, load_settings
from services.core.tasks import TaskRef, TaskStore

STARTUP_TIMEOUT = 30.0


def settings_for(server: RedisServer | LocalCluster | LocalSentinel, **extra: Any) -> Settings:
    return load_settings(redis_url=server.url, **server.client_settings(), **extra)


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    deployment = LocalSentinel().start()
    yield deployment
    deployment.cleanup()


@pytest.fixture
async def cluster_client(redis_cluster: LocalCluster) -> AsyncIterator[Redis]:
    client = create_redis(settings_for(redis_cluster))
    yield client
    await client.aclose()


async def start_worker(**env: str) -> tuple[int, list[str]]:
    """`orchestrator worker` with these variables; its exit code and stderr lines."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", "worker",
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), STARTUP_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail("the worker started instead of refusing the wrong mode")
    return process.returncode or 0, err.decode().splitlines()


async def test_each_mode_builds_its_client_and_reaches_its_server(
    redis_server: RedisServer, redis_cluster: LocalCluster, sentinel: LocalSentinel
) -> None:
    for server in (redis_server, redis_cluster, sentinel):
        client = create_redis(settings_for(server))
        try:
            assert is_cluster(client) == (server.mode == "cluster")
            key = f"{{s:t:{server.mode}}}:probe"
            await client.set(key, server.mode, ex=60)
            assert await client.get(key) == server.mode.encode()
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("standalone-on-cluster", "is a Redis Cluster node; set ORCHESTRATOR_REDIS_MODE=cluster"),
        ("cluster-on-standalone", "is not a cluster node"),
        ("standalone-on-sentinel", "is a Sentinel"),
        ("sentinel-on-standalone", "is not a Sentinel"),
        ("sentinel-unknown-master", "monitors no master named 'nobody'"),
    ],
)
async def test_a_wrong_mode_stops_a_process_at_start_with_one_line(
    redis_server: RedisServer,
    redis_cluster: LocalCluster,
    sentinel: LocalSentinel,
    case: str,
    expected: str,
) -> None:
    plain = f"127.0.0.1:{redis_server.port}"
    envs = {
        "standalone-on-cluster": {"ORCHESTRATOR_REDIS_URL": redis_cluster.url},
        "cluster-on-standalone": {
            "ORCHESTRATOR_REDIS_MODE": "cluster",
            "ORCHESTRATOR_REDIS_URL": redis_server.url,
        },
        "standalone-on-sentinel": {
            "ORCHESTRATOR_REDIS_URL": f"redis://127.0.0.1:{sentinel.sentinels[0].port}/0"
        },
        "sentinel-on-standalone": {
            "ORCHESTRATOR_REDIS_MODE": "sentinel",
            "ORCHESTRATOR_REDIS_SENTINELS": plain,
        },
        "sentinel-unknown-master": {
            "ORCHESTRATOR_REDIS_MODE": "sentinel",
            "ORCHESTRATOR_REDIS_SENTINELS": sentinel.addresses,
            "ORCHESTRATOR_REDIS_SENTINEL_MASTER": "nobody",
        },
    }
    code, lines = await start_worker(**envs[case])
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("orchestrator: configuration error: ORCHESTRATOR_REDIS_")
    assert expected in lines[0]


async def test_cluster_pipelines_run_scripts_on_every_node_and_survive_a_script_flush(
    redis_cluster: LocalCluster, cluster_client: Redis
) -> None:
    scripts = Scripts(cluster_client)
    await scripts.load()
    leases = [keys.partition_lease(n) for n in range(8)]  # on all three nodes
    assert len({redis_cluster.node_of_slot(key_slot(k.encode())).port for k in leases}) == 3

    async def renew_all() -> list[Any]:
        async with cluster_client.pipeline(transaction=False) as pipe:
            for lease in leases:
                await cluster_client.set(lease, "me", px=60_000)
                scripts.queue(pipe, scripts.lease, [lease], ["me", 60_000, "renew"])
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    assert await renew_all() == [1] * 8
    await cluster_client.script_flush()  # what a restarted node or a promoted replica has
    assert all(missing_script(result) for result in await renew_all())
    await scripts.load()
    assert await renew_all() == [1] * 8
    await cluster_client.delete(*leases[:1])


class Sink:
    """A socket as the hub sees it, recording the frames it is sent."""

    def __init__(self, tenant: str, session: str) -> None:
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:  # the socket's ASGI send
            if message["type"] == "websocket.send":
                self.frames.append(json.loads(message["text"].split("\n", 1)[-1]))
                self.arrived.set()

        self.conn = ClientConnection(
            connection_id=f"c-{session}",
            tenant_id=tenant,
            session_id=session,
            user_id="u",
            send=send,
            limit=1000,
        )

    def chunks(self) -> list[int]:
        return [f["data"]["seq"] for f in self.frames if f["type"] == "chat.chunk"]

    def notices(self) -> list[str]:
        return [f["data"]["code"] for f in self.frames if f["type"] == "error"]

    async def until(self, done: Any, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.arrived.clear()
                await self.arrived.wait()


async def test_the_hub_has_a_lane_per_node_and_catches_up_after_a_node_restart(
    redis_cluster: LocalCluster, cluster_client: Redis
) -> None:
    """Sessions on all three nodes; one node is killed and restarted: its sockets are told,
    caught up from their logs, and every chunk arrives once, in order, on every socket."""
    assert isinstance(cluster_client, ClusterClient)
    settings = settings_for(redis_cluster)
    tasks = TaskStore(cluster_client, Scripts(cluster_client), settings)
    await tasks.scripts.load()
    by_node: dict[int, str] = {}
    n = 0
    while len(by_node) < 3:  # one session per node
        session = f"hub-{n}"
        slot = key_slot(keys.session_channel("tt", session).encode())
        by_node.setdefault(redis_cluster.node_of_slot(slot).port, session)
        n += 1
    sinks = {port: Sink("tt", session) for port, session in by_node.items()}
    refs = {port: TaskRef("tt", by_node[port], f"task-{port}") for port in sinks}
    victim = redis_cluster.nodes[0]
    hub = SessionHub(cluster_client, "hub-test")
    await hub.start()
    try:
        for sink in sinks.values():
            await hub.attach(sink.conn)
            hub.go_live(sink.conn, "0-0")
        assert len(hub._lanes) == 3, "one subscription connection per node"

        async def chunk(port: int, seq: int) -> None:
            body = events.event_body(events.CHAT_CHUNK, {"delta": "x", "seq": seq}, "t")
            await tasks.apply(refs[port], "chunk", attempt=1, seq=seq, body=body)

        for port in sinks:
            status = events.event_body(events.CHAT_STATUS, {"status": "processing"}, "t")
            await tasks.apply(refs[port], "create", body=status, fields={"status": "processing"})
            for seq in (1, 2):
                await chunk(port, seq)
        for sink in sinks.values():
            await sink.until(lambda sink=sink: sink.chunks() == [1, 2])

        redis_cluster.kill(victim)
        await sinks[victim.port].until(lambda: "unavailable" in sinks[victim.port].notices())
        for port in sinks:  # the others keep streaming while the node is down
            if port != victim.port:
                await chunk(port, 3)
        await asyncio.to_thread(redis_cluster.restart, victim)
        for port in sinks:
            for seq in (3, 4):
                for _ in range(100):  # the client rides through CLUSTERDOWN while it rejoins
                    try:
                        await chunk(port, seq)
                        break
                    except Exception:
                        await asyncio.sleep(0.1)
        for port, sink in sinks.items():
            await sink.until(lambda sink=sink: sink.chunks()[-1:] == [4])
            assert sink.chunks() == [1, 2, 3, 4], (port, sink.frames)
            ids = [f["id"] for f in sink.frames if f["type"] != "error"]
            assert ids == sorted(set(ids), key=events.parse_event_id)
        assert sinks[victim.port].notices() == ["unavailable"]
    finally:
        await hub.stop()
        if not victim.alive():
            redis_cluster.restart(victim)


async def test_erasing_a_session_removes_its_tasks_on_a_cluster(cluster_client: Redis) -> None:
    """`DELETE /api/sessions/{id}` erases the session's task states (a SCAN of the session's
    slot pattern) and their locators, which live in other slots, on a cluster too. A running
    task is kept ended, without its message, until it expires (a late completion's usage)."""
    scripts = Scripts(cluster_client)
    await scripts.load()
    tasks = TaskStore(cluster_client, scripts, load_settings())
    refs = [TaskRef("acme", "erased", f"task{n}") for n in range(5)]
    kept = TaskRef("acme", "other", "task9")
    for ref in [*refs, kept]:
        await tasks.apply(ref, "create", fields={"status": "processing"})
        await cluster_client.set(keys.task_location(ref.task_id), tasks.location_value(ref))
    erased = await tasks.erase_session("acme", "erased")
    assert (erased.tasks, {ended.ref for ended in erased.running}) == (len(refs), set(refs))
    assert all(ended.state["status"] == "processing" for ended in erased.running)
    for ref in refs:
        stub = await tasks.read(ref)
        assert stub is not None
        assert stub["status"] == "cancelled"
        assert "action" not in stub
        assert await tasks.locate(ref.task_id) is None
        assert await tasks.was_erased(ref.task_id)
    assert await tasks.read(kept) is not None
    assert await tasks.locate(kept.task_id) == kept
