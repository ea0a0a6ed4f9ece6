"""An SRE's check of Redis memory after chat sessions end in every way README names (answered,
cancelled, timed out, failed, erased; REST and socket sends; with and without an
Idempotency-Key; with streamed chunks): every key the run made has a ttl within README's
bound or is one of the installation-wide keys, and the streams hold nothing once read and
acknowledged (README "Redis keys", "Configuration", "Reliability")."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child
from services.core import keys
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, deploy, redis_client
from tests.e2e.keyspace import Key, keyspace, until, without_ttl

pytestmark = pytest.mark.e2e

TASK_TTL = 60
LOG_TTL = 10
DAY = 86_400
ENTERPRISE_TIMEOUT = 300
STALL = {"simulate": {"stall": True}}


@dataclass
class Stack:
    redis_server: RedisServer
    api: Child


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = RedisServer().start()
    postgres = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(postgres.url()))
        with deploy(
            server,
            tmp_path_factory.mktemp("logs"),
            database_url=postgres.url(),
            task_ttl_seconds=str(TASK_TTL),
            session_log_ttl_seconds=str(LOG_TTL),
            connection_ttl_seconds="3",
            retry_backoff_seconds="0.05",
            retry_backoff_max_seconds="0.1",
            max_task_attempts="2",
            **FAST_EXECUTOR,
        ) as deployed:
            yield Stack(server, deployed.api)
    finally:
        postgres.cleanup()
        server.cleanup()


async def _every_ending(redis: Redis, api: Child, tenant: str) -> dict[str, str]:
    """One session per ending; returns {ending: session id}."""
    short = f"{tenant}-short"
    await QuotaStore(redis, load_settings()).set(short, "pro", {"taskTimeoutSeconds": 1})
    sessions = {name: unique("s") for name in
                ("answered", "socket", "failed", "cancelled", "timed_out", "erased")}  # fmt: skip
    async with httpx.AsyncClient() as http:
        s = sessions["answered"]
        ws, _ = await connect(api.ws_url, tenant, s)
        body = {"message": "hello", "stream": True, "session_id": s}
        r = await send(http, api.url, tenant, body, **{"Idempotency-Key": unique("k")})
        await events_until(ws, final_of(r.json()["task_id"]))
        r = await send(http, api.url, tenant, {"message": "again", "session_id": s})
        await events_until(ws, final_of(r.json()["task_id"]))
        await ws.close()

        s = sessions["socket"]
        ws, _ = await connect(api.ws_url, tenant, s)
        frame = {"type": "chat.send", "data": {"message": "by socket", "request_id": "r1"}}
        await ws.send(json.dumps(frame))
        await events_until(ws, lambda e: e["type"] in ("chat.response", "chat.error"))
        await ws.close()

        s = sessions["failed"]
        ws, _ = await connect(api.ws_url, tenant, s)
        failing = {"simulate": {"fail_attempts": 5, "retryable": True}}
        r = await send(http, api.url, tenant, {"message": "f", "session_id": s, "context": failing})
        done = await events_until(ws, final_of(r.json()["task_id"]))
        assert done[-1]["type"] == "chat.error", done[-1]
        await ws.close()

        s = sessions["cancelled"]
        ws, _ = await connect(api.ws_url, tenant, s)
        r = await send(
            http, api.url, tenant, {"message": "c", "session_id": s, "context": STALL},
            **{"Idempotency-Key": unique("k")},
        )  # fmt: skip
        task_id = r.json()["task_id"]
        cancel = {"task_id": task_id}
        c = await http.post(f"{api.url}/api/chat/cancel", json=cancel, headers=auth(tenant))
        assert c.status_code == 200, c.text
        await events_until(ws, final_of(task_id))
        c = await http.post(f"{api.url}/api/chat/cancel", json=cancel, headers=auth(tenant))
        assert c.status_code == 409, c.text
        await ws.close()

        s = sessions["timed_out"]
        ws, _ = await connect(api.ws_url, short, s)
        r = await send(http, api.url, short, {"message": "t", "session_id": s, "context": STALL})
        done = await events_until(ws, final_of(r.json()["task_id"]))
        assert done[-1]["data"]["code"] == "timed_out", done[-1]
        await ws.close()

        s = sessions["erased"]
        ws, _ = await connect(api.ws_url, tenant, s)
        r = await send(
            http, api.url, tenant, {"message": "e", "session_id": s},
            **{"Idempotency-Key": unique("k")},
        )  # fmt: skip
        await events_until(ws, final_of(r.json()["task_id"]))
        r = await send(http, api.url, tenant, {"message": "e2", "session_id": s, "context": STALL})
        erased = await http.delete(f"{api.url}/api/sessions/{s}", headers=auth(tenant))
        assert erased.status_code == 200, erased.text
        await events_until(ws, lambda e: e["type"] == "session.erased")
        await ws.close()
    return sessions


def _bound(key: Key, tenant: str) -> float | None:
    """README's longest life for a key of the run (seconds), None for an unknown family."""
    task = TASK_TTL + ENTERPRISE_TIMEOUT
    rules: list[tuple[str, float]] = [
        (r":log$", LOG_TTL),  # SESSION_LOG_TTL_SECONDS
        (r":task:[^:]+$", task),  # TASK_TTL_SECONDS past the deadline
        (r"^\{t:[^}]+\}:where$", task),  # as its task
        (r"^\{t:[^}]+\}:recancel$", 10),  # "set 10 s after a repeated cancel"
        (r":tasks$", task + DAY),  # "expires a day after its longest-lived task"
        (r":unwritten$", 3600),  # "expires an hour after the last"
        (r":idem:", TASK_TTL),  # 24 h, TASK_TTL_SECONDS if shorter
        (r":applied:erased:session$", 3600),
        # `:applied:erased:ID` ("kept as long as the task's stub"): its own test below
        (r":applied:erased:[^:]+$", task + DAY),
        (r":rl$", 60),  # GCRA: at most a minute of time owed
        (r":usage:\d{4}-\d{2}-\d{2}$", 2 * DAY),
        (r":counted:", 2 * DAY),
        (r"^\{cb:\d+\}:(lease|released)$", 10),  # PARTITION_LEASE_SECONDS
        (r"^\{health", 1),
    ]
    for pattern, seconds in rules:
        if re.search(pattern, key.name):
            return seconds
    return None


