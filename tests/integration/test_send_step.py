"""A chat send on one server is one script (send.lua): the session's and the tenant's rate
limits, the token budget and the enqueue. On a real Redis: it admits and refuses exactly as
the two-step path (limits, then the task pipeline) that clusters and idempotent sends use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from services.api.admission import Admission
from services.api.chat_service import ChatService, _digest
from services.api.models import SendRequest
from services.core import keys
from services.core.auth import Principal
from services.core.errors import Conflict, InvalidInput, RateLimited
from services.core.quotas import QuotaCache, QuotaStore
from services.core.ratelimit import RateLimiter
from services.core.scripts import Scripts
from services.core.settings import load_settings
from services.core.tasks import TaskStore
from services.core.tenant_sockets import TenantSockets
from services.core.tiers import DEFAULT_TIERS
from services.core.usage import UsageCounter

TENANT = "acme"
PRINCIPAL = Principal(tenant_id=TENANT, user_id="u1", name="Ann")


@dataclass
class Service:
    chat: ChatService
    store: QuotaStore
    quotas: QuotaCache
    usage: UsageCounter
    redis: Redis

    async def tier(self, tier: str, limits: dict[str, Any] | None = None) -> None:
        await self.store.set(TENANT, tier, limits)
        self.quotas.forget(TENANT)

    async def send(
        self, session_id: str | None, key: str | None = None, request: SendRequest | None = None
    ) -> str:
        sent = await self.chat.send(
            PRINCIPAL,
            request or SendRequest(message="hello"),
            session_id=session_id,
            agent_id="default",
            idempotency_key=key,
        )
        return sent.accepted.task_id

    async def refused(self, session_id: str) -> RateLimited:
        with pytest.raises(RateLimited) as refusal:
            await self.send(session_id)
        return refusal.value

    async def actions(self, priority: str) -> list[str]:
        entries = await self.redis.xrange(keys.aes_stream(priority))  # type: ignore[arg-type]
        return [fields[b"action"].decode() for _, fields in entries]


@pytest.fixture
async def service(redis: Redis) -> AsyncIterator[Service]:
    settings = load_settings()
    store = QuotaStore(redis, settings, tiers=DEFAULT_TIERS)
    quotas = QuotaCache(store, ttl=300.0)
    await quotas.start()
    usage = UsageCounter(redis)
    admission = Admission(quotas, RateLimiter(redis), usage, TenantSockets(redis, 60), settings)
    scripts = Scripts(redis)
    await scripts.load()
    chat = ChatService(redis, TaskStore(redis, scripts, settings), admission, settings)
    yield Service(chat, store, quotas, usage, redis)
    await quotas.stop()


async def evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_an_admitted_send_is_one_script_that_creates_and_enqueues(
    service: Service,
) -> None:
    await service.tier("pro")
    await service.send("warm")  # the tenant's quota is cached from here on
    before = await evalsha_calls(service.redis)
    task_id = await service.send("s1")
    assert await evalsha_calls(service.redis) == before + 1
    state = await service.redis.hgetall(keys.task_state(TENANT, "s1", task_id))
    assert state[b"status"] == b"processing"
    assert state[b"tier"] == b"pro"
    assert await service.redis.get(keys.task_location(task_id)) == f"{TENANT}/s1".encode()
    assert any(task_id in action for action in await service.actions("normal"))
    log = await service.redis.xrange(keys.session_log(TENANT, "s1"))
    assert b'"type":"chat.status"' in log[0][1][b"e"]


async def test_a_session_refusal_gives_the_tenant_back_its_take_and_its_count(
    service: Service,
) -> None:
    await service.tier("pro", {"requestsPerMinutePerSession": 1, "requestsPerMinutePerTenant": 3})
    await service.send("a")
    for _ in range(3):
        refusal = await service.refused("a")
        assert refusal.details["scope"] == "session"
    # Had the refused sends kept the tenant's takes, "c" would be refused.
    await service.send("b")
    await service.send("c")
    assert (await service.refused("d")).details["scope"] == "tenant"
    assert (await service.usage.today(TENANT)).requests == 3
    assert len(await service.actions("normal")) == 3


async def test_a_tenant_refusal_gives_the_session_back_its_take(service: Service) -> None:
    await service.tier("pro", {"requestsPerMinutePerSession": 1, "requestsPerMinutePerTenant": 1})
    await service.send("a")
    assert (await service.refused("b")).details["scope"] == "tenant"
    # The refused send's session limit was given back: nothing holds it any more.
    assert await service.redis.get(keys.session_rate(TENANT, "b")) is None
    assert await service.redis.get(keys.session_rate(TENANT, "a")) is not None
    assert len(await service.actions("normal")) == 1


async def test_over_the_token_budget_nothing_is_created(service: Service) -> None:
    await service.tier("free", {"tokensPerDay": 100})
    await service.usage.add(TENANT, "earlier", input_tokens=80, output_tokens=20)
    refusal = await service.refused("a")
    assert refusal.code == "token_budget_exhausted"
    assert await service.actions("low") == []
    assert await service.redis.keys(keys.task_location("*")) == []
    # Like every 429, with the RateLimit-* headers (here: the day's token budget), on the
    # two-step path (an Idempotency-Key) as well.
    with pytest.raises(RateLimited) as keyed:
        await service.send("a", key="over-budget")
    for headers in (refusal.headers, keyed.value.headers):
        assert headers["RateLimit-Limit"] == "100"
        assert headers["RateLimit-Remaining"] == "0"
        assert headers["RateLimit-Reset"] == headers["Retry-After"]
        assert 0 < int(headers["Retry-After"]) <= 86_400


async def test_one_step_and_two_step_sends_leave_the_same_state(service: Service) -> None:
    await service.tier("pro")
    one = await service.send("one")
    two = await service.send("two", key="idempotency-key-1")  # reserves its key: two steps
    states = [
        await service.redis.hgetall(keys.task_state(TENANT, session, task_id))
        for session, task_id in (("one", one), ("two", two))
    ]
    assert states[0].keys() == states[1].keys()
    for session, task_id in (("one", one), ("two", two)):
        assert await service.redis.ttl(keys.task_location(task_id)) > 0
        member = keys.task_member(TENANT, session, task_id)
        partition = keys.partition_of(TENANT, session, load_settings().callback_partitions)
        assert await service.redis.zscore(keys.partition_deadlines(partition), member)
    assert (await service.usage.today(TENANT)).requests == 2
    assert len(await service.actions("normal")) == 2


async def test_a_send_after_redis_lost_its_scripts_loads_them_again(service: Service) -> None:
    await service.tier("pro")
    await service.redis.script_flush()
    task_id = await service.send("a")
    assert any(task_id in action for action in await service.actions("normal"))


async def test_a_send_run_twice_is_accepted_once_and_counted_once(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What redis-py does after a connection lost under the script: it sends the same script
    (the same task id) again. The second run finds the task and takes nothing."""
    await service.tier("pro", {"requestsPerMinutePerSession": 1})
    monkeypatch.setattr("services.api.chat_service.new_id", lambda: "the-same-task-id")
    first = await service.send("a")
    again = await service.send("a")  # the session's limit of 1 would refuse a new send
    assert first == again == "the-same-task-id"
    assert len(await service.actions("normal")) == 1
    assert (await service.usage.today(TENANT)).requests == 1


