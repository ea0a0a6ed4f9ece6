"""Reading the durable record back: a session's history, usage per day, a task's final state.

Every query filters by tenant first: another tenant's session, task or usage is simply not
there (the api answers 404, as for Redis state). History comes newest last, in pages:

- no cursor: the newest `limit` messages; `next_cursor` (when there are older ones) pages back;
- `after_event_id`: the messages of tasks whose final event came after that session log id
  (ids compared as numbers), oldest first; `next_cursor` pages forward. A client told
  `resumed: false` on reconnect fetches exactly what it missed this way.

A user's sessions (`sessions_of`) are the sessions holding at least one of that user's own
messages, by the time of the latest one (newest first), each with the first as its title.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    and_,
    delete,
    exists,
    func,
    literal_column,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.auth import MAX_SUB_CHARS
from services.core.errors import BadRequest, InvalidInput, Unavailable
from services.core.events import parse_event_id
from services.core.ids import is_valid_id
from services.core.tasks import isoformat
from services.persistence.cursor import (
    BIGINT_MAX,
    Cursor,
    Direction,
    ListCursor,
    decode_cursor,
    decode_list_cursor,
    encode_cursor,
    encode_list_cursor,
)
from services.persistence.pool_share import PoolShare
from services.persistence.schema import messages, sessions, tasks, usage_daily

log = logging.getLogger(__name__)

DEFAULT_PAGE = 50
PAGE_CHARS = 1_000_000
"""A page also ends once its messages' contents hold this many characters (it always has
one message): 200 answers of 32 000 CJK characters made one page of 19 MB, 0.13 s of the
api's event loop for a request of 300 bytes. The next page starts after the last one given."""
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
MAX_USAGE_DAYS = 366
TITLE_CHARS = 100
"""A listed session's title: its user's first message, cut to this many characters (code
points: PostgreSQL's `left()` on UTF-8 text, so never inside a character, nor between the
two UTF-16 halves of an emoji)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _moment(value: datetime | None) -> str | None:
    return None if value is None else isoformat(value)


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    task_id: str
    role: str
    session_id: str
    agent_id: str
    user_id: str | None
    content: str
    status: str
    final_event_id: str | None
    usage: dict[str, Any] | None
    created_at: datetime
    completed_at: datetime
    first_chunk_at: datetime | None
    key: tuple[int, int, int]
    error: dict[str, Any] | None = None  # a task that did not complete: why (its task's)

    @property
    def message_id(self) -> str:
        """Stable and unique per tenant: a task has one message per role."""
        return f"{self.task_id}:{self.role}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "task_id": self.task_id,
            "role": self.role,
            "agent_id": self.agent_id,
            "user_id": self.user_id,
            "content": self.content,
            "status": self.status,
            "final_event_id": self.final_event_id,
            "usage": self.usage,
            "created_at": _moment(self.created_at),
            "completed_at": _moment(self.completed_at),
            "first_chunk_at": _moment(self.first_chunk_at),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Page:
    messages: list[HistoryMessage]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": [message.to_dict() for message in self.messages],
            "next_cursor": self.next_cursor,
        }


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One session of a user's list: the times and count are of that user's own messages."""

    session_id: str
    first_message_at: datetime
    last_message_at: datetime
    messages: int
    title: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "first_message_at": isoformat(self.first_message_at),
            "last_message_at": isoformat(self.last_message_at),
            "messages": self.messages,
            "title": self.title,
        }


@dataclass(frozen=True, slots=True)
class SessionPage:
    sessions: list[SessionSummary]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sessions": [session.to_dict() for session in self.sessions],
            "next_cursor": self.next_cursor,
        }


