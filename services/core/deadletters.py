"""Reading and replaying the dead-letter stream (`keys.DEAD_LETTERS`).

`streams.dead_letter` moves an entry that could not be handled to `{dlq}:actions` with the
fields `stream` (where it came from), `entry_id`, `group`, `reason`, `at` and `action` (the
raw action JSON, empty when the entry had none). This module is what `orchestrator deadletters
list|replay` runs on.

Replaying a dead letter adds its `action` to its origin stream as a new entry (the one field
`action`, as every producer writes it), and only then deletes it from the dead-letter stream.
A crash between the two leaves the dead letter in place after its copy was enqueued: a later
replay enqueues it twice, which the consumers tolerate (effects are idempotent and callbacks
of a superseded attempt are fenced), whereas the other order could lose the action. The two
keys are on different slots, so the steps are separate commands, never one transaction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec
from redis.asyncio import Redis

from services.core import keys
from services.core.actions import ACTION_FIELD
from services.core.errors import InvalidInput

REPLAY_BATCH = 100
"""Dead letters read, re-added and deleted per round trip when replaying all of them."""

_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


def is_entry_id(text: str) -> bool:
    """True for a complete stream entry id (`<milliseconds>-<sequence>`)."""
    return _ENTRY_ID.fullmatch(text) is not None


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the dead-letter stream, as `streams.dead_letter` wrote it."""

    id: str  # the id in the dead-letter stream
    stream: str  # the stream the entry came from (where a replay puts it back)
    entry_id: str  # its id there
    group: str  # the consumer group that gave up on it
    reason: str
    at: str  # ISO 8601, UTC
    action: bytes  # the raw action JSON; empty when the entry had no action

    @classmethod
    def from_fields(cls, entry_id: bytes | str, fields: dict[Any, Any]) -> DeadLetter:
        def field(name: str) -> bytes | str | None:
            value = fields.get(name.encode())
            return fields.get(name) if value is None else value

        raw = field(ACTION_FIELD)
        return cls(
            id=_text(entry_id),
            stream=_text(field("stream")),
            entry_id=_text(field("entry_id")),
            group=_text(field("group")),
            reason=_text(field("reason")),
            at=_text(field("at")),
            action=raw.encode() if isinstance(raw, str) else (raw or b""),
        )

    @property
    def action_type(self) -> str | None:
        """The action's `action_type` when the action is a JSON object that names one."""
        if not self.action:
            return None
        try:
            document = msgspec.json.decode(self.action)
        except msgspec.DecodeError:
            return None
        if isinstance(document, dict):
            value = document.get("action_type")
            if isinstance(value, str):
                return value
        return None

    @property
    def replayable(self) -> bool:
        return bool(self.action) and bool(self.stream) and self.stream != keys.DEAD_LETTERS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form; `action` is the raw JSON as text (it may be malformed)."""
        return {
            "id": self.id,
            "stream": self.stream,
            "entry_id": self.entry_id,
            "group": self.group,
            "reason": self.reason,
            "at": self.at,
            "action_type": self.action_type,
            "action": _text(self.action),
        }


def _letters(rows: Any) -> list[DeadLetter]:
    """An XRANGE reply as dead letters."""
    return [DeadLetter.from_fields(entry_id, fields or {}) for entry_id, fields in rows or ()]


class ReplayOutcome(StrEnum):
    replayed = "replayed"
    not_found = "not_found"  # no dead letter has that id
    not_replayable = "not_replayable"  # no action, or no origin stream: kept as it is
    failed = "failed"  # the origin stream refused the entry: kept as it is


@dataclass(frozen=True, slots=True)
class ReplayResult:
    id: str  # the dead letter's id
    outcome: ReplayOutcome
    stream: str | None = None  # where it was re-added (or would have been)
    new_id: str | None = None  # its id there, when replayed
    detail: str | None = None  # why it was not replayed

    @property
    def ok(self) -> bool:
        return self.outcome is ReplayOutcome.replayed

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "outcome": str(self.outcome),
            "stream": self.stream,
            "new_id": self.new_id,
            "detail": self.detail,
        }


async def count_dead_letters(redis: Redis) -> int:
    """How many dead letters the stream holds (XLEN)."""
    return int(await redis.xlen(keys.DEAD_LETTERS))


async def list_dead_letters(
    redis: Redis, *, limit: int | None = None, after: str | None = None
) -> list[DeadLetter]:
    """Dead letters oldest first, at most `limit` of them, from after the id `after` on."""
    if after is not None and not is_entry_id(after):
        raise InvalidInput(f"{after[:80]!r} is not a stream entry id")
    start = "-" if after is None else f"({after}"
    return _letters(await redis.xrange(keys.DEAD_LETTERS, min=start, max="+", count=limit))


async def get_dead_letters(redis: Redis, ids: Sequence[str]) -> dict[str, DeadLetter]:
    """The dead letters with these ids (one round trip); ids that match none are absent."""
    for entry_id in ids:
        if not is_entry_id(entry_id):
            raise InvalidInput(f"{entry_id[:80]!r} is not a stream entry id")
    if not ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in ids:
            pipe.xrange(keys.DEAD_LETTERS, min=entry_id, max=entry_id, count=1)
        replies = await pipe.execute()
    found: dict[str, DeadLetter] = {}
    for rows in replies:
        for letter in _letters(rows):
            found[letter.id] = letter
    return found


def _not_replayable(letter: DeadLetter) -> ReplayResult:
    detail = "it names no origin stream" if letter.action else "it has no action to replay"
    return ReplayResult(
        letter.id, ReplayOutcome.not_replayable, stream=letter.stream or None, detail=detail
    )


async def _replay(redis: Redis, letters: Sequence[DeadLetter]) -> list[ReplayResult]:
    """Re-add each replayable letter to its origin, then delete it: two round trips.

    One result per letter, in order. A letter whose re-add fails (say, its origin key now
    holds something that is not a stream) is reported as failed and kept.
    """
    todo = [letter for letter in letters if letter.replayable]
    added: dict[str, ReplayResult] = {}
    if todo:
        async with redis.pipeline(transaction=False) as pipe:
            for letter in todo:
                pipe.xadd(letter.stream, {ACTION_FIELD: letter.action})
            replies = await pipe.execute(raise_on_error=False)
        for letter, reply in zip(todo, replies, strict=True):
            if isinstance(reply, Exception):
                added[letter.id] = ReplayResult(
                    letter.id, ReplayOutcome.failed, letter.stream, detail=str(reply)[:200]
                )
            else:
                added[letter.id] = ReplayResult(
                    letter.id, ReplayOutcome.replayed, letter.stream, _text(reply)
                )
        done = [entry_id for entry_id, result in added.items() if result.ok]
        if done:
            # Only after their copies are acknowledged: a failure above loses nothing.
            await redis.xdel(keys.DEAD_LETTERS, *done)
    return [added.get(letter.id) or _not_replayable(letter) for letter in letters]


async def replay_dead_letters(redis: Redis, ids: Sequence[str]) -> list[ReplayResult]:
    """Replay the dead letters with these ids; one result per distinct id, in the given order.

    Raises `InvalidInput` (before touching anything) when an id is not a stream entry id.
    """
    wanted = list(dict.fromkeys(ids))
    found = await get_dead_letters(redis, wanted)
    by_id = {r.id: r for r in await _replay(redis, [found[i] for i in wanted if i in found])}
    return [
        by_id.get(entry_id)
        or ReplayResult(entry_id, ReplayOutcome.not_found, detail="no dead letter has this id")
        for entry_id in wanted
    ]


async def replay_all_dead_letters(redis: Redis, *, batch: int = REPLAY_BATCH) -> list[ReplayResult]:
    """Replay every dead letter present when the call starts, oldest first, in batches.

    Dead letters added while it runs are left for the next call, so a replayed action that
    fails again cannot keep this loop busy. Unreplayable ones are reported and kept.
    """
    newest = await redis.xrevrange(keys.DEAD_LETTERS, max="+", min="-", count=1)
    if not newest:
        return []
    last = _text(newest[0][0])
    results: list[ReplayResult] = []
    start = "-"
    while True:
        rows = await redis.xrange(keys.DEAD_LETTERS, min=start, max=last, count=batch)
        if not rows:
            return results
        letters = _letters(rows)
        results.extend(await _replay(redis, letters))
        if letters[-1].id == last:
            return results
        start = f"({letters[-1].id}"
