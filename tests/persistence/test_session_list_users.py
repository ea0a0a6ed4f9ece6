"""Who a user is for `GET /api/sessions` (`HistoryStore.sessions_of`): the token's `sub`, as
the api takes it (`TokenVerifier`), through the record the worker builds from the task's state
(`record_from_task`) and the writer, on a real PostgreSQL."""

from __future__ import annotations

import json

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.auth import TokenVerifier, issue_token
from services.core.errors import Unauthorized
from services.core.settings import load_settings
from services.core.tasks import TaskRef
from services.persistence.batch import write_batch
from services.persistence.history import HistoryStore
from services.persistence.records import record_from_task

SECRET = "k" * 32


def finished_state(user_id: str) -> dict[str, str]:
    """A completed task's state hash as the api and worker leave it (the fields the record
    is built from)."""
    return {
        "status": "completed",
        "action": json.dumps({"message": "hello from the sidebar"}),
        "result": json.dumps({"content": "hi"}),
        "agent_id": "default",
        "user_id": user_id,
        "created_at": "2026-03-14T12:00:00Z",
        "updated_at": "2026-03-14T12:00:01Z",
    }


def test_a_token_whose_sub_is_empty_is_refused() -> None:
    """A token with `"sub": ""` was accepted and its messages answered and written, but
    `_identity` turned the empty user id into NULL (`state.get("user_id") or None`) while the
    list looked for `user_id = ''`: that user's sidebar stayed empty for ever. No user is
    nobody: refused as any invalid token."""
    settings = load_settings(jwt_secret=SECRET)
    token = issue_token(settings, tenant_id="acme", user_id="", ttl_seconds=60)
    with pytest.raises(Unauthorized, match="sub must be 1 to 255 characters"):
        TokenVerifier(settings).verify(token)


async def test_subs_that_differ_by_case_or_normalisation_are_different_users(
    engine: AsyncEngine,
) -> None:
    """Guard (passes): "José" in NFC and in NFD, and "jose" / "JOSE", are four users, as
    they are four subjects to the identity provider; none sees another's session (the
    comparison is PostgreSQL's byte equality, not the collation's or Unicode's)."""
    subs = {"nfc": "Jos\u00e9", "nfd": "Jose\u0301", "lower": "jose", "upper": "JOSE"}
    records = [
        record_from_task(TaskRef("acme", f"s-{name}", f"t-{name}"), finished_state(sub))
        for name, sub in subs.items()
    ]
    async with engine.begin() as conn:
        await write_batch(conn, records)
    store = HistoryStore(engine, page_max=20)
    for name, sub in subs.items():
        listed = [s.session_id for s in (await store.sessions_of("acme", sub)).sessions]
        assert listed == [f"s-{name}"], (name, listed)
