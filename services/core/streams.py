"""Redis Streams plumbing shared by the consumers: groups, reads, reclaims, dead letters.

Delivery is at-least-once: an entry is acknowledged only after its effect is written, an entry
left pending by a dead consumer is reclaimed, and an entry that cannot be handled (malformed,
or failing its handler `max_delivery_attempts` times) moves to the dead-letter stream with the
reason instead of blocking its stream or crashing the consumer.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.typing import EncodableT, FieldT

from services.core import keys
from services.core.actions import ACTION_FIELD
from services.core.tasks import isoformat

log = logging.getLogger(__name__)

# Counted where every consumer (worker, executor, persistence writer) dead-letters, so the
# `OrchestratorDeadLetters` alert sees them all.
dead_letters = Counter("orchestrator_dead_letters", "Entries moved to the dead-letter stream")
dead_letters_dropped = Counter(
    "orchestrator_dead_letters_dropped",
    "Oldest dead letters deleted, never replayed nor discarded, to keep the stream at its cap",
)

DEAD_LETTER_MAXLEN = 100_000
DEAD_LETTER_FIELDS = "fields"  # an entry without an `action` field: what it held instead
"""The dead-letter stream's cap: a bug dead-lettering every action must not fill Redis's
memory (and refuse every write) before anyone looks. What goes past it is counted and logged:
it is lost for good."""
# A consumer of a competing group (executors, writers) idle this long with nothing pending
# belongs to a process that is gone: a live one reads every few seconds.
GONE_CONSUMER_IDLE_SECONDS = 600.0
_FORGET_CONSUMERS = (files("services.core") / "lua" / "forget_consumers.lua").read_text()


@dataclass(frozen=True, slots=True)
class Entry:
    stream: str
    id: str
    fields: dict[bytes, bytes]

    @property
    def raw_action(self) -> bytes | None:
        return self.fields.get(ACTION_FIELD.encode())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text_lossy(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def parse_read(response: Any) -> list[Entry]:
    """Flatten an XREAD/XREADGROUP reply (RESP2 list or RESP3 dict) into entries; a script's
    reply of the same shape holds each entry's fields as a flat list, not a dict."""
    if not response:
        return []
    items = response.items() if isinstance(response, dict) else response
    entries: list[Entry] = []
    for stream, messages in items:
        name = _text(stream)
        for entry_id, fields in messages:
            if fields is None:  # deleted while pending
                entries.append(Entry(name, _text(entry_id), {}))
            elif isinstance(fields, list):
                pairs = zip(fields[::2], fields[1::2], strict=True)
                entries.append(Entry(name, _text(entry_id), dict(pairs)))
            else:
                entries.append(Entry(name, _text(entry_id), fields))
    return entries


async def ensure_group(redis: Redis, stream: str, group: str, start: str = "0") -> None:
    """Create the consumer group (and the stream) unless it exists.

    Redis out of memory refuses XGROUP CREATE even for a group that exists: a consumer
    starting then would fail for nothing, so an existing group is looked up before giving up.
    """
    try:
        await redis.xgroup_create(stream, group, id=start, mkstream=True)
    except OutOfMemoryError:
        with contextlib.suppress(ResponseError):  # no such stream: it cannot be made now
            groups = await redis.xinfo_groups(stream)
            if any(_text(info["name"]) == group for info in groups):
                return
        raise
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def is_missing_group(exc: ResponseError) -> bool:
    """The stream or its group vanished (Redis restarted without persistence, or flushed)."""
    return "NOGROUP" in str(exc)


async def reclaim(
    redis: Redis, stream: str, group: str, consumer: str, min_idle_ms: int, count: int = 100
) -> list[Entry]:
    """Take over entries idle for `min_idle_ms` from any consumer (a dead one, typically)."""
    claimed: list[Entry] = []
    cursor = "0-0"
    while True:
        reply = await redis.xautoclaim(
            stream, group, consumer, min_idle_time=min_idle_ms, start_id=cursor, count=count
        )
        cursor = _text(reply[0])
        for entry_id, fields in reply[1]:
            claimed.append(Entry(stream, _text(entry_id), fields or {}))
        if cursor == "0-0" or len(claimed) >= count:
            return claimed


