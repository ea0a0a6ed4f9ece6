"""History cursors: opaque to clients, validated on the way back in.

A cursor is a position in one session's history (the sort key of a message: its task's final
event id as numbers, then its part) and a direction: `before` pages towards older messages,
`after` towards newer ones. It is `v1.` + base64url(JSON); anything else, or a cursor of
another session, is a 400.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import msgspec

from services.core.errors import BadRequest

PREFIX = "v1."
MAX_CURSOR_CHARS = 512

BIGINT_MAX = 2**63 - 1  # the history columns' type: a larger value fails the query
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=BIGINT_MAX)]
Direction = Literal["before", "after"]


class Cursor(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    direction: Direction
    session_id: str
    event_ms: NonNegative
    event_seq: NonNegative
    part: Literal[0, 1]

    @property
    def key(self) -> tuple[int, int, int]:
        return self.event_ms, self.event_seq, self.part


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Cursor)


def encode_cursor(cursor: Cursor) -> str:
    return PREFIX + base64.urlsafe_b64encode(_encoder.encode(cursor)).rstrip(b"=").decode()


def decode_cursor(text: str, session_id: str) -> Cursor:
    """The cursor in `text`, which must belong to `session_id`; `BadRequest` otherwise."""
    if len(text) > MAX_CURSOR_CHARS or not text.startswith(PREFIX):
        raise _malformed()
    body = text.removeprefix(PREFIX)
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        cursor = _decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.MsgspecError):
        raise _malformed() from None
    if cursor.session_id != session_id:
        raise BadRequest("cursor belongs to another session", details={"parameter": "cursor"})
    return cursor


def _malformed() -> BadRequest:
    return BadRequest(
        "malformed cursor: pass back the next_cursor of a previous page unchanged",
        details={"parameter": "cursor"},
    )
