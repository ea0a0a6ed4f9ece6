"""Redis answering but refusing writes: `MISCONF` (an RDB snapshot failed with
`stop-writes-on-bgsave-error yes`, the Redis default; PING is refused too), `NOREPLICAS`
(`min-replicas-to-write` unmet: README recommends 1), `OOM` (at `maxmemory` under
`noeviction`). README, errors: 503 `unavailable` (Redis unreachable or refusing writes:
retry). Nothing exits; everything goes on by itself once writes are accepted again.

Also the eviction policy the service needs (`noeviction`): an evicting one is reported at
start and in /health/detailed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.core.redis_client import REDIS_REFUSING, WritesRefused
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, Deployment, deploy

pytestmark = pytest.mark.e2e

KINDS = ["misconf", "noreplicas"]


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    # `dir` is a protected config: allow changing it at runtime to make BGSAVE fail.
    server = RedisServer(
        extra_args=("--enable-protected-configs", "yes", "--maxmemory-policy", "noeviction")
    ).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def deployed(
    own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with deploy(own_redis, tmp_path_factory.mktemp("logs"), **FAST_EXECUTOR) as d:
        yield d


@pytest.fixture
async def admin(own_redis: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(own_redis.url)
    yield client
    await client.config_set("maxmemory", "0")
    await client.aclose()


async def refuse_writes(admin: Redis, kind: str) -> None:
    if kind == "misconf":
        await admin.config_set("save", "3600 1")
        await admin.config_set("stop-writes-on-bgsave-error", "yes")
        await admin.config_set("dir", "/proc")  # no file can be created there, even by root
        await admin.bgsave()
        async with asyncio.timeout(10):
            while (await admin.info("persistence"))["rdb_last_bgsave_status"] == "ok":
                await asyncio.sleep(0.02)
    elif kind == "noreplicas":
        await admin.config_set("min-replicas-to-write", "1")
    else:
        await admin.config_set("maxmemory", "1")  # far below what is used: every write refused
    with pytest.raises(REDIS_REFUSING):  # Redis really refuses writes now
        await admin.set("probe", "1")


async def accept_writes(admin: Redis, kind: str, own_redis: RedisServer) -> None:
    if kind == "misconf":
        await admin.config_set("dir", str(own_redis.directory))
        await admin.bgsave()
        async with asyncio.timeout(10):
            while (await admin.info("persistence"))["rdb_last_bgsave_status"] != "ok":
                await asyncio.sleep(0.02)
        await admin.config_set("save", "")
    elif kind == "noreplicas":
        await admin.config_set("min-replicas-to-write", "0")
    else:
        await admin.config_set("maxmemory", "0")
    await admin.set("probe", "1")


@pytest.mark.parametrize("kind", KINDS)
async def test_refusals_keep_their_prefix_inside_lua_scripts(
    admin: Redis, own_redis: RedisServer, kind: str
) -> None:
    """A write refused inside a script (EVALSHA: admission, applying callbacks) is the same
    `WritesRefused` as a plain command's, so every caller's `REDIS_REFUSING` handles it."""
    script = admin.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
    await script(keys=["lua-probe"], args=["1"])  # loaded while writes are accepted
    await refuse_writes(admin, kind)
    try:
        with pytest.raises(WritesRefused) as plain:
            await admin.set("probe", "1")
        with pytest.raises(WritesRefused) as scripted:
            await script(keys=["lua-probe"], args=["2"])
    finally:
        await accept_writes(admin, kind, own_redis)
    prefix = kind.upper()
    assert str(plain.value).startswith(prefix), str(plain.value)
    assert str(scripted.value).startswith(prefix), str(scripted.value)


@pytest.mark.parametrize("kind", KINDS)
async def test_send_refused_by_redis_is_503_unavailable(
    deployed: Deployment, admin: Redis, own_redis: RedisServer, kind: str
) -> None:
    tenant = unique("t")
    await refuse_writes(admin, kind)
    try:
        async with httpx.AsyncClient() as http:
            reply = await send(
                http, deployed.api.url, tenant, {"message": "hi", "session_id": unique("s")}
            )
            ready = await http.get(f"{deployed.api.url}/health/ready", timeout=10)
    finally:
        await accept_writes(admin, kind, own_redis)
    body = reply.json()
    assert (reply.status_code, body["error"]["code"]) == (503, "unavailable"), body
    # Readiness: 200 (Redis answers) or 503 `unavailable` with the reason; never a 500.
    assert ready.status_code in (200, 503), ready.text
    if ready.status_code == 503:
        assert ready.json()["error"]["code"] == "unavailable", ready.text
        assert kind.upper() in ready.text, ready.text


@pytest.mark.parametrize("kind", [*KINDS, "oom"])
async def test_health_detailed_tells_redis_refuses_writes(
    deployed: Deployment, admin: Redis, own_redis: RedisServer, kind: str
) -> None:
    """A PING alone said redis "up" and the service "ok" (200) while every write was refused:
    the operator looking at it saw nothing wrong."""
    await refuse_writes(admin, kind)
    try:
        async with httpx.AsyncClient() as http:
            detailed = await http.get(f"{deployed.api.url}/health/detailed", timeout=10)
    finally:
        await accept_writes(admin, kind, own_redis)
    body = detailed.json()
    redis_state = body["components"]["redis"]
    assert (detailed.status_code, body["status"]) == (503, "degraded"), body
    assert redis_state["status"] == "refusing_writes", body
    assert kind.upper() in redis_state["reason"], body
    async with httpx.AsyncClient() as http:  # and back to normal by itself
        again = await http.get(f"{deployed.api.url}/health/detailed", timeout=10)
    assert again.json()["components"]["redis"]["status"] == "up", again.text
    assert again.json()["components"]["redis"]["maxmemory_policy"] == "noeviction", again.text


@pytest.mark.parametrize("kind", [*KINDS, "oom"])
async def test_every_process_rides_out_refused_writes(
    admin: Redis, own_redis: RedisServer, kind: str, tmp_path: Path
) -> None:
    """While Redis refuses writes the worker, the executor and the api wait; once it accepts
    them again a message is answered. No process dies (the worker and the executor exited
    on `MISCONF`/`NOREPLICAS`). The answer is read over REST: see the socket test below."""
    with deploy(own_redis, tmp_path / "logs", **FAST_EXECUTOR) as deployed:
        await _refuse_for_two_lease_rounds(deployed, admin, own_redis, kind)
        tenant = unique("t")
        async with httpx.AsyncClient(base_url=deployed.api.url, timeout=10) as http:
            reply = await send(http, deployed.api.url, tenant, {"message": "hi"})
            assert reply.status_code == 202, reply.text
            status = await _final_status(http, tenant, reply.json()["task_id"])
        assert status == "completed", _outputs(deployed)


async def test_sockets_work_again_after_a_failed_snapshot(
    admin: Redis, own_redis: RedisServer, tmp_path: Path
) -> None:
    with deploy(own_redis, tmp_path / "logs", **FAST_EXECUTOR) as deployed:
        await _refuse_for_two_lease_rounds(deployed, admin, own_redis, "misconf")
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(deployed.api.ws_url, tenant, session)
        async with httpx.AsyncClient() as http:
            reply = await send(
                http, deployed.api.url, tenant, {"message": "hi", "session_id": session}
            )
        assert reply.status_code == 202, reply.text
        events = await events_until(ws, final_of(reply.json()["task_id"]), timeout=30)
        assert events[-1]["type"] == "chat.response", events
        await ws.close()


async def _refuse_for_two_lease_rounds(
    deployed: Deployment, admin: Redis, own_redis: RedisServer, kind: str
) -> None:
    """Writes refused for 8 s (two lease rounds: lease 10 s / 3), then accepted; every
    process of the deployment must be alive after it."""
    children = deployed.stack.children
    await refuse_writes(admin, kind)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8.0
        while loop.time() < deadline and all(child.alive() for child in children):
            await asyncio.sleep(0.2)  # a process exiting is what is watched for
    finally:
        await accept_writes(admin, kind, own_redis)
    for child in children:
        assert child.alive(), f"{child.role} exited:\n{child.output(3000)}"


async def _final_status(http: httpx.AsyncClient, tenant: str, task_id: str) -> str:
    """The task's status once it has ended (polled: no socket, see above), within 30 s."""
    async with asyncio.timeout(30):
        while True:
            reply = await http.get(f"/api/chat/tasks/{task_id}", headers=auth(tenant))
            status = str(reply.json().get("status")) if reply.status_code == 200 else ""
            if status in ("completed", "failed", "cancelled", "timed_out"):
                return status
            await asyncio.sleep(0.05)