async def test_every_key_an_ended_session_left_has_a_ttl_within_readmes_bound(
    stack: Stack,
) -> None:
    """Guard. After one session of each ending, no key of a session, task or tenant request
    is kept without a ttl, and each ttl is within what README says its family lives."""
    redis = redis_client(stack.redis_server)
    try:
        tenant = unique("t")
        await _every_ending(redis, stack.api, tenant)
        found = await keyspace(redis)
    finally:
        await redis.aclose()
    forever = without_ttl(found)
    assert not forever, f"keys kept without ttl: {[(k.name, k.type) for k in forever]}"
    ours = [k for k in found.values() if (k.ttl > 0 and tenant in k.name) or ":where" in k.name]
    beyond = [
        (k.name, k.ttl, _bound(k, tenant))
        for k in ours
        if _bound(k, tenant) is None or k.ttl > (_bound(k, tenant) or 0) + 2
    ]
    assert not beyond, f"keys living longer than README says (name, ttl, bound): {beyond}"


async def _group_state(redis: Redis, stream: str) -> list[tuple[str, int, int | None]]:
    try:
        groups = await redis.xinfo_groups(stream)
    except Exception:  # no such stream
        return []
    return [
        (
            g["name"].decode() if isinstance(g["name"], bytes) else g["name"],
            int(g["pending"]),
            g.get("lag"),
        )
        for g in groups
    ]


async def test_streams_hold_nothing_once_every_ending_was_read_and_acknowledged(
    stack: Stack,
) -> None:
    """Guard. README "Configuration": stream entries are released once every consumer group
    read and acknowledged them (the worker trims every 5 s); the persistence stream's records
    go once written. Here not only for answered messages (tests/e2e/test_stream_retention.py)
    but for cancelled, timed-out, retried-then-failed and erased ones: none stays pending in
    a group (which would hold its stream up to MAXLEN) and the streams empty."""
    redis = redis_client(stack.redis_server)
    streams = [
        *(keys.aes_stream(p) for p in keys.PRIORITIES),
        *(keys.callback_stream(p) for p in range(8)),
        keys.PERSIST_RECORDS,
    ]

    async def drained() -> bool:
        for stream in streams:
            if any(pending or lag for _, pending, lag in await _group_state(redis, stream)):
                return False
            if await redis.xlen(stream) > 0:
                return False
        return True

    try:
        for _ in range(2):
            await _every_ending(redis, stack.api, unique("t"))
        try:
            await until(drained, "every stream read, acknowledged and released", timeout=16)
        except AssertionError:
            state = {s: (await redis.xlen(s), await _group_state(redis, s)) for s in streams}
            raise AssertionError(f"streams still holding entries (xlen, groups): {state}") from None
    finally:
        await redis.aclose()


