"""A send that fails after its task was created on a cluster (the action's node went down) is
abandoned: its task ends with `chat.error` and its `Idempotency-Key` is freed, so the
client's retry makes a new task. On a real 3-master cluster with the task's node killed: the
key, on a node still up, is freed at once rather than after the task's node is back (a retry
that came in between was answered 202 with the abandoned task, then got its error)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from services.api.admission import Admission
from services.api.chat_service import ChatService, _digest
from services.api.models import SendRequest
from services.cli.embedded import LocalCluster
from services.core import keys
from services.core.auth import Principal
from services.core.quotas import QuotaCache, QuotaStore
from services.core.ratelimit import RateLimiter
from services.core.redis_client import create_redis
from services.core.scripts import Scripts
from services.core.settings import load_settings
from services.core.tasks import TaskRef, TaskStore
from services.core.tenant_sockets import TenantSockets
from services.core.tiers import DEFAULT_TIERS
from services.core.usage import UsageCounter

TENANT = "abandon-co"
PRINCIPAL = Principal(tenant_id=TENANT, user_id="u1", name="Ann")
KEY = "retried-after-an-outage"


@dataclass
class Service:
    chat: ChatService
    redis: Redis

    async def send(self, session_id: str) -> str:
        sent = await self.chat.send(
            PRINCIPAL,
            SendRequest(message="hello"),
            session_id=session_id,
            agent_id="default",
            idempotency_key=KEY,
        )
        return sent.accepted.task_id


@pytest.fixture
async def service(redis_cluster: LocalCluster) -> AsyncIterator[Service]:
    settings = load_settings(redis_url=redis_cluster.url, **redis_cluster.client_settings())
    redis = create_redis(settings)
    store = QuotaStore(redis, settings, tiers=DEFAULT_TIERS)
    quotas = QuotaCache(store, ttl=300.0)
    await quotas.start()
    admission = Admission(
        quotas, RateLimiter(redis), UsageCounter(redis), TenantSockets(redis, 60), settings
    )
    scripts = Scripts(redis)
    await scripts.load()
    chat = ChatService(redis, TaskStore(redis, scripts, settings), admission, settings)
    yield Service(chat, redis)
    await quotas.stop()
    await redis.aclose()


def node_port(cluster: LocalCluster, key: str) -> int:
    return cluster.node_of_slot(key_slot(key.encode())).port


def session_whose_tasks_are(
    cluster: LocalCluster, *, beside: str | None = None, away_from: str | None = None
) -> str:
    """A session whose task states live on the node of `beside`, or not on `away_from`'s."""
    key = beside or away_from
    assert key is not None
    return next(
        f"s{n}"
        for n in range(100)
        if (node_port(cluster, keys.task_state(TENANT, f"s{n}", "t")) == node_port(cluster, key))
        == (beside is not None)
    )


async def test_the_key_is_freed_while_the_tasks_node_is_down(
    service: Service, redis_cluster: LocalCluster
) -> None:
    idempotency = keys.tenant_idempotency(TENANT, _digest(KEY))
    await service.redis.delete(idempotency)
    session = session_whose_tasks_are(redis_cluster, away_from=idempotency)
    first = await service.send(session)  # created and queued, its key reserved
    ref = TaskRef(TENANT, session, first)
    state = keys.task_state(TENANT, session, first)
    task_node = redis_cluster.node_of_slot(key_slot(state.encode()))

    redis_cluster.kill(task_node)
    try:
        await service.chat._abandon(ref, idempotency)  # as after its action failed to be added
        assert await service.redis.get(idempotency) is None
    finally:
        redis_cluster.restart(task_node)

    # The task is failed once its node is back (in the background, retried until it can).
    await asyncio.wait_for(asyncio.gather(*service.chat._background), 30)
    assert await service.redis.hget(state, "status") == b"failed"
    assert await service.redis.hget(state, "abandoned") == b"1"
    second = await service.send(session)
    assert second != first
    assert await service.redis.get(idempotency) == second.encode()


async def test_until_the_task_is_marked_this_process_does_not_answer_a_retry_with_it(
    service: Service, redis_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key and the task on the node that went down: neither can be done until it is
    back. A retry that reaches this process before its background retry ran makes a new
    task (the background retry is held back here, so nothing else can make that true)."""
    monkeypatch.setattr("services.api.chat_service.ABANDON_RETRY_INTERVAL", 3600.0)
    idempotency = keys.tenant_idempotency(TENANT, _digest(KEY))
    await service.redis.delete(idempotency)
    session = session_whose_tasks_are(redis_cluster, beside=idempotency)
    first = await service.send(session)
    node = redis_cluster.node_of_slot(key_slot(idempotency.encode()))
    redis_cluster.kill(node)
    try:
        await service.chat._abandon(TaskRef(TENANT, session, first), idempotency)
    finally:
        redis_cluster.restart(node)
    state = keys.task_state(TENANT, session, first)
    assert await service.redis.hget(state, "status") == b"processing"  # not marked yet
    second = await service.send(session)
    assert second != first
    assert await service.redis.get(idempotency) == second.encode()  # a third send replays it
    assert await service.send(session) == second
    for retry in service.chat._background:
        retry.cancel()
