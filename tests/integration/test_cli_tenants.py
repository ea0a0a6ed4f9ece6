"""`orchestrator tenants ...` and `orchestrator deadletters ...` run as real processes against a
real Redis: what they print, their exit codes, and what they leave in Redis."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from services.core import keys
from services.core.deadletters import count_dead_letters, list_dead_letters
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from services.core.tenant_sockets import TenantSockets
from services.core.tiers import DEFAULT_TIERS
from services.core.usage import UsageCounter
from services.operator.claims import TenantClaims
from services.operator.reconcile import QuotaReconciler, ResourceRef
from tests.integration.test_deadletters import ORIGIN, chunk, make_dead_letter, read_new

COMMAND_TIMEOUT = 60.0
ANNOUNCEMENT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def orchestrator(redis_url: str, *args: str) -> Run:
    """Run `orchestrator ARGS` in a fresh process that sees only this test's Redis."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        *args,
        env={"PATH": os.environ.get("PATH", ""), "ORCHESTRATOR_REDIS_URL": redis_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def store_of(redis: Redis) -> QuotaStore:
    return QuotaStore(redis, load_settings(), tiers=DEFAULT_TIERS)


# --- tenants ------------------------------------------------------------------------------


async def test_tenants_set_stores_the_record_and_prints_it_with_the_effective_limits(
    redis: Redis, redis_url: str
) -> None:
    run = await orchestrator(
        redis_url,
        "tenants",
        "set",
        "acme",
        "--tier",
        "pro",
        "--limit",
        "maxConnections=10",
        "--limit",
        "tokensPerDay=unlimited",
        "--allowed-agents",
        "support,sales",
    )

    assert (run.code, run.stderr) == (0, "")
    printed = run.json()
    assert printed["tenantId"] == "acme"
    assert printed["tier"] == "pro"
    assert printed["limits"] == {"maxConnections": 10, "tokensPerDay": None}
    assert printed["allowedAgents"] == ["support", "sales"]
    effective = printed["effective"]
    assert effective["tier"] == "pro"
    assert effective["limits"] == {
        **DEFAULT_TIERS["pro"].to_dict(),
        "maxConnections": 10,
        "tokensPerDay": None,
        "allowedAgents": ["support", "sales"],
    }
    stored = await store_of(redis).get("acme")
    assert stored is not None
    assert (stored.tier, stored.limits, stored.allowed_agents) == (
        "pro",
        {"maxConnections": 10, "tokensPerDay": None},
        ("support", "sales"),
    )


async def test_tenants_set_takes_several_limits_after_one_flag(
    redis: Redis, redis_url: str
) -> None:
    """DESIGN writes `[--limit KEY=VALUE ...]`: several pairs after one `--limit` were refused
    ("unrecognized arguments"); only a repeated flag worked. Both work now."""
    run = await orchestrator(
        redis_url,
        "tenants", "set", "acme", "--tier", "pro",
        "--limit", "maxConnections=10", "streaming=false", "--limit", "tokensPerDay=5",
    )  # fmt: skip
    assert (run.code, run.stderr) == (0, "")
    stored = await store_of(redis).get("acme")
    assert stored is not None
    assert stored.limits == {"maxConnections": 10, "streaming": False, "tokensPerDay": 5}


async def test_tenants_get_prints_the_stored_overrides_and_the_effective_limits(
    redis: Redis, redis_url: str
) -> None:
    written = await orchestrator(
        redis_url, "tenants", "set", "acme", "--tier", "free", "--limit", "streaming=true"
    )

    run = await orchestrator(redis_url, "tenants", "get", "acme")

    assert (run.code, run.stderr) == (0, "")
    printed = run.json()
    assert printed == written.json()
    assert printed["limits"] == {"streaming": True}
    assert printed["allowedAgents"] is None
    assert printed["effective"]["limits"]["streaming"] is True
    assert printed["effective"]["limits"]["maxMessageChars"] == 2_000  # the free tier's


async def test_tenants_list_prints_every_record_as_a_json_array_by_tenant_id(
    redis: Redis, redis_url: str
) -> None:
    empty = await orchestrator(redis_url, "tenants", "list")
    assert (empty.code, empty.json()) == (0, [])

    await store_of(redis).set("zeta", "enterprise")
    await store_of(redis).set("acme", "pro", {"maxConnections": 3})

    run = await orchestrator(redis_url, "tenants", "list")

    assert run.code == 0
    records = run.json()
    assert [(r["tenantId"], r["tier"], r["limits"]) for r in records] == [
        ("acme", "pro", {"maxConnections": 3}),
        ("zeta", "enterprise", {}),
    ]


async def test_tenants_delete_removes_the_record_so_get_then_exits_1(
    redis: Redis, redis_url: str
) -> None:
    await store_of(redis).set("acme", "pro")

    run = await orchestrator(redis_url, "tenants", "delete", "acme")

    assert (run.code, run.json()) == (0, {"tenantId": "acme", "deleted": True})
    assert await store_of(redis).get("acme") is None
    again = await orchestrator(redis_url, "tenants", "delete", "acme")
    assert again.code == 1
    assert again.stdout == ""
    assert (await orchestrator(redis_url, "tenants", "get", "acme")).code == 1


async def test_tenants_get_of_an_unknown_tenant_exits_1_with_one_line_on_stderr(
    redis: Redis, redis_url: str
) -> None:
    run = await orchestrator(redis_url, "tenants", "get", "nobody")

    assert run.code == 1
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        "orchestrator: tenant nobody has no quota record (it gets the default tier 'free')"
    ]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--tier", "platinum"], "unknown tier 'platinum'"),
        (["--tier", "pro", "--limit", "maxConnections=0"], "maxConnections must be"),
        (["--tier", "pro", "--limit", "maxConnections=many"], "maxConnections must be"),
        (["--tier", "pro", "--limit", "fooBar=1"], "fooBar is not a limit"),
        (["--tier", "pro", "--limit", "maxConnections"], "expected KEY=VALUE"),
        (["--tier", "pro", "--limit", "priority=urgent"], "priority must be one of"),
        (["--tier", "pro", "--allowed-agents", "ok,not ok"], "allowed agent 'not ok'"),
    ],
)
async def test_tenants_set_with_an_invalid_tier_or_limit_exits_2_with_one_line_and_writes_nothing(
    redis: Redis, redis_url: str, arguments: list[str], named: str
) -> None:
    run = await orchestrator(redis_url, "tenants", "set", "acme", *arguments)

    assert run.code == 2
    assert run.stdout == ""
    [line] = run.stderr.splitlines()
    assert named in line
    assert await store_of(redis).list() == []


