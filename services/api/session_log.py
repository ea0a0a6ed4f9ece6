"""Reading a session's event log for a socket that joins or resumes.

A resume is exact or refused: it succeeds only when provably no event after `last_event_id`
was trimmed, deleted or expired. Otherwise the socket is told `resumed: false` and starts from
the newest event, and the client fetches the task state (or, later, history) for what it
missed.

The proof, from `XINFO STREAM` read in the same transaction as the replay:

- trimming (`MAXLEN ~`) removes entries from the head only, and does *not* move
  `max-deleted-entry-id` (only `XDEL` does). So the replay is whole when `last_event_id` is at or
  after the oldest retained entry (`recorded-first-entry-id`) and no entry after it was deleted.
- an id older than the oldest retained entry is refused, even if it may be the very entry
  trimmed last: the log cannot tell, and a refusal only costs a task-state fetch, while a wrong
  "resumed" would lose events silently. The same holds for an id from an earlier incarnation
  of the log (it expired, or Redis lost its data) or from the future.
- `0-0` ("I have seen nothing") resumes only a log from which nothing was ever removed.
- a socket that joins a session without a log gets a *join mark* as its cursor, not `0-0`:
  `<T-1>-<2^64-1>` for the server time T, after every id the log could have held and before
  every id it can get since. `0-0` could not tell a log that never existed from one that
  expired (or was re-created) while the client was away. A mark resumes when nothing can have
  expired since it was handed out (less than the log's ttl ago) and nothing was ever removed
  from the log now there (all of it came after the mark).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import ClusterDownError, NoScriptError, ResponseError

from services.core import keys
from services.core.events import NO_EVENT_ID, parse_event_id
from services.core.redis_client import is_cluster

_SEQ_MAX = 2**64 - 1
DEFAULT_LOG_TTL_MS = 3_600_000


def join_mark(now_ms: int) -> str:
    """The cursor of a join at server time `now_ms` on a session without a log."""
    return f"{now_ms - 1}-{_SEQ_MAX}"


# Where a new socket starts: its session log's newest event, or a join mark of the log's node's
# time when there is no log. One script: atomic, on the log's own node, and one command (a
# TIME + XINFO pipeline, `read_since`'s way, made a storm of 2 000 new sockets 25% slower).
_JOIN_POINT = """
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #newest > 0 then return newest[1][1] end
local now = redis.call('TIME')
return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
"""
_JOIN_POINT_SHA = hashlib.sha1(_JOIN_POINT.encode()).hexdigest()  # noqa: S324  (Redis's name)


async def join_point(redis: Redis, tenant_id: str, session_id: str) -> str:
    """The cursor of a new socket (no `last_event_id`) of the session, read now: every event
    appended after this read is after it. (By its digest, not a script object registered per
    client: a cache of those kept every client that ever served a join alive.)"""
    log_key = keys.session_log(tenant_id, session_id)
    try:
        reply = await redis.evalsha(_JOIN_POINT_SHA, 1, log_key)
    except NoScriptError:  # a restarted or flushed server: EVAL loads it again
        reply = await redis.eval(_JOIN_POINT, 1, log_key)
    if isinstance(reply, int):
        return join_mark(reply)
    return _text(reply)


def _mark_ms(event_id: str) -> int | None:
    """The server time a join mark was handed out at; None for any other id."""
    millis, seq = parse_event_id(event_id)
    return millis + 1 if seq == _SEQ_MAX else None


_TIME_OF_KEYS_NODE = "return redis.call('TIME')"


async def _now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


REPLAY_PAGE = 1000
"""Events a resume reads and queues at a time. In one read, a resume far back in a long log
(`SESSION_LOG_MAXLEN` allows millions) held the api's event loop for every other client of the
pod while its reply was parsed and queued: 1-2.5 s at 100 000-200 000 events."""


RESUME_GAP = {"code": "resume_gap", "message": "events were lost; fetch the task state"}
"""The `error` event's data when events a socket was owed are gone from the log."""


