"""History cursors: opaque to clients, validated on the way back in.

A cursor is a position in one session's history (the sort key of a message: its task's final
event id as numbers, its task id, then its part) and a direction: `before` pages towards older
messages, `after` towards newer ones. It is `v2.` + base64url(JSON); anything else, or a
cursor of another session, is a 400.

The task id breaks ties between tasks that share an event id: records written without their
final event id sort at their completion millisecond, and a page edge between two such tasks
must not skip the other's rows. `v1.` cursors (no task id, issued before it was added) are
still read, with their old meaning, so a client paging across an upgrade goes on.

The list of a user's sessions (`GET /api/sessions`) pages with cursors of its own (`l1.`):
a position in that list (the session's last message time, in microseconds, and its id).
Each kind of cursor is a 400 where the other is expected.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import msgspec

from services.core.errors import BadRequest
from services.core.ids import ID_PATTERN

PREFIX = "v2."
LEGACY_PREFIX = "v1."
MAX_CURSOR_CHARS = 512

BIGINT_MAX = 2**63 - 1  # the history columns' type: a larger value fails the query
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=BIGINT_MAX)]
Direction = Literal["before", "after"]


TaskId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]


class Cursor(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """`task_id` None: a position between event ids (`after_event_id`, a `v1.` cursor),
    compared on (event_ms, event_seq, part) only."""

    direction: Direction
    session_id: str
    event_ms: NonNegative
    event_seq: NonNegative
    task_id: TaskId | None
    part: Literal[0, 1]


class _LegacyCursor(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    direction: Direction
    session_id: str
    event_ms: NonNegative
    event_seq: NonNegative
    part: Literal[0, 1]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Cursor)
_legacy_decoder = msgspec.json.Decoder(_LegacyCursor)


def encode_cursor(cursor: Cursor) -> str:
    return PREFIX + base64.urlsafe_b64encode(_encoder.encode(cursor)).rstrip(b"=").decode()


def decode_cursor(text: str, session_id: str) -> Cursor:
    """The cursor in `text`, which must belong to `session_id`; `BadRequest` otherwise."""
    if len(text) > MAX_CURSOR_CHARS:
        raise _malformed()
    legacy = text.startswith(LEGACY_PREFIX)
    if not legacy and not text.startswith(PREFIX):
        raise _malformed()
    body = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        if legacy:
            old = _legacy_decoder.decode(raw)
            cursor = Cursor(
                old.direction, old.session_id, old.event_ms, old.event_seq, None, old.part
            )
        else:
            cursor = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.MsgspecError):
        raise _malformed() from None
    if cursor.session_id != session_id:
        raise BadRequest("cursor belongs to another session", details={"parameter": "cursor"})
    return cursor


LIST_PREFIX = "l1."
# The microseconds since the epoch a Python datetime can hold (years 1 to 9999): a cursor's
# time becomes one before it reaches the query.
MICROS_MIN = -62_135_596_800_000_000
MICROS_MAX = 253_402_300_799_999_999
Micros = Annotated[int, msgspec.Meta(ge=MICROS_MIN, le=MICROS_MAX)]


class ListCursor(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """The last session of a page of `GET /api/sessions`: the next page holds the sessions
    after it in the list's order (last message time, newest first, then session id,
    descending). The time is in whole microseconds, PostgreSQL's precision, so the next
    page's bound is exactly the value the session sorted on."""

    last_message_us: Micros
    session_id: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]


_list_decoder = msgspec.json.Decoder(ListCursor)


def encode_list_cursor(cursor: ListCursor) -> str:
    return LIST_PREFIX + base64.urlsafe_b64encode(_encoder.encode(cursor)).rstrip(b"=").decode()


def decode_list_cursor(text: str) -> ListCursor:
    """The session list cursor in `text`; `BadRequest` (400, as a history cursor) otherwise."""
    if len(text) > MAX_CURSOR_CHARS or not text.startswith(LIST_PREFIX):
        raise _malformed()
    body = text[len(LIST_PREFIX) :]
    try:
        return _list_decoder.decode(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError, msgspec.MsgspecError):
        raise _malformed() from None


def _malformed() -> BadRequest:
    return BadRequest(
        "malformed cursor: pass back the next_cursor of a previous page unchanged",
        details={"parameter": "cursor"},
    )