@pytest.mark.parametrize("action", ["set", "get", "delete"])
async def test_an_invalid_tenant_id_exits_2_with_one_line(
    redis: Redis, redis_url: str, action: str
) -> None:
    tier = ["--tier", "pro"] if action == "set" else []

    run = await orchestrator(redis_url, "tenants", action, "not/valid", *tier)

    assert run.code == 2
    [line] = run.stderr.splitlines()
    assert "'not/valid'" in line
    assert "[A-Za-z0-9_-]{1,64}" in line


async def test_tenants_set_announces_the_change_to_the_api_pods(
    redis: Redis, redis_url: str
) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.QUOTA_CHANGES)
    try:
        assert await pubsub.get_message(timeout=ANNOUNCEMENT_TIMEOUT) is not None  # subscribed

        run = await orchestrator(redis_url, "tenants", "set", "acme", "--tier", "enterprise")
        assert run.code == 0

        message = await pubsub.get_message(timeout=ANNOUNCEMENT_TIMEOUT)
        assert message is not None, "no announcement on the quota channel"
        assert (message["type"], message["data"]) == ("message", b"acme")
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


# --- deadletters ---------------------------------------------------------------------------


async def test_deadletters_list_json_prints_every_dead_letter_for_scripts(
    redis: Redis, redis_url: str
) -> None:
    first = await make_dead_letter(redis, chunk(1), reason="handler failed: boom")
    second = await make_dead_letter(redis, None, reason="stream entry has no 'action' field")

    run = await orchestrator(redis_url, "deadletters", "list", "--json")

    assert (run.code, run.stderr) == (0, "")
    printed = run.json()
    assert [letter["id"] for letter in printed] == [first, second]
    assert printed[0]["stream"] == ORIGIN
    assert printed[0]["group"] == "workers"
    assert printed[0]["reason"] == "handler failed: boom"
    assert printed[0]["action_type"] == "execution.chunk"
    assert printed[0]["action"] == chunk(1).decode()
    assert (printed[1]["action"], printed[1]["action_type"]) == ("", None)


