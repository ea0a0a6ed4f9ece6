"""Frames are built and read without decoding the JSON twice."""

from __future__ import annotations

import json

import pytest

from services.core import events


def test_a_frame_with_its_id_is_valid_json() -> None:
    body = events.event_body(events.CHAT_CHUNK, {"delta": 'say "hi"\n', "seq": 1}, "t1")
    text = events.frame_with_id("1700000000000-3", body)
    assert json.loads(text) == {
        "id": "1700000000000-3",
        "type": "chat.chunk",
        "task_id": "t1",
        "data": {"delta": 'say "hi"\n', "seq": 1},
    }
    assert events.frame_id(text) == "1700000000000-3"


def test_event_ids_order_numerically() -> None:
    assert events.parse_event_id("9-1") < events.parse_event_id("10-0")
    for bad in ("", "12", "a-1", "1-b", "1-2-3"):
        with pytest.raises(ValueError, match="event id"):
            events.parse_event_id(bad)