def _outputs(deployed: Deployment) -> str:
    return "\n".join(f"{c.role}:\n{c.output(2000)}" for c in deployed.stack.children)


@pytest.fixture(scope="module")
def evicting_redis() -> Iterator[RedisServer]:
    server = RedisServer(
        extra_args=("--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru")
    ).start()
    yield server
    server.cleanup()


async def test_an_evicting_policy_is_reported(evicting_redis: RedisServer, tmp_path: Path) -> None:
    """Under an evicting `maxmemory-policy` a full Redis deletes, without an error, task
    states, Idempotency-Keys, leases, session logs, streams and groups: each process says so
    once at start, and /health/detailed shows the policy."""
    with deploy(evicting_redis, tmp_path / "logs", **FAST_EXECUTOR) as deployed:
        async with httpx.AsyncClient() as http:
            detailed = await http.get(f"{deployed.api.url}/health/detailed", timeout=10)
        outputs = {child.role: child.output(tail=200_000) for child in deployed.stack.children}
    assert detailed.json()["components"]["redis"]["maxmemory_policy"] == "allkeys-lru", (
        detailed.text
    )
    for role in ("api", "worker", "executor"):
        said = [line for line in outputs[role].splitlines() if "maxmemory-policy" in line]
        assert len(said) == 1, (role, said, outputs[role][-2000:])
        assert "allkeys-lru" in said[0], (role, said)


async def test_a_refused_config_get_says_nothing(own_redis: RedisServer) -> None:
    """Managed Redis often refuses CONFIG: the policy is then unknown, not an error."""
    from services.core.redis_client import eviction_policy

    client = Redis.from_url(own_redis.url)
    try:
        await client.acl_setuser(
            "noconfig", enabled=True, passwords=["+pw"], commands=["+@all", "-config"], keys=["*"]
        )
        limited = Redis.from_url(own_redis.url, username="noconfig", password="pw")
        try:
            assert await eviction_policy(limited) is None
            assert await eviction_policy(client) == "noeviction"
        finally:
            await limited.aclose()
    finally:
        await client.acl_deluser("noconfig")
        await client.aclose()