async def test_deadletters_list_prints_a_table_with_one_row_per_dead_letter(
    redis: Redis, redis_url: str
) -> None:
    ids = [await make_dead_letter(redis, chunk(seq), reason="x" * 500) for seq in (1, 2, 3)]

    run = await orchestrator(redis_url, "deadletters", "list", "--limit", "2")

    assert run.code == 0
    header, *rows, footer, next_page = run.stdout.splitlines()
    assert header.split() == ["ID", "AT", "STREAM", "ACTION_TYPE", "TASK", "REASON"]
    assert [row.split()[0] for row in rows] == ids[:2]
    assert next_page == f"next page: orchestrator deadletters list --limit 2 --after {ids[1]}"
    assert [row.split()[4] for row in rows] == ["acme/t1"] * 2  # whose dead letter it is
    assert all(ORIGIN in row and "execution.chunk" in row for row in rows)
    assert all(len(row) < 200 for row in rows)  # the long reason is shortened
    assert footer == "2 of 3 dead letter(s); oldest first"


async def test_deadletters_replay_requeues_the_named_ones_and_exits_1_for_an_unknown_id(
    redis: Redis, redis_url: str
) -> None:
    replayed = await make_dead_letter(redis, chunk(1))
    kept = await make_dead_letter(redis, chunk(2))

    run = await orchestrator(redis_url, "deadletters", "replay", replayed, "1-1")

    assert run.code == 1
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"replayed {replayed} -> {ORIGIN} ")
    assert lines[1].startswith("not found 1-1")
    assert lines[-1] == "1 replayed, 1 not replayed"
    assert await read_new(redis, ORIGIN) == [chunk(1)]
    assert [letter.id for letter in await list_dead_letters(redis)] == [kept]


async def test_deadletters_replay_all_requeues_everything_replayable(
    redis: Redis, redis_url: str
) -> None:
    await make_dead_letter(redis, chunk(1))
    await make_dead_letter(redis, chunk(2))

    run = await orchestrator(redis_url, "deadletters", "replay", "--all", "--json")

    assert run.code == 0
    assert [result["outcome"] for result in run.json()] == ["replayed", "replayed"]
    assert await read_new(redis, ORIGIN) == [chunk(1), chunk(2)]
    assert await count_dead_letters(redis) == 0


async def test_deadletters_replay_all_exits_1_and_keeps_a_dead_letter_without_an_action(
    redis: Redis, redis_url: str
) -> None:
    empty = await make_dead_letter(redis, None)

    run = await orchestrator(redis_url, "deadletters", "replay", "--all")

    assert run.code == 1
    assert run.stdout.splitlines() == [
        f"kept {empty}: it has no action to replay",
        "0 replayed, 1 not replayed",
    ]
    assert await count_dead_letters(redis) == 1


@pytest.mark.parametrize(
    "arguments",
    [[], ["--all", "1-1"], ["latest"]],
    ids=["nothing named", "ids and --all", "not an entry id"],
)
async def test_deadletters_replay_with_bad_arguments_exits_2_and_replays_nothing(
    redis: Redis, redis_url: str, arguments: list[str]
) -> None:
    await make_dead_letter(redis, chunk(1))

    run = await orchestrator(redis_url, "deadletters", "replay", *arguments)

    assert run.code == 2
    assert len(run.stderr.splitlines()) == 1
    assert await count_dead_letters(redis) == 1
    assert await redis.xlen(ORIGIN) == 1  # only the original entry, never a copy


async def test_a_tenant_a_tierquota_manages_is_not_written_without_force(
    redis: Redis, redis_url: str
) -> None:
    """`tenants set` on a tenant a TierQuota manages exited 0 and printed the new limits as in
    force; the operator's next tick put the resource's spec back in silence, and deleting the
    resource later removed whatever record the CLI had written. Refused now, naming the
    resource; `--force` writes and warns."""
    reconciler = QuotaReconciler(
        store_of(redis),
        TenantClaims(redis, contender_ttl=180),
        UsageCounter(redis),
        TenantSockets(redis, 30),
    )
    await reconciler.reconcile(
        ResourceRef("billing", "acme-tq"), {"tenantId": "acme", "tier": "pro"}
    )
    for action in (["set", "acme", "--tier", "free"], ["delete", "acme"]):
        refused = await orchestrator(redis_url, "tenants", *action)
        assert refused.code == 1, refused
        assert "managed by TierQuota billing/acme-tq" in refused.stderr, refused
        record = await store_of(redis).get("acme")
        assert record is not None
        assert record.tier == "pro"
    forced = await orchestrator(redis_url, "tenants", "set", "acme", "--tier", "free", "--force")
    assert forced.code == 0, forced
    assert "warning: tenant acme is managed by TierQuota billing/acme-tq" in forced.stderr
    record = await store_of(redis).get("acme")
    assert record is not None
    assert record.tier == "free"