async def test_the_erased_notice_mark_lives_as_long_as_the_tasks_stub(stack: Stack) -> None:
    """README "Redis keys": `{s:T:S}:applied:erased:ID`, "that the erasure of the session told
    its sockets task ID ended (kept as long as the task's stub)". An SRE sizing Redis expects
    the mark to go with the stub of the erased running task. Its ttl was TASK_TTL_SECONDS +
    one day whatever the task's timeout: with the enterprise tier (300 s)
    it outlives the stub by a day (one key per erased running task a client can make at
    will), and with a tier whose `taskTimeoutSeconds` is longer than a day (up to 7 days is
    accepted) it expires days before the stub, after which a retried DELETE of the session
    finds the stub "kept" and tells the sockets `chat.cancelled` a second time."""
    redis = redis_client(stack.redis_server)
    week = f"{unique('t')}-week"
    await QuotaStore(redis, load_settings()).set(week, "pro", {"taskTimeoutSeconds": 604_800})
    lives: dict[str, tuple[int, int]] = {}
    try:
        async with httpx.AsyncClient() as http:
            for tenant in (unique("t"), week):
                session = unique("s")
                ws, _ = await connect(stack.api.ws_url, tenant, session)
                body = {"message": "long", "session_id": session, "context": STALL}
                task_id = (await send(http, stack.api.url, tenant, body)).json()["task_id"]
                await events_until(ws, lambda e: e["type"] == "chat.status")
                erased = await http.delete(
                    f"{stack.api.url}/api/sessions/{session}", headers=auth(tenant)
                )
                assert erased.status_code == 200, erased.text
                await events_until(ws, lambda e: e["type"] == "session.erased")
                await ws.close()
                stub = await redis.ttl(keys.task_state(tenant, session, task_id))
                mark = await redis.ttl(keys.session_dedupe(tenant, session, f"erased:{task_id}"))
                assert stub > 0, stub
                assert mark > 0, mark
                lives["enterprise (300 s)" if tenant != week else "7-day timeout"] = (stub, mark)
    finally:
        await redis.aclose()
    wrong = {tier: f"stub {stub} s, mark {mark} s" for tier, (stub, mark) in lives.items()
             if not stub <= mark <= stub + 5}  # fmt: skip
    assert not wrong, f"the erased notice mark does not live as long as the stub: {wrong}"


async def test_a_session_log_expires_after_session_log_ttl_seconds(stack: Stack) -> None:
    """Guard (no other test shortens SESSION_LOG_TTL_SECONDS): a session's log, its events and
    streamed chunks, is gone once the session was quiet for its ttl, here 10 s."""
    redis = redis_client(stack.redis_server)
    tenant, session = unique("t"), unique("s")
    log = keys.session_log(tenant, session)
    try:
        async with httpx.AsyncClient() as http:
            ws, _ = await connect(stack.api.ws_url, tenant, session)
            body = {"message": "hello there", "stream": True, "session_id": session}
            reply = await send(http, stack.api.url, tenant, body)
            await events_until(ws, final_of(reply.json()["task_id"]))
            await ws.close()
        assert await redis.xlen(log) > 2
        assert 0 < await redis.pttl(log) <= LOG_TTL * 1000

        async def gone() -> bool:
            return not await redis.exists(log)

        await until(gone, "the session log to expire", timeout=LOG_TTL + 3, step=0.25)
    finally:
        await redis.aclose()


async def _added(redis: Redis, stream: str) -> int:
    return int((await redis.xinfo_stream(stream))["entries-added"])


async def test_repeated_erasures_of_a_session_do_not_refill_the_shared_cancel_stream(
    stack: Stack,
) -> None:
    """README "For AES teams": `{aes}:cancel` is read in full by every AES instance and keeps
    the last ~10 000 notices; a repeated cancel "adds it again (once per 10 s)", so that a
    client repeating a request cannot fill the stream every tenant's cancels share. A
    client repeating `DELETE /api/sessions/{id}` of a session whose running task was erased
    expects the same: the task was cancelled once. Every DELETE added the task's
    `chat.cancel` again (and its record to `{persist}:records`), as long as the task's stub
    lived (TASK_TTL_SECONDS past its deadline): a loop of DELETEs pushed other tenants'
    notices out of the ~10 000 an executor reclaiming an entry looks in. Found by the Redis
    keys review."""
    redis = redis_client(stack.redis_server)
    tenant, session = unique("t"), unique("s")
    repeats = 20
    try:
        async with httpx.AsyncClient() as http:
            ws, _ = await connect(stack.api.ws_url, tenant, session)
            body = {"message": "long", "session_id": session, "context": STALL}
            await send(http, stack.api.url, tenant, body)
            await events_until(ws, lambda e: e["type"] == "chat.status")
            url = f"{stack.api.url}/api/sessions/{session}"
            first = await http.delete(url, headers=auth(tenant))
            assert first.status_code == 200, first.text
            await events_until(ws, lambda e: e["type"] == "session.erased")
            await ws.close()
            before = await _added(redis, keys.CANCEL_STREAM)
            records_before = await _added(redis, keys.PERSIST_RECORDS)
            answers = []
            for _ in range(repeats):
                answers.append((await http.delete(url, headers=auth(tenant))).status_code)
            added = await _added(redis, keys.CANCEL_STREAM) - before
            records = await _added(redis, keys.PERSIST_RECORDS) - records_before
    finally:
        await redis.aclose()
    assert (added, records) == (0, 0), (
        f"{repeats} repeated DELETEs of an erased session (answered {sorted(set(answers))}) "
        f"added {added} chat.cancel notices of its one task to the shared {keys.CANCEL_STREAM} "
        f"(and {records} records to {keys.PERSIST_RECORDS})"
    )
