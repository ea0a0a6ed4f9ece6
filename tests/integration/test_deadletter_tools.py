"""What an SRE meets with `orchestrator deadletters`, found in review: a replay cut off between
its re-add and its delete (then run again, as the SRE is told), concurrent replays, the
persistence writer's dead letters as the table shows them, and ids Redis cannot hold."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.cli.embedded import LocalCluster, LocalSentinel, RedisServer
from services.cli.stack import LocalStack
from services.core import deadletters, keys
from services.core.actions import ACTION_FIELD
from services.core.deadletters import (
    ReplayOutcome,
    is_entry_id,
    list_dead_letters,
    replay_all_dead_letters,
    replay_dead_letters,
)
from services.core.errors import InvalidInput
from services.core.redis_client import create_redis
from services.core.settings import Settings, load_settings
from services.persistence.records import publish_record
from tests.integration.test_worker_deadletter_flow import cli
from tests.integration.worker_helpers import add_send, messages, send_action, wait_for
from tests.persistence.conftest import (  # noqa: F401 (fixtures)
    database_url,
    engine,
    eventually,
    make_record,
    postgres_server,
    settings,
)
from tests.persistence.test_writer import drained, running


async def add_dead_letter(redis: Redis, stream: str, action: bytes, **fields: str) -> str:
    """A dead letter as `streams.dead_letter` writes it; its id."""
    record = {
        "stream": stream, "entry_id": "1-0", "group": "workers",
        "reason": "handler failed: x", "at": "2026-11-27T00:00:00Z", ACTION_FIELD: action,
    } | fields  # fmt: skip
    entry = await redis.xadd(keys.DEAD_LETTERS, record)  # type: ignore[arg-type]
    return entry.decode() if isinstance(entry, bytes) else str(entry)


# -- a replay run again after it failed half way ------------------------------------------


async def test_a_replay_retried_after_it_failed_half_way_delivers_the_send_once(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    session = f"s{uuid.uuid4().hex[:8]}"
    await redis.set(keys.session_log("acme", session), "not a stream")
    stack = LocalStack.for_redis(
        redis_url, log_dir=tmp_path, callback_partitions="1", worker_sleep_seconds="0.2",
        max_delivery_attempts="2", log_level="WARNING", metrics_port="0",
    )  # fmt: skip
    user = f"ops{uuid.uuid4().hex[:6]}"
    try:
        stack.start("worker", pod_name="w1")
        bad = await add_send(redis, 0, "acme", session, 1)

        async def letter() -> str | None:
            for entry_id, fields in await redis.xrange(keys.DEAD_LETTERS):
                if fields.get(b"entry_id", b"").decode() == bad:
                    return str(entry_id.decode())
            return None

        async def dead_lettered() -> bool:
            return await letter() is not None

        await wait_for(dead_lettered, timeout=30)
        dead = await letter()
        assert dead is not None
        await redis.delete(keys.session_log("acme", session))  # the cause is fixed

        # Redis accepts the re-add, then fails the delete (an ACL that refuses XDEL, standing
        # in for a failover or a dropped connection between the two steps).
        await redis.execute_command(
            "ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-xdel"
        )
        host_port = redis_url.split("://", 1)[1].split("/", 1)[0].split("@")[-1]
        first = cli(f"redis://{user}:pw@{host_port}/0", "replay", dead)
        assert first.returncode == 1, (first.stdout, first.stderr)  # the SRE is told...
        said = first.stdout + first.stderr
        assert f"re-added, not deleted {dead}" in said, said
        assert "again is safe" in said, said
        second = cli(redis_url, "replay", dead)  # ...and, as told, replays again
        assert second.returncode == 0, second.stderr
        assert "already re-added by an earlier replay" in second.stdout, second.stdout
        assert await redis.xlen(keys.DEAD_LETTERS) == 0

        async def delivered() -> bool:
            return await messages(redis, "acme", session) != []

        await wait_for(delivered, timeout=30)
        await add_send(redis, 0, "acme", session, 2)

        async def after() -> bool:
            return 2 in await messages(redis, "acme", session)

        await wait_for(after, timeout=30)
        assert await messages(redis, "acme", session) == [1, 2], (
            "the replayed websocket.send reached the client twice; first replay said: " + said
        )
    finally:
        stack.stop()
        await redis.execute_command("ACL", "DELUSER", user)


async def test_concurrent_replays_of_all_dead_letters_re_add_each_action_once(
    redis: Redis,
) -> None:
    origin = keys.callback_stream(2)
    ids = [await add_dead_letter(redis, origin, send_action("acme", "s1", n)) for n in range(20)]

    first, second = await asyncio.gather(
        replay_all_dead_letters(redis, batch=3), replay_all_dead_letters(redis, batch=3)
    )

    assert await redis.xlen(origin) == len(ids)
    assert await redis.xlen(keys.DEAD_LETTERS) == 0
    assert all(result.ok for result in [*first, *second])


@pytest.fixture(scope="module")
def sentinel() -> Iterator[LocalSentinel]:
    deployment = LocalSentinel().start()
    yield deployment
    deployment.cleanup()


@pytest.fixture(params=["standalone", "sentinel", "cluster"])
def server(request: pytest.FixtureRequest) -> RedisServer | LocalCluster | LocalSentinel:
    name = {"standalone": "redis_server", "sentinel": "sentinel", "cluster": "redis_cluster"}
    found: RedisServer | LocalCluster | LocalSentinel
    found = request.getfixturevalue(name[request.param])
    return found


@pytest.fixture
async def client(server: RedisServer | LocalCluster | LocalSentinel) -> AsyncIterator[Redis]:
    redis = create_redis(load_settings(redis_url=server.url, **server.client_settings()))
    await redis.flushall()
    yield redis
    await redis.aclose()


@pytest.mark.parametrize("origin", [keys.callback_stream(5), "legacy:actions"])
async def test_a_replay_whose_delete_was_lost_re_adds_nothing_when_run_again(
    client: Redis, origin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On each topology: the mark shares the origin's slot (a tagged name or a bare one)."""
    action = send_action("acme", "s1", 1)
    dead = await add_dead_letter(client, origin, action)
    mark = deadletters.replay_mark_key(origin, dead)
    assert mark is not None
    assert key_slot(mark.encode()) == key_slot(origin.encode())

    async def lost(*_: Any) -> int:
        raise RedisConnectionError("Connection lost")

    with monkeypatch.context() as patch:
        patch.setattr(client, "xdel", lost)
        [cut] = await replay_dead_letters(client, [dead])
    assert cut.outcome is ReplayOutcome.not_deleted, cut
    assert cut.detail is not None
    assert "again is safe" in cut.detail
    [again] = await replay_dead_letters(client, [dead])

    assert again.outcome is ReplayOutcome.replayed, again
    assert again.new_id == cut.new_id, again
    assert [fields for _, fields in await client.xrange(origin)] == [
        {ACTION_FIELD.encode(): action}
    ]
    assert await client.xlen(keys.DEAD_LETTERS) == 0
    assert 0 < await client.ttl(mark) <= 7 * 24 * 3600