async def test_a_retry_whose_first_task_was_never_created_makes_a_new_one(
    service: Service,
) -> None:
    """On a cluster the first attempt can write the task's location (one node) and fail to
    create its state (another node that went down): the retry with the same key must not be
    answered with that task, which will never exist and never be answered."""
    await service.tier("pro")
    first = await service.send("a", key="retried-key")
    await service.redis.delete(keys.task_state(TENANT, "a", first))  # its create never ran
    second = await service.send("a", key="retried-key")
    assert second != first
    state = await service.redis.hgetall(keys.task_state(TENANT, "a", second))
    assert state[b"status"] == b"processing"
    assert any(second in action for action in await service.actions("normal"))


async def test_two_sends_with_one_key_at_once_make_one_task(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A double submit: the second request finds the key reserved by the first, which has
    not written its task yet. It is answered with the first's task once that is written,
    and makes none of its own (the key's whole point). The first is held between its
    reservation and its enqueue until the second has asked for the key's task."""
    await service.tier("pro")
    await service.send("warm")
    chat = service.chat
    asked = asyncio.Event()
    enqueue, lookup = chat._send_in_two_steps, chat._lookup

    async def held_enqueue(*args: Any, **kwargs: Any) -> Any:
        await asyncio.wait_for(asyncio.shield(asked.wait()), 10)
        return await enqueue(*args, **kwargs)

    async def noted_lookup(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("wait"):  # the second send, after failing to reserve the key
            asked.set()
        return await lookup(*args, **kwargs)

    monkeypatch.setattr(chat, "_send_in_two_steps", held_enqueue)
    monkeypatch.setattr(chat, "_lookup", noted_lookup)
    first, second = await asyncio.gather(
        service.send("a", key="double-submit"), service.send("a", key="double-submit")
    )
    assert first == second
    assert len(await service.actions("normal")) == 2  # "warm" and this one
    # The second sent nothing: what it took from the limits and the day's count went back.
    assert (await service.usage.today(TENANT)).requests == 2
    await service.tier("pro", {"requestsPerMinutePerSession": 2})
    await service.send("a", key="another")  # the session's second, not its third


async def test_retries_at_once_after_an_abandoned_send_make_one_task(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key names a task that was never queued (abandoned): the next request with the key
    takes it over. Two arriving at once both find the abandoned task; only one may take the
    key (compare-and-set), the other is answered with the winner's task. Both are held at
    the takeover until both have reached it."""
    await service.tier("pro")
    first = await service.send("a", key="retried-together")
    await service.redis.hset(keys.task_state(TENANT, "a", first), "abandoned", "1")
    chat = service.chat
    both_there = asyncio.Barrier(2)
    swap = chat._swap
    held = 0

    async def held_swap(*args: Any, **kwargs: Any) -> Any:
        nonlocal held
        held += 1
        if held <= 2:
            await asyncio.wait_for(both_there.wait(), 10)
        return await swap(*args, **kwargs)

    monkeypatch.setattr(chat, "_swap", held_swap)
    queued = len(await service.actions("normal"))
    second, third = await asyncio.gather(
        service.send("a", key="retried-together"), service.send("a", key="retried-together")
    )
    assert second == third != first
    assert held == 2
    assert await service.redis.get(
        keys.tenant_idempotency(TENANT, _digest("retried-together"))
    ) == (second.encode())
    assert len(await service.actions("normal")) == queued + 1


async def test_a_repeated_cancel_publishes_the_tasks_record_again(redis: Redis) -> None:
    """A cancel marks the task, then publishes its record for PostgreSQL and tells the AES. If
    Redis failed in between (the client got a 503), the retry found the task final (409) and
    only re-sent the AES's notice: the cancelled message never reached the history. It is
    published again too (the writer keeps one record per task)."""
    settings = load_settings(database_url="postgresql://u:p@127.0.0.1:1/history")
    store = QuotaStore(redis, settings, tiers=DEFAULT_TIERS)
    quotas = QuotaCache(store, ttl=300.0)
    await quotas.start()
    try:
        usage = UsageCounter(redis)
        admission = Admission(quotas, RateLimiter(redis), usage, TenantSockets(redis, 60), settings)
        scripts = Scripts(redis)
        await scripts.load()
        chat = ChatService(redis, TaskStore(redis, scripts, settings), admission, settings)
        sent = await chat.send(
            PRINCIPAL, SendRequest(message="hello"), session_id="s1", agent_id="default"
        )
        task_id = sent.accepted.task_id
        await chat.cancel(PRINCIPAL, task_id)
        await redis.delete(keys.PERSIST_RECORDS)  # as if that write had failed
        with pytest.raises(Conflict):
            await chat.cancel(PRINCIPAL, task_id)
        records = await redis.xrange(keys.PERSIST_RECORDS)
        assert len(records) == 1
        assert task_id.encode() in records[0][1][b"action"]
    finally:
        await quotas.stop()


@pytest.mark.parametrize(
    ("session_id", "request_"),
    [
        ("s1", SendRequest(message="something else")),
        ("s2", SendRequest(message="hello")),
        ("s1", SendRequest(message="hello", stream=True)),
        ("s1", SendRequest(message="hello", context={"locale": "fr"})),
    ],
    ids=["message", "session", "stream", "context"],
)
async def test_a_key_used_again_for_another_request_is_refused(
    service: Service, session_id: str, request_: SendRequest
) -> None:
    """A replay answered another request with the first one's task: the message never sent,
    or another session's task handed back as this one's (the browser review)."""
    await service.tier("pro")
    first = await service.send("s1", key="k1")
    with pytest.raises(InvalidInput) as refused:
        await service.send(session_id, key="k1", request=request_)
    assert refused.value.code == "idempotency_key_reused"
    assert await service.send("s1", key="k1") == first  # a real retry is still answered
    assert len(await service.actions("normal")) == 1


async def test_a_key_refused_for_its_content_serves_the_corrected_send(service: Service) -> None:
    """A send refused before it was queued (422 `message_too_long`) does not spend its
    `Idempotency-Key`: the client's corrected message under the same key is a new task (not
    `idempotency_key_reused`), and a retry of that one is answered with it."""
    await service.tier("free")  # maxMessageChars 2 000
    with pytest.raises(InvalidInput) as refused:
        await service.send("s1", key="k3", request=SendRequest(message="x" * 2001))
    assert refused.value.code == "message_too_long"
    fixed = await service.send("s1", key="k3", request=SendRequest(message="short"))
    assert await service.send("s1", key="k3", request=SendRequest(message="short")) == fixed
    assert len(await service.actions("low")) == 1


async def test_a_retry_naming_no_session_is_answered_with_the_first_task(
    service: Service,
) -> None:
    """Each request without a session makes a new one: its retry names none either."""
    await service.tier("pro")
    first = await service.send(None, key="k2")
    assert await service.send(None, key="k2") == first
    assert len(await service.actions("normal")) == 1