async def adopt(redis: Redis, stream: str, group: str, consumer: str, count: int = 100) -> None:
    """Make every pending entry of the group this consumer's, without counting a delivery
    (XAUTOCLAIM's JUSTID): the caller then reads them with XREADGROUP from 0, which counts
    one. A claim that counted too made each retry of a failing entry count twice, and
    dead-lettered it after about half of `max_delivery_attempts` runs of its handler."""
    start = "0-0"
    while True:
        # With JUSTID redis-py answers the ids without the cursor: go on after the last id.
        ids = await redis.xautoclaim(
            stream, group, consumer, min_idle_time=0, start_id=start, count=count, justid=True
        )
        if len(ids) < count:
            return
        millis, _, seq = _text(ids[-1]).partition("-")
        start = f"{millis}-{int(seq) + 1}"


async def forget_consumers(
    redis: Redis,
    stream: str,
    group: str,
    *,
    only: str = "",
    keep: str = "",
    idle_seconds: float = 0.0,
) -> int:
    """Delete the group's consumers that hold no pending entry and were idle at least
    `idle_seconds` (`only` that one, or all but `keep`); returns how many. Consumers are named
    after their process (a pod): without this a group keeps one per pod that ever lived."""
    deleted = await redis.eval(
        _FORGET_CONSUMERS, 1, stream, group, int(idle_seconds * 1000), keep, only
    )
    return int(deleted)


async def delivery_counts(
    redis: Redis, stream: str, group: str, entries: list[Entry]
) -> dict[str, int]:
    """How many times each pending entry was delivered (XPENDING's extended form)."""
    if not entries:
        return {}
    rows = await redis.xpending_range(
        stream, group, min=entries[0].id, max=entries[-1].id, count=len(entries) + 100
    )
    return {_text(row["message_id"]): int(row["times_delivered"]) for row in rows}  # type: ignore[arg-type]


async def dead_letter(redis: Redis, entry: Entry, group: str, reason: str) -> None:
    """Move an entry to the dead-letter stream with its reason, then acknowledge it.

    The dead letter is written first: a crash in between leaves the entry pending (it is
    dead-lettered again later), never lost.
    """
    record: dict[FieldT, EncodableT] = {
        "stream": entry.stream,
        "entry_id": entry.id,
        "group": group,
        "reason": reason[:2000],
        "at": isoformat(),
    }
    raw = entry.raw_action
    record[ACTION_FIELD] = raw if raw is not None else b""
    if raw is None and entry.fields:
        # Written under other names (`payload`, `data`): the only copy of what the producer
        # sent, kept as one JSON object of text for `deadletters list --json` to show.
        record[DEAD_LETTER_FIELDS] = json.dumps(
            {_text_lossy(name): _text_lossy(value) for name, value in entry.fields.items()}
        )
    # XTRIM apart from the XADD: it says how many it deleted, and those were never handled.
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(keys.DEAD_LETTERS, record)
        pipe.xtrim(keys.DEAD_LETTERS, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        _, dropped = await pipe.execute()
    await redis.xack(entry.stream, group, entry.id)
    dead_letters.inc()
    log.warning(
        "dead-lettered entry",
        extra={"stream": entry.stream, "entry_id": entry.id, "reason": reason[:200]},
    )
    if dropped:
        dead_letters_dropped.inc(int(dropped))
        log.error(
            "dead-letter stream full: its %d oldest dead letters were deleted unhandled; "
            "replay or discard dead letters (orchestrator deadletters list)",
            int(dropped),
            extra={"cap": DEAD_LETTER_MAXLEN},
        )


_TRIM_CONSUMED = (files("services.core") / "lua" / "trim_consumed.lua").read_text()
# Entries one trim call removes at most (XTRIM's LIMIT): a call on a stream holding a long
# consumed backlog (the first one after an upgrade) stays short; the next call goes on.
TRIM_LIMIT = 10_000


async def trim_consumed(redis: Redis, stream: str, *, limit: int = TRIM_LIMIT) -> int:
    """Remove the stream's entries that every consumer group has read and acknowledged (up to
    about `limit`); returns how many. Without this, consumed entries stayed until the stream's
    MAXLEN (a million), gigabytes over a day. An entry some group has not read, or holds
    pending, is kept; a stream without groups is left to its MAXLEN. Trimming is by whole
    stream nodes (`MINID ~`), so a few consumed entries of the newest node may remain."""
    return int(await redis.eval(_TRIM_CONSUMED, 1, stream, limit))


async def trim_consumed_all(redis: Redis, stream: str, *, rounds: int = 100) -> int:
    """`trim_consumed` until nothing more goes (at most `rounds` calls, other clients served
    between them); returns how many entries were removed."""
    removed = 0
    for _ in range(rounds):
        trimmed = await trim_consumed(redis, stream)
        if not trimmed:
            break
        removed += trimmed
    return removed