async def test_replay_all_stops_at_a_batch_whose_delete_failed(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = keys.callback_stream(1)
    ids = [await add_dead_letter(redis, origin, send_action("acme", "s1", n)) for n in range(5)]

    async def lost(*_: Any) -> int:
        raise RedisConnectionError("Connection lost")

    monkeypatch.setattr(redis, "xdel", lost)
    results = await replay_all_dead_letters(redis, batch=2)

    assert [(r.id, r.outcome) for r in results] == [(i, ReplayOutcome.not_deleted) for i in ids[:2]]
    assert await redis.xlen(origin) == 2


# -- the persistence writer's dead letters in the table --------------------------------------


@contextlib.asynccontextmanager
async def refused_record(
    redis: Redis,
    settings: Settings,  # noqa: F811
    engine: AsyncEngine,  # noqa: F811
) -> AsyncIterator[None]:
    """A DBA's CHECK constraint makes PostgreSQL refuse the record of task `poison` (tenant
    `globex`): the real writer dead-letters it."""
    async with engine.begin() as conn:
        await conn.execute(
            text("ALTER TABLE tasks ADD CONSTRAINT no_poison CHECK (task_id <> 'poison')")
        )
    try:
        await publish_record(redis, make_record("poison", tenant_id="globex"))
        async with running(redis, settings, engine):
            await eventually(lambda: drained(redis), what="backlog drained")
        assert await redis.xlen(keys.DEAD_LETTERS) == 1
        yield
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE tasks DROP CONSTRAINT IF EXISTS no_poison"))


@pytest.fixture
async def one_refused(
    redis: Redis,
    settings: Settings,  # noqa: F811
    engine: AsyncEngine,  # noqa: F811
) -> AsyncIterator[None]:
    async with refused_record(redis, settings, engine):
        yield


async def test_the_stored_reason_is_postgresql_s_message_with_sqlstate_and_constraint(
    redis_url: str, one_refused: None
) -> None:
    [letter] = json.loads(cli(redis_url, "list", "--json").stdout)
    assert letter["reason"] == (
        'refused by the database (SQLSTATE 23514, constraint "no_poison"): '
        'new row for relation "tasks" violates check constraint "no_poison"'
    )
    assert letter["task"] == "globex/poison"


async def test_list_table_says_what_postgresql_refused(redis_url: str, one_refused: None) -> None:
    listed = cli(redis_url, "list")
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if keys.PERSIST_RECORDS in line]
    assert 'SQLSTATE 23514, constraint "no_poison"' in row, row
    assert "sqlalchemy" not in row, row