async def test_tenants_get_names_what_of_a_record_is_not_applied(
    redis: Redis, redis_url: str
) -> None:
    """A stored override this version cannot use keeps the tier's value (README). `tenants get`
    printed only "quota record override not applied; the tier's value is used": not which
    limit, nor why, nor which tier was unknown (the details were in the log record's extra
    fields, which only the services' JSON log shows). Found by the tenancy review."""
    records = {
        "over": {"tier": "pro", "limits": {"maxConnections": 99_999_999_999}},
        "gone": {"tier": "team", "limits": {}},  # a tier removed from the configuration
    }
    for tenant, record in records.items():
        stored = {"tenantId": tenant, "allowedAgents": None,
                  "updatedAt": "2026-01-01T00:00:00Z", **record}  # fmt: skip
        await redis.set(keys.tenant_quota(tenant), json.dumps(stored))
        await redis.sadd(keys.QUOTA_TENANTS, tenant)
    over = await orchestrator(redis_url, "tenants", "get", "over")
    assert over.code == 0, over
    assert json.loads(over.stdout)["effective"]["limits"]["maxConnections"] == 200
    assert "override maxConnections not applied" in over.stderr, over.stderr
    gone = await orchestrator(redis_url, "tenants", "get", "gone")
    assert gone.code == 0, gone
    assert "names tier 'team', unknown here; the default tier 'free' is used" in gone.stderr


async def test_tenants_set_refuses_a_tier_the_apis_serve_otherwise(
    redis: Redis, redis_url: str
) -> None:
    """The CLI knew only the tier table of its own shell: run without the installation's
    ORCHESTRATOR_TIERS it wrote a tier the apis do not have and printed it as in force, and
    the apis served the tenant their default tier (streaming refused); a tier only the
    installation defines was "unknown" with the CLI's list. The apis record their table at
    start; `set` compares the tier with it (exit 2 when the record would name a tier they do
    not have or the command does not know; a warning when only the limits differ). Found by
    the tenancy review."""
    pro = DEFAULT_TIERS["pro"]
    served = {
        **DEFAULT_TIERS,
        "team": pro,  # a tier of the installation's own
        "pro": msgspec.structs.replace(pro, max_connections=pro.max_connections + 1),
    }
    settings = load_settings(redis_url=redis_url)
    await QuotaStore(redis, settings, tiers=served).publish_tiers()
    refused = await orchestrator(redis_url, "tenants", "set", "acme", "--tier", "team")
    assert refused.code == 2, refused
    assert "the apis have a tier 'team', this command's tier table has not" in refused.stderr
    assert "ORCHESTRATOR_TIERS" in refused.stderr
    assert await store_of(redis).get("acme") is None  # nothing written
    # The same tier with other limits: the record is right (the apis apply their own
    # table), only the limits the command prints are not theirs: said, and written.
    warned = await orchestrator(redis_url, "tenants", "set", "acme", "--tier", "pro")
    assert warned.code == 0, warned
    assert "the apis define tier 'pro' with other limits than this command" in warned.stderr
    await QuotaStore(redis, settings, tiers=DEFAULT_TIERS).publish_tiers()  # the same table
    accepted = await orchestrator(redis_url, "tenants", "set", "acme", "--tier", "pro")
    assert accepted.code == 0, accepted
    assert accepted.stderr == ""
    await redis.delete(keys.INSTALLED_TIERS)
    unknown = await orchestrator(redis_url, "tenants", "set", "acme", "--tier", "team")
    assert unknown.code == 2, unknown  # no table recorded: the command's own check only
    assert "unknown tier 'team'" in unknown.stderr
