"""Client-visible events (server -> client frames) and their wire form.

A frame is `{"id": ..., "type": ..., "task_id"?: ..., "data": {...}}`. Session events get their
id from the session log when they are appended, so they are encoded here *without* the id:
`event_body()` returns the JSON text after the opening brace, and `frame_with_id()` puts the two
together (in Python or in the Lua script that appends and publishes). The api forwards frames
as text without decoding them.
"""

from __future__ import annotations

import re
from typing import Any, Final

import msgspec

CONNECTION_ACK: Final = "connection.ack"
CHAT_STATUS: Final = "chat.status"
CHAT_CHUNK: Final = "chat.chunk"
CHAT_RESPONSE: Final = "chat.response"
CHAT_ERROR: Final = "chat.error"
CHAT_CANCELLED: Final = "chat.cancelled"
SESSION_ERASED: Final = "session.erased"
MESSAGE: Final = "message"
PONG: Final = "pong"
ERROR: Final = "error"

_encoder = msgspec.json.Encoder()

NO_EVENT_ID = "0-0"
_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # ASCII digits; str.isdigit takes "²"
_UINT64_MAX = 2**64 - 1


class Event(msgspec.Struct, omit_defaults=True):
    type: str
    data: dict[str, Any]
    task_id: str | None = None


def event_body(event_type: str, data: dict[str, Any], task_id: str | None = None) -> str:
    """The frame without its id: the JSON text after `{`, ready to be prefixed by the id."""
    return _encoder.encode(Event(event_type, data, task_id)).decode()[1:]


def frame_with_id(event_id: str, body: str) -> str:
    return '{"id":"' + event_id + '",' + body


def frame(event_id: str, event_type: str, data: dict[str, Any], task_id: str | None = None) -> str:
    return frame_with_id(event_id, event_body(event_type, data, task_id))


def frame_id(text: str) -> str:
    """The id of a frame produced by `frame_with_id`, read without decoding the JSON."""
    end = text.index('"', 7)
    return text[7:end]


def parse_event_id(event_id: str) -> tuple[int, int]:
    """Stream ids order events; `ValueError` for anything that is not `<ms>-<seq>` with two
    unsigned 64-bit numbers (what Redis accepts: an id it refuses would surface as an
    internal error of the command it was passed to)."""
    match = _EVENT_ID.fullmatch(event_id)
    if match is None:
        raise ValueError(f"not an event id: {event_id!r}")
    millis, seq = int(match[1]), int(match[2])
    if millis > _UINT64_MAX or seq > _UINT64_MAX:
        raise ValueError(f"not an event id: {event_id!r}")
    return millis, seq
