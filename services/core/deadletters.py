"""Reading and replaying the dead-letter stream (`keys.DEAD_LETTERS`).

`streams.dead_letter` moves an entry that could not be handled to `{dlq}:actions` with the
fields `stream` (where it came from), `entry_id`, `group`, `reason`, `at` and `action` (the
raw action JSON, empty when the entry had none). This module is what `orchestrator deadletters
list|replay|discard` runs on.

Replaying a dead letter adds its `action` to its origin stream as a new entry (the one field
`action`, as every producer writes it), and only then deletes it from the dead-letter stream:
the other order could lose the action. The two keys are on different slots, so the steps are
separate commands, never one transaction, and a replay can be cut off between them (a
failover, a lost connection). Replaying again must then not re-add the action a second time
(a `websocket.send` would reach the client twice): the re-add is a script
(`lua/replay_once.lua`) on the origin stream's slot that also sets a replay mark for the dead
letter's id, and adds nothing when the mark is there. A rerun, or a concurrent replay of the
same dead letter, only deletes it. Marks expire after `REPLAY_MARK_TTL_SECONDS`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib.resources import files
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.core import keys
from services.core.actions import ACTION_FIELD
from services.core.errors import InvalidInput
from services.core.streams import DEAD_LETTER_FIELDS

REPLAY_BATCH = 100
"""Dead letters read, re-added and deleted per round trip when replaying all of them."""

REPLAY_MARK_TTL_SECONDS = 7 * 24 * 3600
"""How long a replay mark stays: far longer than an SRE takes to rerun a failed replay, and
bounded so the marks of old replays do not accumulate in Redis."""

_REPLAY_ONCE = (files("services.core") / "lua" / "replay_once.lua").read_text()

_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_ID_PART_MAX = 2**64 - 1  # each part of a stream id is an unsigned 64-bit integer


def is_entry_id(text: str) -> bool:
    """True for a complete stream entry id (`<milliseconds>-<sequence>`) Redis can hold: a
    part beyond 64 bits would pass a digits-only check and fail the whole pipeline later."""
    match = _ENTRY_ID.fullmatch(text)
    return match is not None and all(int(part) <= _ID_PART_MAX for part in match.groups())


def replay_mark_key(stream: str, dead_id: str) -> str | None:
    """The key marking that dead letter `dead_id` was re-added to `stream`, on `stream`'s slot
    (so one script can check and set it with the re-add); None when no such key can be built.

    Redis hashes a key by its first `{...}` when that is non-empty, else by the whole name:
    the mark reuses the stream's tag, or wraps a tagless name in braces, which hashes the same
    unless the name holds a `}` (then no tag reproduces its slot).
    """
    start = stream.find("{")
    end = stream.find("}", start + 1) if start != -1 else -1
    if start != -1 and end > start + 1:
        tag = stream[start : end + 1]
    elif "}" not in stream:
        tag = f"{{{stream}}}"
    else:
        return None
    return f"{tag}:dlq:replayed:{dead_id}"


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
    fields: str = ""  # JSON object of an entry without an action: the fields it held instead

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
            fields=_text(field(DEAD_LETTER_FIELDS)),
        )

    def _document(self) -> dict[str, Any] | None:
        """The action (or persistence record) as a JSON object; None when it is not one."""
        if not self.action:
            return None
        try:
            document = msgspec.json.decode(self.action)
        except msgspec.DecodeError:
            return None
        return document if isinstance(document, dict) else None

    def _string(self, name: str) -> str | None:
        value = (self._document() or {}).get(name)
        return value if isinstance(value, str) and value else None

    @property
    def action_type(self) -> str | None:
        """The action's `action_type` when the action is a JSON object that names one."""
        return self._string("action_type")

    @property
    def task(self) -> str | None:
        """Whose dead letter it is, `tenant/task` (`tenant/-` without a task), from the
        action or record JSON; None when it names no tenant. The first thing an SRE asks."""
        tenant = self._string("tenant_id")
        if tenant is None:
            return None
        return f"{tenant}/{self._string('task_id') or '-'}"

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
            "task": self.task,
            "action": _text(self.action),
            "fields": self._fields(),
        }

    def _fields(self) -> dict[str, Any] | None:
        try:
            fields = msgspec.json.decode(self.fields) if self.fields else None
        except msgspec.DecodeError:
            return None
        return fields if isinstance(fields, dict) else None


def _letters(rows: Any) -> list[DeadLetter]:
    """An XRANGE reply as dead letters."""
    return [DeadLetter.from_fields(entry_id, fields or {}) for entry_id, fields in rows or ()]