@dataclass(frozen=True, slots=True)
class Replay:
    resumed: bool | None
    cursor: str
    events: list[tuple[str, str]] = field(default_factory=list)
    more: bool = False  # a full page: the log may hold more after `cursor` (`read_page`)


@dataclass(frozen=True, slots=True)
class Page:
    events: list[tuple[str, str]]
    more: bool
    gap: bool  # events after the cursor were trimmed, deleted or expired since the last page


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _info_field(info: dict[bytes, object], name: str) -> str | None:
    value = info.get(name.encode())
    if isinstance(value, int):
        return str(value)
    return _text(value) if isinstance(value, bytes | str) else None


def _first_entry_id(info: dict[bytes, object]) -> str | None:
    recorded = _info_field(info, "recorded-first-entry-id")
    if recorded is not None:
        return recorded
    first = info.get(b"first-entry")
    if isinstance(first, list | tuple) and first and isinstance(first[0], bytes | str):
        return _text(first[0])
    return None


def _nothing_missing(
    info: dict[bytes, object], last_event_id: str, newest: str, fresh_mark: bool | None
) -> bool:
    """Whether every event of the log after `last_event_id` is still in it (`fresh_mark`: the
    id is a join mark, handed out less than the log's ttl ago; None: not a mark)."""
    after = parse_event_id(last_event_id)
    if after > parse_event_id(newest):
        return False  # not an id of this log
    if after == parse_event_id(newest):
        return True  # up to date: nothing after it, whatever was removed before
    max_deleted = _info_field(info, "max-deleted-entry-id") or NO_EVENT_ID
    if parse_event_id(max_deleted) > after:
        return False
    if last_event_id == NO_EVENT_ID or fresh_mark is not None:
        if fresh_mark is False:
            return False  # a log that expired since may have come and gone
        added, length = _info_field(info, "entries-added"), _info_field(info, "length")
        return added is not None and added == length  # nothing ever trimmed or deleted
    first = _first_entry_id(info)
    return first is not None and parse_event_id(first) <= after


async def _info(redis: Redis, log_key: str) -> dict[bytes, object] | None:
    try:
        info: dict[bytes, object] = await redis.execute_command(  # type: ignore[no-untyped-call]
            "XINFO", "STREAM", log_key
        )
    except ClusterDownError:  # an outage (a cluster node rejoining), not a missing log
        raise
    except ResponseError:  # no such key: never written, or expired
        return None
    return info


async def _time_then_info(redis: Redis, log_key: str) -> tuple[int, dict[bytes, object] | None]:
    """The server's time, then the log's state, in that order.

    A log missing when it is read gets a join mark made of a time taken *before* that read:
    an event appended after the read has a later id than the mark. Read after it (as it was),
    the time could be a millisecond past an event appended in between, whose id then fell
    below the mark: the socket dropped it as already sent (and a resume said exact). One round
    trip on one server; on a cluster two, in order, the time asked of the log's own node (a
    script keyed by the log): TIME alone goes to any node, whose clock may be ahead of the
    one that gives the log's ids, and a new socket's first events then fell below its mark.
    """
    if is_cluster(redis):
        seconds, micros = await redis.eval(_TIME_OF_KEYS_NODE, 1, log_key)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return now_ms, await _info(redis, log_key)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.time()
        pipe.execute_command("XINFO", "STREAM", log_key)
        now, info = await pipe.execute(raise_on_error=False)
    if isinstance(now, Exception):
        raise now
    if isinstance(info, ResponseError):  # no such key: never written, or expired
        info = None
    elif isinstance(info, Exception):
        raise info
    seconds, micros = now
    return int(seconds) * 1000 + int(micros) // 1000, info


