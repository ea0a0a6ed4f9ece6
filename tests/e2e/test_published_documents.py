"""What a client team gets on a real deployment (api, worker, executor, Valkey, PostgreSQL)
when it trusts our published documents: the OpenAPI document's declared answers of the read
operations, and the AES actions our processes really write, against schemas/."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from jsonschema import Draft202012Validator, FormatChecker
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, events_until, unique
from tests.e2e.conftest import Deployment, deploy
from tests.e2e.test_metrics import scrape, total
from tests.e2e.test_openapi_document import fetch_document, violations

pytestmark = pytest.mark.e2e

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
STREAMS = [f"{{aes}}:actions:{p}" for p in ("high", "normal", "low")]
CANCELS = "{aes}:cancel"
WATCHER = "published-documents"  # a group that reads nothing: the worker's trim keeps every entry


@dataclass
class Live:
    deployment: Deployment
    redis: RedisServer
    postgres: PostgresServer
    doc: dict[str, Any]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A pool of two connections, so a tenant's share of it is one, and a one-second wait
    for it: a second concurrent read of a tenant gets its 429 in a second."""
    redis = RedisServer().start()
    postgres = PostgresServer(durable=False).start()
    try:
        asyncio.run(migrate(postgres.url()))
        asyncio.run(_watch_aes_streams(redis.url))
        with deploy(
            redis,
            tmp_path_factory.mktemp("published-documents-logs"),
            database_url=postgres.url(),
            database_pool_size="2",
            database_connect_timeout_seconds="1",
            executor_chunk_delay_ms="2",
            retry_backoff_seconds="0.05",
            retry_backoff_max_seconds="0.1",
        ) as deployed:
            yield Live(deployed, redis, postgres, fetch_document(deployed.api.url))
    finally:
        postgres.cleanup()
        redis.cleanup()


async def _watch_aes_streams(url: str) -> None:
    redis = Redis.from_url(url)
    for stream in STREAMS:
        await redis.xgroup_create(stream, WATCHER, id="0", mkstream=True)
    await redis.aclose()


@contextlib.asynccontextmanager
async def _locked_tables(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A transaction holding every history table exclusively: reads block in PostgreSQL
    while holding their tenant's share of the api's pool."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(
                "LOCK TABLE sessions, messages, tasks, usage_daily IN ACCESS EXCLUSIVE MODE"
            )
            yield conn
    finally:
        await conn.close()


async def _blocked_reads(conn: asyncpg.Connection, count: int) -> None:
    """Until `count` queries wait on the lock (the api's read holds its share then)."""
    async with asyncio.timeout(10):
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            )
            if waiting >= count:
                return
            await asyncio.sleep(0.02)


READS = {
    "history": ("GET", "/api/sessions/{session_id}/messages", "/api/sessions/s1/messages"),
    "usage": ("GET", "/api/usage", "/api/usage"),
    "erase": ("DELETE", "/api/sessions/{session_id}", "/api/sessions/s1"),
}


@pytest.mark.parametrize(("method", "operation", "path"), READS.values(), ids=READS.keys())
async def test_a_429_of_a_tenants_reads_declares_its_retry_after(
    live: Live, method: str, operation: str, path: str
) -> None:
    """README and the document's own 429 description ("retry after `Retry-After`") say a
    tenant whose reads hold their share of the pool gets 429 `rate_limited` `tenant_reads`
    with `Retry-After`; the api sends it (services/persistence/pool_share.py), but only
    `POST /api/chat/send` declared `Retry-After` on its 429: a client generated from the
    document had no typed header to wait by on these operations."""
    api = live.deployment.api
    headers = auth(unique("reads"))
    counted = {"scope": "tenant_reads"}  # an SRE's "which limit fired" (it counted sends only)
    async with httpx.AsyncClient(base_url=api.url, timeout=20, headers=headers) as http:
        # The pool's connections are made before the tables are locked.
        assert (await http.get("/api/usage")).status_code == 200
        before = total(
            scrape(api.metrics_port), "orchestrator_rate_limit_rejections_total", **counted
        )
        async with _locked_tables(live.postgres.url()) as conn:
            first = asyncio.create_task(http.request(method, path))
            await _blocked_reads(conn, 1)
            second = await http.request(method, path)
        await first
    after = total(scrape(api.metrics_port), "orchestrator_rate_limit_rejections_total", **counted)
    assert after - before == 1
    assert second.status_code == 429, second.text
    assert second.json()["error"]["details"]["scope"] == "tenant_reads", second.text
    assert second.headers.get("retry-after") == "1", dict(second.headers)
    assert violations(live.doc, method, operation, second) == []