class ReplayOutcome(StrEnum):
    replayed = "replayed"
    not_found = "not_found"  # no dead letter has that id
    not_replayable = "not_replayable"  # no action, or no origin stream: kept as it is
    failed = "failed"  # the origin stream refused the entry: kept as it is
    not_deleted = "not_deleted"  # re-added, but the delete failed: kept; replaying is safe


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
    redis: Redis, *, limit: int | None = None, after: str | None = None, newest: bool = False
) -> list[DeadLetter]:
    """Dead letters oldest first, at most `limit` of them, from after the id `after` on;
    `newest`: the `limit` newest ones instead (what keeps failing now), still oldest first."""
    if after is not None and not is_entry_id(after):
        raise InvalidInput(f"{after[:80]!r} is not a stream entry id")
    if newest:
        latest = await redis.xrevrange(keys.DEAD_LETTERS, max="+", min="-", count=limit)
        return _letters((latest or [])[::-1])
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


def _readd_result(letter: DeadLetter, reply: Any) -> ReplayResult:
    """The result of one `replay_once` call (its reply, or the error the origin gave)."""
    if isinstance(reply, Exception):
        return ReplayResult(letter.id, ReplayOutcome.failed, letter.stream, detail=str(reply)[:200])
    added, new_id = reply
    detail = None if int(added) else "already re-added by an earlier replay; deleted now"
    return ReplayResult(letter.id, ReplayOutcome.replayed, letter.stream, _text(new_id), detail)


async def _readd(redis: Redis, letters: Sequence[DeadLetter]) -> dict[str, ReplayResult]:
    """Re-add each letter's action to its origin at most once (one pipelined round trip).

    `EVAL` rather than a cached `EVALSHA`: a replay is rare, and a server that lost its
    script cache (a restart, a failover) cannot fail it with NOSCRIPT. Each call names its
    keys, so a cluster routes it to the origin stream's node.
    """
    results: dict[str, ReplayResult] = {}
    todo: list[tuple[DeadLetter, str]] = []
    for letter in letters:
        mark = replay_mark_key(letter.stream, letter.id)
        if mark is None:
            detail = "its origin stream's name has a '}' but no hash tag: no replay mark fits"
            results[letter.id] = ReplayResult(
                letter.id, ReplayOutcome.failed, letter.stream, detail=detail
            )
        else:
            todo.append((letter, mark))
    if todo:
        async with redis.pipeline(transaction=False) as pipe:
            for letter, mark in todo:
                pipe.eval(
                    _REPLAY_ONCE, 2, letter.stream, mark,
                    ACTION_FIELD, letter.action, REPLAY_MARK_TTL_SECONDS,
                )  # fmt: skip
            replies = await pipe.execute(raise_on_error=False)
        for (letter, _), reply in zip(todo, replies, strict=True):
            results[letter.id] = _readd_result(letter, reply)
    return results


def _not_deleted(result: ReplayResult, error: Exception) -> ReplayResult:
    detail = (
        f"re-added to {result.stream} as {result.new_id}, but the dead letter could not be"
        f" deleted ({str(error)[:160]}); replaying it again is safe: it is not re-added twice"
    )
    return ReplayResult(result.id, ReplayOutcome.not_deleted, result.stream, result.new_id, detail)


async def _replay(redis: Redis, letters: Sequence[DeadLetter]) -> list[ReplayResult]:
    """Re-add each replayable letter to its origin (once), then delete it: two round trips.

    One result per letter, in order. A letter whose re-add fails (say, its origin key now
    holds something that is not a stream) is reported as failed and kept. When the delete
    fails, the re-added letters are reported `not_deleted` rather than the error raised: the
    caller must learn that their actions are back on their streams.
    """
    added = await _readd(redis, [letter for letter in letters if letter.replayable])
    done = [entry_id for entry_id, result in added.items() if result.ok]
    if done:
        # Only after their copies are acknowledged: a failure above loses nothing.
        try:
            await redis.xdel(keys.DEAD_LETTERS, *done)
        except (RedisError, OSError) as exc:
            for entry_id in done:
                added[entry_id] = _not_deleted(added[entry_id], exc)
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
    fails again cannot keep this loop busy. Unreplayable ones are reported and kept. It stops
    after a batch whose delete failed (the connection or the server is likely gone): what it
    did so far is returned, and a rerun is safe.
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
        batch_results = await _replay(redis, letters)
        results.extend(batch_results)
        if letters[-1].id == last or any(
            result.outcome is ReplayOutcome.not_deleted for result in batch_results
        ):
            return results
        start = f"({letters[-1].id}"


async def discard_dead_letters(redis: Redis, ids: Sequence[str]) -> dict[str, bool]:
    """Delete the dead letters with these ids without re-adding anything: for an action an
    SRE has judged unfixable, which `replay --all` would otherwise send round again every
    time. Whether each distinct id was there, in the given order (one round trip).

    Raises `InvalidInput` (before touching anything) when an id is not a stream entry id.
    """
    wanted = list(dict.fromkeys(ids))
    for entry_id in wanted:
        if not is_entry_id(entry_id):
            raise InvalidInput(f"{entry_id[:80]!r} is not a stream entry id")
    if not wanted:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in wanted:
            pipe.xdel(keys.DEAD_LETTERS, entry_id)
        deleted = await pipe.execute()
    return {entry_id: bool(count) for entry_id, count in zip(wanted, deleted, strict=True)}
