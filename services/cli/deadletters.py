"""`orchestrator deadletters list|replay|discard`: show, re-enqueue or drop dead letters.

The Redis side is `services.core.deadletters`; this module only parses, prints and picks the
exit code. Printed JSON is for scripts; the table is for people: it names whose dead letter it
is (tenant/task) and shows the reason's start, where writers put what was refused.

A replay re-adds each action at most once, so whenever a replay fails part way (the delete
after the re-add, or the connection), the message says that running it again is safe.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO

from services.core.deadletters import (
    DeadLetter,
    ReplayOutcome,
    ReplayResult,
    count_dead_letters,
    discard_dead_letters,
    is_entry_id,
    list_dead_letters,
    replay_all_dead_letters,
    replay_dead_letters,
)
from services.core.redis_client import REDIS_DOWN, create_redis, not_reached
from services.core.settings import ConfigError, Settings
from services.core.streams import DEAD_LETTER_MAXLEN

REASON_WIDTH = 80
"""Characters of a reason the table shows: enough for the writer's `refused by the database
(SQLSTATE ..., constraint ...)` and the start of PostgreSQL's message; `--json` has it all."""

DEFAULT_LIMIT = 100  # `deadletters list --limit`'s default (services/cli/main.py)
MAX_LIMIT = 10 * DEAD_LETTER_MAXLEN  # more than the stream ever holds (its trim is approximate)
RERUN_IS_SAFE = "running the replay again is safe: no dead letter is re-added twice"


def _printable(text: str) -> str:
    """A cell as the terminal will show it: an AES's control characters (ESC sequences that
    erase lines, retitle the window or set the clipboard) escaped, never sent raw."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _shorten(text: str, width: int) -> str:
    text = _printable(" ".join(text.split()))  # one line, whatever the reason held
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(letters: Sequence[DeadLetter]) -> list[str]:
    """Aligned columns: id, time, origin stream, action type, tenant/task, reason (shortened)."""
    header = ("ID", "AT", "STREAM", "ACTION_TYPE", "TASK", "REASON")
    rows = [
        (
            letter.id,
            letter.at,
            _printable(letter.stream),
            _printable(letter.action_type or "-"),
            _printable(letter.task or "-"),
            _shorten(letter.reason, REASON_WIDTH),
        )
        for letter in letters
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in (header, *rows)
    ]


async def list_command(
    settings: Settings,
    *,
    limit: int,
    as_json: bool,
    after: str | None = None,
    newest: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """`after`: the last id of the previous page. Without it, past `--limit` dead letters
    nobody could see the rest but by listing everything at once. `newest`: the last page,
    what keeps failing now (at the stream's cap, 1 000 pages away from the oldest)."""
    if not 1 <= limit <= MAX_LIMIT:  # Redis refuses a COUNT past 64 bits: exit 1, not 2
        raise ConfigError(f"--limit: must be 1 to {MAX_LIMIT}")
    if after is not None and not is_entry_id(after):
        raise ConfigError(f"--after: {after[:80]!r} is not a dead letter id (like 1764-0)")
    if after is not None and newest:
        raise ConfigError("--after and --newest: pass one of them")
    try:
        async with create_redis(settings) as redis:
            # One more than shown: whether a next page exists after these (the total does
            # not say, once `--after` skipped the first ones).
            letters = await list_dead_letters(
                redis, limit=limit if newest else limit + 1, after=after, newest=newest
            )
            total = await count_dead_letters(redis)
    except REDIS_DOWN as exc:
        print(f"orchestrator: {not_reached(exc)}", file=sys.stderr)
        return 1
    more = len(letters) > limit
    letters = letters[:limit]
    if as_json:
        print(json.dumps([letter.to_dict() for letter in letters], indent=2), file=out)
        return 0
    if not letters:
        print("no dead letters", file=out)
        return 0
    for line in format_table(letters):
        print(line, file=out)
    shown = f"{len(letters)} of {total}" if total > len(letters) else str(len(letters))
    order = "the newest, oldest first" if newest else "oldest first"
    print(f"{shown} dead letter(s); {order}", file=out)
    if more:
        size = "" if limit == DEFAULT_LIMIT else f" --limit {limit}"
        print(f"next page: orchestrator deadletters list{size} --after {letters[-1].id}", file=out)
    return 0


def _describe(result: ReplayResult) -> str:
    if result.outcome is ReplayOutcome.replayed:
        done = f"replayed {result.id} -> {result.stream} {result.new_id}"
        return f"{done} ({result.detail})" if result.detail else done
    if result.outcome is ReplayOutcome.not_deleted:
        return f"re-added, not deleted {result.id}: {result.detail}"
    if result.outcome is ReplayOutcome.not_found:
        return f"not found {result.id}: {result.detail}"
    return f"kept {result.id}: {result.detail}"


async def replay_command(
    settings: Settings,
    ids: Sequence[str],
    *,
    replay_all: bool,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Replay the named dead letters (or all); exit 1 when any was not replayed (or not
    deleted after its re-add), 2 (ConfigError) for bad arguments, before touching Redis."""
    if replay_all and ids:
        raise ConfigError("deadletters replay: give either IDs or --all, not both")
    if not replay_all and not ids:
        raise ConfigError("deadletters replay: give the IDs to replay, or --all")
    for entry_id in ids:
        if not is_entry_id(entry_id):
            raise ConfigError(f"deadletters replay: {entry_id!r} is not a dead letter id")
    try:
        async with create_redis(settings) as redis:
            if replay_all:
                results = await replay_all_dead_letters(redis)
            else:
                results = await replay_dead_letters(redis, ids)
    except REDIS_DOWN as exc:
        print(f"orchestrator: {not_reached(exc)}; {RERUN_IS_SAFE}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps([result.to_dict() for result in results], indent=2), file=out)
    else:
        for result in results:
            print(_describe(result), file=out)
        replayed = sum(result.ok for result in results)
        print(f"{replayed} replayed, {len(results) - replayed} not replayed", file=out)
        if any(result.outcome is ReplayOutcome.not_deleted for result in results):
            kept = "some actions were re-added, but their dead letters are still there"
            print(f"{kept}; {RERUN_IS_SAFE}", file=out)
    return 0 if all(result.ok for result in results) else 1


async def discard_command(
    settings: Settings, ids: Sequence[str], *, out: TextIO = sys.stdout
) -> int:
    """Delete the named dead letters for good; exit 1 when any id matched none (a typo, or
    already replayed or discarded), 2 (ConfigError) for bad arguments, before touching Redis.
    No `--all`: dropping what nobody looked at is what this command must not make easy."""
    if not ids:
        raise ConfigError("deadletters discard: give the IDs to discard")
    for entry_id in ids:
        if not is_entry_id(entry_id):
            raise ConfigError(f"deadletters discard: {entry_id!r} is not a dead letter id")
    try:
        async with create_redis(settings) as redis:
            found = await discard_dead_letters(redis, ids)
    except REDIS_DOWN as exc:
        print(f"orchestrator: {not_reached(exc)}", file=sys.stderr)
        return 1
    for entry_id, there in found.items():
        print(f"discarded {entry_id}" if there else f"not found {entry_id}", file=out)
    return 0 if all(found.values()) else 1