async def read_since(
    redis: Redis,
    tenant_id: str,
    session_id: str,
    last_event_id: str | None,
    *,
    partial: bool = False,
    log_ttl_ms: int = DEFAULT_LOG_TTL_MS,
    page: int | None = None,
) -> Replay:
    """The events after `last_event_id` (None: just the cursor of a fresh join).

    A refused resume carries no events and the newest id as its cursor, unless `partial`:
    then it carries what the log still holds after `last_event_id` (a live socket that lost
    its subscription is told of the gap, then given everything that can still be given).
    `log_ttl_ms`: how long the log lives after its last event (ORCHESTRATOR_SESSION_LOG_TTL).
    `page`: at most that many events; `more` says whether `read_page` should go on.
    """
    log_key = keys.session_log(tenant_id, session_id)
    now_ms, info = await _time_then_info(redis, log_key)
    marked = None if last_event_id is None else _mark_ms(last_event_id)
    fresh_mark = None if marked is None else now_ms - marked < log_ttl_ms
    if info is None:
        mark = join_mark(now_ms)
        if last_event_id is None:
            return Replay(None, mark)
        # Nothing to replay: exact from a mark if nothing can have come and gone since it; from
        # `0-0` (a client's "from the start"; the server no longer hands it out) as before.
        return Replay(fresh_mark is True or last_event_id == NO_EVENT_ID, mark)
    newest = _info_field(info, "last-generated-id") or NO_EVENT_ID
    if last_event_id is None:
        return Replay(None, newest)
    if not partial and not _nothing_missing(info, last_event_id, newest, fresh_mark):
        return Replay(False, newest)
    # Read the events and check again in one transaction: a trim in between cannot slip by.
    low = "-" if last_event_id == NO_EVENT_ID else f"({last_event_id}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.execute_command("XINFO", "STREAM", log_key)
        pipe.xrange(log_key, min=low, max="+", count=page)
        info, entries = await pipe.execute(raise_on_error=False)
    if isinstance(entries, Exception):
        raise entries
    if isinstance(info, ResponseError):  # expired in between: everything after is gone
        return Replay(False, join_mark(await _now_ms(redis)))
    if isinstance(info, Exception):
        raise info
    newest = _info_field(info, "last-generated-id") or NO_EVENT_ID
    exact = _nothing_missing(info, last_event_id, newest, fresh_mark)
    if not exact and not partial:
        return Replay(False, newest)
    replayed = [(_text(entry_id), _text(fields[b"e"])) for entry_id, fields in entries or []]
    # Nothing after it: an exact resume stays where it was; a refused one starts from the newest.
    unchanged = last_event_id if exact else newest
    cursor = replayed[-1][0] if replayed else unchanged
    return Replay(exact, cursor, replayed, more=page is not None and len(replayed) == page)


async def read_page(
    redis: Redis, tenant_id: str, session_id: str, cursor: str, *, page: int = REPLAY_PAGE
) -> Page:
    """The next page of a resume after `cursor`, the id of the last event sent.

    Read with `XINFO` in one transaction, as the first page: a trim that reached past
    `cursor` between two pages (a log at its cap while the session is busy) is a `gap`, told
    to the client as after an outage, and the replay goes on with what the log still holds.
    """
    log_key = keys.session_log(tenant_id, session_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.execute_command("XINFO", "STREAM", log_key)
        pipe.xrange(log_key, min=f"({cursor}", max="+", count=page)
        info, entries = await pipe.execute(raise_on_error=False)
    if isinstance(entries, Exception):
        raise entries
    if isinstance(info, ResponseError):  # expired or erased in between
        return Page([], more=False, gap=True)
    if isinstance(info, Exception):
        raise info
    newest = _info_field(info, "last-generated-id") or NO_EVENT_ID
    events = [(_text(entry_id), _text(fields[b"e"])) for entry_id, fields in entries or []]
    return Page(
        events,
        more=len(events) == page,
        gap=not _nothing_missing(info, cursor, newest, None),
    )