@dataclass(frozen=True, slots=True)
class DayUsage:
    day: date
    requests: int
    input_tokens: int
    output_tokens: int
    cost: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "tokens": self.input_tokens + self.output_tokens,
            "cost": self.cost,
        }


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task's final state; `to_status()` has the shape of the status endpoints."""

    tenant_id: str
    session_id: str
    task_id: str
    agent_id: str
    status: str
    attempt: int
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    usage: dict[str, Any] | None
    final_event_id: str | None
    created_at: datetime
    updated_at: datetime

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "task_id": self.task_id,
            "status": self.status,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
            "session_id": self.session_id,
            "agent_id": self.agent_id,
            "attempt": self.attempt,
        }
        for name in ("result", "error", "usage"):
            if (value := getattr(self, name)) is not None:
                status[name] = value
        return status


def parse_day(value: str, name: str) -> date:
    """A `YYYY-MM-DD` query parameter; `InvalidInput` (422) naming the parameter otherwise."""
    try:
        if not _DAY.fullmatch(value):  # fromisoformat also takes week dates (2026-W01-1)
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{name} must be a date (YYYY-MM-DD)", details={"parameter": name}
        ) from None


def _require_id(name: str, value: str) -> None:
    if not is_valid_id(value):
        raise InvalidInput(f"{name} must match [A-Za-z0-9_-]{{1,64}}", details={"parameter": name})


def _usage(row: Row[Any]) -> dict[str, Any] | None:
    if row.input_tokens is None:
        return None
    return {
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "model": row.model,
        "cost": float(row.cost),
    }


def _message(row: Row[Any]) -> HistoryMessage:
    return HistoryMessage(
        task_id=row.task_id,
        role=row.role,
        session_id=row.session_id,
        agent_id=row.agent_id,
        user_id=row.user_id,
        content=row.content,
        status=row.status,
        final_event_id=row.final_event_id,
        usage=_usage(row),
        created_at=row.created_at,
        completed_at=row.completed_at,
        first_chunk_at=row.first_chunk_at,
        key=(row.event_ms, row.event_seq, row.part),
        error=None if row.status == "completed" else row.task_error,
    )


def _beyond(position: Cursor, forward: bool) -> ColumnElement[bool]:
    """The rows past `position` in the paging direction. The task id is part of the sort key
    only for cursors that carry one (see `services.persistence.cursor`)."""
    c = messages.c
    if position.task_id is None:
        key = tuple_(c.event_ms, c.event_seq, c.part)
        bound = tuple_(position.event_ms, position.event_seq, position.part)
    else:
        key = tuple_(c.event_ms, c.event_seq, c.task_id, c.part)
        bound = tuple_(position.event_ms, position.event_seq, position.task_id, position.part)
    return key > bound if forward else key < bound


@contextlib.asynccontextmanager
async def _reachable() -> AsyncIterator[None]:
    """PostgreSQL not answering (refused, timed out, the connection lost) is a 503 that names
    it: asyncpg's refusals are `OSError`s, which the api would otherwise take for Redis's."""
    try:
        yield
    except (OSError, OperationalError, InterfaceError, PoolTimeout) as exc:
        log.warning("history store (PostgreSQL) unavailable: %s", type(exc).__name__)
        raise Unavailable("history store (PostgreSQL) unavailable, retry later") from exc
    except DBAPIError as exc:
        if not (exc.connection_invalidated or _refusing(exc)):
            raise
        log.warning("history store (PostgreSQL) connection lost: %s", type(exc).__name__)
        raise Unavailable("history store (PostgreSQL) unavailable, retry later") from exc


# SQLSTATE classes of a server that cannot serve now (connection exception, insufficient
# resources such as too many connections, operator intervention such as a shutdown): asyncpg
# raises them at connect as a plain error, which SQLAlchemy wraps as a generic DBAPIError.
_UNAVAILABLE_CLASSES = frozenset({"08", "53", "57"})