async def test_list_table_names_the_task_and_tenant_of_a_dead_letter(
    redis_url: str, one_refused: None
) -> None:
    listed = cli(redis_url, "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["ID", "AT", "STREAM", "ACTION_TYPE", "TASK", "REASON"]
    assert row.split()[4] == "globex/poison", listed.stdout


async def test_the_task_column_is_a_dash_when_the_action_names_no_tenant(
    redis: Redis, redis_url: str
) -> None:
    await add_dead_letter(redis, keys.callback_stream(0), b"{not json")
    await add_dead_letter(redis, keys.callback_stream(0), send_action("acme", "s1", 1))
    rows = cli(redis_url, "list").stdout.splitlines()[1:3]
    assert [row.split()[4] for row in rows] == ["-", "acme/-"]


# -- ids Redis cannot hold --------------------------------------------------------------------


async def test_an_id_beyond_64_bits_is_refused_as_a_bad_argument_like_any_malformed_id(
    redis: Redis, redis_url: str
) -> None:
    good = await add_dead_letter(redis, keys.callback_stream(0), send_action("acme", "s1", 1))
    typo = "99999999999999999999-0"  # 20 digits, beyond a stream id's 64-bit part
    done = cli(redis_url, "replay", good, typo)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert typo in done.stderr, done.stderr
    assert await redis.xlen(keys.DEAD_LETTERS) == 1  # nothing done


async def test_each_part_of_an_entry_id_must_fit_in_64_bits(redis: Redis) -> None:
    top = 2**64 - 1
    assert is_entry_id(f"{top}-{top}")
    assert is_entry_id("0-0")
    assert not is_entry_id(f"{top + 1}-0")
    assert not is_entry_id(f"0-{top + 1}")
    with pytest.raises(InvalidInput):
        await list_dead_letters(redis, after=f"{top + 1}-0")
    with pytest.raises(InvalidInput):
        await replay_dead_letters(redis, [f"1-{top + 1}"])


# -- a dead letter nobody can fix ----------------------------------------------------------------


async def test_discard_drops_only_the_named_dead_letters_and_re_adds_nothing(
    redis: Redis, redis_url: str
) -> None:
    """A dead letter judged unfixable was sent round again by every `replay --all`, and only a
    replay could delete it: `discard` deletes it and nothing reaches its stream."""
    origin = keys.callback_stream(0)
    poison = await add_dead_letter(redis, origin, b"{not json")
    kept = await add_dead_letter(redis, origin, send_action("acme", "s1", 1))
    before = await redis.xlen(origin) if await redis.exists(origin) else 0
    done = cli(redis_url, "discard", poison)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stdout.splitlines() == [f"discarded {poison}"]
    assert [letter.id for letter in await list_dead_letters(redis)] == [kept]
    assert (await redis.xlen(origin) if await redis.exists(origin) else 0) == before
    again = cli(redis_url, "discard", poison, kept)
    assert again.returncode == 1, again.stdout  # one of them is gone: say so
    assert again.stdout.splitlines() == [f"not found {poison}", f"discarded {kept}"]
    assert await redis.xlen(keys.DEAD_LETTERS) == 0


async def test_discard_refuses_a_malformed_id_before_deleting_anything(
    redis: Redis, redis_url: str
) -> None:
    good = await add_dead_letter(redis, keys.callback_stream(0), send_action("acme", "s1", 1))
    done = cli(redis_url, "discard", good, "yesterday")
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "yesterday" in done.stderr
    assert await redis.xlen(keys.DEAD_LETTERS) == 1
