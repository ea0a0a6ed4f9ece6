"""Reading a session's event log for a socket that joins or resumes.

A resume is exact or refused: it succeeds only when no event after `last_event_id` was
trimmed or expired (the stream's `max-deleted-entry-id` says so). Otherwise the socket is
told `resumed: false` and starts from the newest event, and the client fetches the task
state (or, later, history) for what it missed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from redis.asyncio import Redis

from services.core import keys
from services.core.events import NO_EVENT_ID, parse_event_id

REPLAY_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Replay:
    resumed: bool | None
    cursor: str
    events: list[tuple[str, str]] = field(default_factory=list)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _info_field(info: dict[bytes, object], name: str) -> str | None:
    value = info.get(name.encode())
    return _text(value) if isinstance(value, bytes | str) else None


async def read_since(
    redis: Redis, tenant_id: str, session_id: str, last_event_id: str | None
) -> Replay:
    """The events after `last_event_id` (None: just the cursor of a fresh join)."""
    log_key = keys.session_log(tenant_id, session_id)
    if not await redis.exists(log_key):
        if last_event_id is None:
            return Replay(None, NO_EVENT_ID)
        return Replay(last_event_id == NO_EVENT_ID, NO_EVENT_ID)
    info: dict[bytes, object] = await redis.execute_command(  # type: ignore[no-untyped-call]
        "XINFO", "STREAM", log_key
    )
    newest = _info_field(info, "last-generated-id") or NO_EVENT_ID
    if last_event_id is None:
        return Replay(None, newest)
    max_deleted = _info_field(info, "max-deleted-entry-id") or NO_EVENT_ID
    after = parse_event_id(last_event_id)
    if parse_event_id(max_deleted) > after or after > parse_event_id(newest):
        return Replay(False, newest)
    entries = await redis.xrange(log_key, min=f"({last_event_id}", max="+", count=REPLAY_LIMIT)
    replayed = [
        (_text(entry_id), _text(fields[b"e"]))  # type: ignore[arg-type,index]
        for entry_id, fields in entries or []
    ]
    cursor = replayed[-1][0] if replayed else last_event_id
    return Replay(True, cursor, replayed)