def _refusing(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_CLASSES


def _within_chars(found: list[HistoryMessage]) -> list[HistoryMessage]:
    """The first messages (in reading order) whose contents fit in `PAGE_CHARS`, at least one."""
    total = 0
    for count, message in enumerate(found):
        total += len(message.content)
        if total > PAGE_CHARS and count:
            return found[:count]
    return found


def sessions_query(
    tenant_id: str, user_id: str, limit: int, position: ListCursor | None
) -> Select[Any]:
    """The user's sessions after `position` (`HistoryStore.sessions_of`), at most `limit`.

    The sessions are grouped from the user's messages alone (`messages_user_sessions`: an
    index-only range, one group after the other), the page is cut from those groups, and
    only the page's sessions look up their first message (the head of each one's range)."""
    # The writer stores `user_id` with NUL replaced (PostgreSQL text cannot hold it).
    user_id = user_id.replace("\x00", "\ufffd")
    c = messages.c
    last_at = func.max(c.completed_at)
    per_session = (
        select(
            c.session_id,
            func.min(c.completed_at).label("first_at"),
            last_at.label("last_at"),
            func.count().label("written"),
        )
        .where(
            c.tenant_id == tenant_id,
            c.user_id == user_id,
            c.role == "user",
            # The index's rows (migration 0005), as a literal: the planner proves a partial index
            # from constants only, not from a prepared statement's parameter.
            func.length(c.user_id) <= literal_column(str(MAX_SUB_CHARS)),
        )
        .group_by(c.session_id)
    )
    if position is not None:
        bound = _EPOCH + position.last_message_us * _MICROSECOND
        per_session = per_session.having(
            tuple_(last_at, c.session_id) < tuple_(bound, position.session_id)
        )
    page = per_session.order_by(last_at.desc(), c.session_id.desc()).limit(limit).subquery("page")
    first = messages.alias("first")
    title = (
        select(func.left(first.c.content, TITLE_CHARS))
        .where(
            first.c.tenant_id == tenant_id,
            first.c.user_id == user_id,
            first.c.role == "user",
            func.length(first.c.user_id) <= literal_column(str(MAX_SUB_CHARS)),
            first.c.session_id == page.c.session_id,
        )
        .order_by(first.c.completed_at, first.c.task_id)
        .limit(1)
        .scalar_subquery()
    )
    return select(page, title.label("title")).order_by(
        page.c.last_at.desc(), page.c.session_id.desc()
    )


class HistoryStore:
    """Tenant-scoped reads (and erasure) of the persisted history."""

    def __init__(
        self, engine: AsyncEngine, *, page_max: int = 200, share: PoolShare | None = None
    ) -> None:
        self.engine = engine
        self.page_max = page_max
        self.share = share

    @asynccontextmanager
    async def _connection(self, tenant_id: str, *, begin: bool = False) -> AsyncIterator[Any]:
        """A connection of the pool within the tenant's share of it (`PoolShare`)."""
        async with contextlib.AsyncExitStack() as stack:
            if self.share is not None:
                await stack.enter_async_context(self.share.hold(tenant_id))
            await stack.enter_async_context(_reachable())
            opened = self.engine.begin() if begin else self.engine.connect()
            yield await stack.enter_async_context(opened)

    def _page_size(self, limit: int | None) -> int:
        """`limit`, or DEFAULT_PAGE (the page max if smaller) without one; 422 out of range.
        One check for every paged read, so their refusals are the same."""
        if limit is None:
            return min(DEFAULT_PAGE, self.page_max)
        if not 1 <= limit <= self.page_max:
            raise InvalidInput(
                f"limit must be between 1 and {self.page_max}",
                details={"parameter": "limit", "max": self.page_max},
            )
        return limit

    def _position(
        self, session_id: str, cursor: str | None, after_event_id: str | None
    ) -> Cursor | None:
        if cursor is not None and after_event_id is not None:
            raise BadRequest("pass either cursor or after_event_id, not both")
        if cursor is not None:
            return decode_cursor(cursor, session_id)
        if after_event_id is None:
            return None
        try:
            event_ms, event_seq = parse_event_id(after_event_id)
            if event_ms > BIGINT_MAX:  # a Redis id, but no log's
                raise ValueError(after_event_id)
            # A join mark (`<ms>-<2^64-1>`, what a socket joining a session without events is
            # handed as its cursor) means "after everything of that millisecond": no stored
            # sequence reaches 2^63, so the column type's largest value means the same.
            event_seq = min(event_seq, BIGINT_MAX)
        except ValueError:
            raise BadRequest(
                "after_event_id must be an event id (<milliseconds>-<sequence>)",
                details={"parameter": "after_event_id"},
            ) from None
        return Cursor("after", session_id, event_ms, event_seq, None, 1)

    async def messages(
        self,
        tenant_id: str,
        session_id: str,
        *,
        limit: int | None = None,
        cursor: str | None = None,
        after_event_id: str | None = None,
    ) -> Page:
        """One page of the session's history, newest last (see the module docstring); without
        `limit`, DEFAULT_PAGE or the configured page max if that is smaller."""
        _require_id("tenant_id", tenant_id)
        _require_id("session_id", session_id)
        limit = self._page_size(limit)
        position = self._position(session_id, cursor, after_event_id)
        # The task's error, for the question of a task that did not complete: its reason was
        # in the socket's `chat.error` and in the task's status, not in the history a page
        # shows later (one more request per failed task to say why).
        query = (
            select(messages, tasks.c.error.label("task_error"))
            .select_from(
                messages.outerjoin(
                    tasks,
                    and_(
                        tasks.c.tenant_id == messages.c.tenant_id,
                        tasks.c.task_id == messages.c.task_id,
                    ),
                )
            )
            .where(messages.c.tenant_id == tenant_id, messages.c.session_id == session_id)
        )
        forward = position is not None and position.direction == "after"
        if position is not None:
            query = query.where(_beyond(position, forward))
        order = (messages.c.event_ms, messages.c.event_seq, messages.c.task_id, messages.c.part)
        query = query.order_by(*(order if forward else (c.desc() for c in order)))
        async with self._connection(tenant_id) as conn:
            rows = (await conn.execute(query.limit(limit + 1))).all()
        found = _within_chars([_message(row) for row in rows[:limit]])
        next_cursor = None
        if len(rows) > len(found):
            last = found[-1]
            event_ms, event_seq, part = last.key
            direction: Direction = "after" if forward else "before"
            edge = Cursor(
                direction, session_id, event_ms, event_seq, last.task_id, 1 if part else 0
            )
            next_cursor = encode_cursor(edge)
        if not forward:
            found.reverse()
        return Page(found, next_cursor)

    async def sessions_of(
        self,
        tenant_id: str,
        user_id: str,
        *,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionPage:
        """One page of the sessions in which `user_id` (the token's `sub`) wrote a message
        still in history: newest last message first, ties by session id (descending).

        Only the user's own messages count, for the times, the count and the title, so a
        session another user of the tenant also wrote in shows each of them only their own
        words. An erased session has no messages left, so it is not listed (a message written
        after its erasure lists it again, as the new conversation it is). The times are the
        messages' `completed_at` (when each entered history, as the history endpoint shows
        it); `next_cursor` pages on, and a session whose newest message arrives while a
        client pages moves to the top, out of the pages still to come."""
        _require_id("tenant_id", tenant_id)
        limit = self._page_size(limit)
        position = None if cursor is None else decode_list_cursor(cursor)
        query = sessions_query(tenant_id, user_id, limit + 1, position)
        async with self._connection(tenant_id) as conn:
            rows = (await conn.execute(query)).all()
        found = [
            SessionSummary(row.session_id, row.first_at, row.last_at, row.written, row.title)
            for row in rows[:limit]
        ]
        next_cursor = None
        if len(rows) > limit:
            last = found[-1]
            micros = (last.last_message_at - _EPOCH) // _MICROSECOND
            next_cursor = encode_list_cursor(ListCursor(micros, last.session_id))
        return SessionPage(found, next_cursor)

    async def session_exists(self, tenant_id: str, session_id: str) -> bool:
        """True when the tenant's session has persisted history."""
        _require_id("tenant_id", tenant_id)
        _require_id("session_id", session_id)
        query = select(
            exists().where(messages.c.tenant_id == tenant_id, messages.c.session_id == session_id)
        )
        async with self._connection(tenant_id) as conn:
            return bool(await conn.scalar(query))

    async def delete_session(
        self, tenant_id: str, session_id: str, *, at: datetime | None = None
    ) -> int:
        """Erase the tenant's session history; returns the messages deleted (0: none existed).

        The session keeps a tombstone (`erased_at`): a record of a task created before the
        erasure that is still on its way to the writer writes no history. The erasure counts
        as the session's last activity, so retention keeps the tombstone as long as any other
        recent session row. Usage stays counted. `at`: the erasure's moment on the clock the
        tasks' `created_at` were taken on (Redis's, `services.core.clock`); PostgreSQL's own
        `now()` differed from it by the pods' skew, and an api 60 s ahead let an erased
        conversation back into the history.
        """
        _require_id("tenant_id", tenant_id)
        _require_id("session_id", session_id)
        now: Any = func.now() if at is None else at
        tombstone = insert(sessions).values(
            tenant_id=tenant_id,
            session_id=session_id,
            created_at=now,
            last_activity_at=now,
            erased_at=now,
        )
        tombstone = tombstone.on_conflict_do_update(
            index_elements=[sessions.c.tenant_id, sessions.c.session_id],
            set_={
                "erased_at": now,
                "last_activity_at": func.greatest(sessions.c.last_activity_at, now),
            },
        )
        async with self._connection(tenant_id, begin=True) as conn:
            await conn.execute(tombstone)
            deleted = await conn.execute(
                delete(messages).where(
                    messages.c.tenant_id == tenant_id, messages.c.session_id == session_id
                )
            )
            await conn.execute(
                delete(tasks).where(
                    tasks.c.tenant_id == tenant_id, tasks.c.session_id == session_id
                )
            )
        return int(deleted.rowcount)

    async def usage(self, tenant_id: str, day_from: date, day_to: date) -> list[DayUsage]:
        """The tenant's usage per UTC day in [day_from, day_to]; days without use are absent."""
        _require_id("tenant_id", tenant_id)
        if day_from > day_to:
            raise InvalidInput(
                "from must not be after to",
                details={"from": day_from.isoformat(), "to": day_to.isoformat()},
            )
        if (day_to - day_from).days >= MAX_USAGE_DAYS:
            raise InvalidInput(
                f"at most {MAX_USAGE_DAYS} days per request",
                details={"from": day_from.isoformat(), "to": day_to.isoformat()},
            )
        query = (
            select(usage_daily)
            .where(
                usage_daily.c.tenant_id == tenant_id,
                usage_daily.c.day >= day_from,
                usage_daily.c.day <= day_to,
            )
            .order_by(usage_daily.c.day)
        )
        async with self._connection(tenant_id) as conn:
            rows = (await conn.execute(query)).all()
        return [
            DayUsage(row.day, row.requests, row.input_tokens, row.output_tokens, float(row.cost))
            for row in rows
        ]

    async def task(self, tenant_id: str, task_id: str) -> TaskRecord | None:
        """The task's final state once persisted; None for an unknown or another tenant's."""
        _require_id("tenant_id", tenant_id)
        _require_id("task_id", task_id)
        query = select(tasks).where(tasks.c.tenant_id == tenant_id, tasks.c.task_id == task_id)
        async with self._connection(tenant_id) as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        usage = None
        if row.status == "completed":
            usage = {
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "model": row.model,
                "cost": float(row.cost),
            }
        return TaskRecord(
            tenant_id=row.tenant_id,
            session_id=row.session_id,
            task_id=row.task_id,
            agent_id=row.agent_id,
            status=row.status,
            attempt=row.attempt,
            result=row.result,
            error=row.error,
            usage=usage,
            final_event_id=row.final_event_id,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