def _validator(action_type: str) -> Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{action_type}.json").read_text())
    # jsonschema checks date-time only with rfc3339-validator installed, else passes it.
    assert "date-time" in FormatChecker.checkers, "pip install rfc3339-validator"
    return Draft202012Validator(schema, format_checker=FormatChecker())


async def _actions(redis: Redis, stream: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(stream) or []
    return [json.loads(fields[b"action"]) for _, fields in entries if fields]


def _ended(event: dict[str, Any], open_tasks: set[str]) -> bool:
    """Whether `event` ended the last of `open_tasks` (removing the task it ended)."""
    if event["type"] in {"chat.response", "chat.error", "chat.cancelled"}:
        open_tasks.discard(event.get("task_id", ""))
    return not open_tasks


async def test_every_action_our_processes_write_conforms_to_its_schema(live: Live) -> None:
    """Guard: what an AES reads is what schemas/ says, formats (date-time) included, for
    every writer of an action: the api's send (each tier's priority, stream on and off, an
    idempotent replay), the worker's retry, the api's cancel and the worker's timeout
    notice."""
    api = live.deployment.api
    redis = Redis.from_url(live.redis.url)
    store = QuotaStore(redis, load_settings())
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        for tier in ("free", "pro", "enterprise"):
            tenant = unique(tier[:3])
            await store.set(tenant, tier, {"taskTimeoutSeconds": 1})
            ws, _ = await connect(api.ws_url, tenant, "s1")
            sends: list[tuple[dict[str, Any], dict[str, str]]] = [
                ({"message": "plain", "stream": False}, {"Idempotency-Key": "k1"}),
                ({"message": "plain", "stream": False}, {"Idempotency-Key": "k1"}),
                (
                    {
                        "message": "retried",
                        "context": {"simulate": {"fail_attempts": 1, "retryable": True}},
                    },
                    {},
                ),
                ({"message": "cancelled", "context": {"simulate": {"stall": True}}}, {}),
                ({"message": "timed out", "context": {"simulate": {"stall": True}}}, {}),
            ]
            if tier != "free":
                sends.append(({"message": "streamed", "stream": True}, {}))
            ids = []
            for body, extra in sends:
                reply = await http.post(
                    "/api/chat/send",
                    json={"session_id": "s1", **body},
                    headers={**auth(tenant), **extra},
                )
                assert reply.status_code == 202, reply.text
                ids.append(reply.json()["task_id"])
            cancel = await http.post(
                "/api/chat/cancel", json={"task_id": ids[3]}, headers=auth(tenant)
            )
            assert cancel.status_code == 200, cancel.text
            await events_until(ws, functools.partial(_ended, open_tasks=set(ids)))
            await ws.close()
    written = [a for stream in STREAMS for a in await _actions(redis, stream)]
    written += await _actions(redis, CANCELS)
    await redis.aclose()
    kinds = {
        (a["action_type"], a.get("priority"), a.get("attempt"), a.get("reason")) for a in written
    }
    assert ("chat.process", "low", 2, None) in kinds, kinds  # a retry, written by the worker
    assert ("chat.cancel", None, None, "timed out") in kinds, kinds
    assert ("chat.cancel", None, None, "cancelled by client") in kinds, kinds
    problems = [
        f"{action['action_type']} {action}: {error.message}"
        for action in written
        for error in _validator(action["action_type"]).iter_errors(action)
    ]
    assert problems == []


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_statuses() -> set[str]:
    """README's "Task status values: `queued`, ..." line."""
    text = README.read_text()
    line = text[text.index("Task status values:") :].split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", line))


@pytest.mark.parametrize("schema_name", ["TaskView", "Accepted"])
def test_the_document_enumerates_the_task_statuses(live: Live, schema_name: str) -> None:
    """README fixes a task's `status` to seven values, and the document enumerates
    `SessionMessage.status`, but `TaskView.status` (status, tasks) and `Accepted.status` (a
    replayed send answers the task's current status) were a bare `string`: openapi-typescript
    gave `status: string`, so a client's `switch` over the statuses was unchecked and a typo
    (`"canceled"`) compiled."""
    statuses = _readme_statuses()
    assert statuses >= {"queued", "completed", "timed_out"}, statuses
    schemas = live.doc["components"]["schemas"]
    status = schemas[schema_name]["properties"]["status"]
    if "$ref" in status:  # one TaskStatus schema for every body that has a status
        status = schemas[status["$ref"].rsplit("/", 1)[-1]]
    assert set(status.get("enum", [])) == statuses, status
