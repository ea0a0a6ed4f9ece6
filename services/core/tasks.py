"""Task state and the session events that move it, written atomically by one Lua script.

The task's state hash and the session's event log share the session's hash tag, so a state
transition and the client event it produces are one atomic step: a client never sees a chunk
after `chat.cancelled`, a duplicate chunk, or an event of a superseded attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from importlib.resources import files
from typing import Any, NamedTuple

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.core import clock, keys
from services.core.actions import utcnow
from services.core.scripts import Scripts
from services.core.settings import Settings
from services.core.tiers import MAX_TASK_TIMEOUT_SECONDS


class TaskStatus(StrEnum):
    queued = "queued"
    processing = "processing"
    streaming = "streaming"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"


# How long past its expiry a task may stay in its session's index (`lua/task_event.lua`), and
# how long an api of a version before the index may keep creating tasks during a rollout.
INDEX_SLACK_SECONDS = 86_400

# Appended to a task's location when its session is erased (`TaskStore.erase_session`).
ERASED_MARK = "/erased"

FINAL_STATUSES = frozenset(
    {TaskStatus.completed, TaskStatus.failed, TaskStatus.cancelled, TaskStatus.timed_out}
)


class Verdict(StrEnum):
    """What the task script decided about an event."""

    ok = "ok"
    exists = "exists"
    unknown = "unknown"
    final = "final"
    stale = "stale"
    duplicate = "duplicate"
    requeued = "requeued"
    pending = "pending"


@dataclass(frozen=True, slots=True)
class Erased:
    """What `TaskStore.erase_session` found: how many tasks, and those still running, each
    with its state as it was (their AES is told to stop: nobody will take their answers;
    their records count their requests in the tenant's usage)."""

    tasks: int
    running: list[ErasedTask]
    # Ended by an earlier erasure that failed before queueing their records or telling their
    # sockets and AES (`told_erased` was not reached), each with its stub's fields.
    kept: list[ErasedTask] = field(default_factory=list)


class ErasedTask(NamedTuple):
    """A running task an erasure ended: the stub kept in its state's place lives `ttl` more
    seconds (until the task's deadline plus TASK_TTL_SECONDS)."""

    ref: TaskRef
    state: dict[str, str]
    ttl: int


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    detail: str
    tier: str = ""
    created_ms: int = 0  # when the task was accepted (for latency metrics)
    first_chunk: bool = False
    replay: bool = False  # final: the event that ended the task, delivered again

    @property
    def applied(self) -> bool:
        return self.verdict is Verdict.ok


@dataclass(frozen=True, slots=True)
class TaskRef:
    tenant_id: str
    session_id: str
    task_id: str


_json = msgspec.json.Encoder()
_ERASE_TASK = (files("services.core") / "lua" / "erase_task.lua").read_text()
# EVAL, not a cached script, as _ERASE_TASK: rare, and safe from a flushed script cache.
_TOLD = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'told', 1) end"


def isoformat(moment: datetime | None = None) -> str:
    return (moment or utcnow()).isoformat().replace("+00:00", "Z")


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class TaskStore:
    """Reads task state and applies events to it (with their client-visible frames)."""

    def __init__(self, redis: Redis, scripts: Scripts, settings: Settings) -> None:
        self.redis = redis
        self.scripts = scripts
        self.settings = settings

    def script_args(
        self,
        ref: TaskRef,
        op: str,
        *,
        attempt: int,
        seq: int,
        body: str,
        fields: dict[str, str],
        traceparent: str = "",
        after_seq: int = 0,
        ttl: int | None = None,
    ) -> tuple[list[str], list[str | int]]:
        """task_event.lua's KEYS and ARGV (also composed into send.lua). `ttl`: the state's
        lifetime from now, if longer than TASK_TTL_SECONDS (a task's creation, see
        `ChatService`); the script never shortens it."""
        settings = self.settings
        script_keys = [
            keys.task_state(ref.tenant_id, ref.session_id, ref.task_id),
            keys.session_log(ref.tenant_id, ref.session_id),
        ]
        # The session's task index, which an erasure reads (and an event that lengthens the
        # task's state lengthens its member's life too).
        script_keys.append(keys.session_tasks(ref.tenant_id, ref.session_id))
        if settings.database_url and op != "create":  # (send.lua composes `create` with three
            # keys) a history to wait for: see `keys.session_unwritten`
            script_keys.append(keys.session_unwritten(ref.tenant_id, ref.session_id))
        args: list[str | int] = [
            op,
            attempt,
            seq,
            body,
            settings.session_log_maxlen,
            settings.session_log_ttl_seconds * 1000,
            max(ttl or 0, settings.task_ttl_seconds),
            keys.session_channel(ref.tenant_id, ref.session_id),
            isoformat(),
            f"{traceparent}\n" if traceparent else "",
            after_seq,
        ]
        for name, value in fields.items():
            args.extend((name, value))
        return script_keys, args

    async def apply(
        self,
        ref: TaskRef,
        op: str,
        *,
        attempt: int = 0,
        seq: int = 0,
        body: str = "",
        fields: dict[str, str] | None = None,
        pipe: Pipeline | None = None,
        traceparent: str = "",
        after_seq: int = 0,
        ttl: int | None = None,
    ) -> Outcome | None:
        """Run the task script; with `pipe`, queue it and return None (read the pipe's result).

        `traceparent` rides on the published frame (not the log) so that the api pod that
        delivers it continues the trace. `after_seq`: the task's chunk queued before this
        event in the same pipeline, which must have applied first (else DEFERRED).
        """
        script_keys, args = self.script_args(
            ref,
            op,
            attempt=attempt,
            seq=seq,
            body=body,
            fields=fields or {},
            traceparent=traceparent,
            after_seq=after_seq,
            ttl=ttl,
        )
        if pipe is not None:
            self.scripts.queue(pipe, self.scripts.task_event, script_keys, args)
            return None
        return parse_outcome(await self.scripts.task_event(keys=script_keys, args=args))

    async def locate(self, task_id: str) -> TaskRef | None:
        """Where the task lives; None when it is unknown, expired or erased."""
        where = _text(await self.redis.get(keys.task_location(task_id)))
        if where is None or where.endswith(ERASED_MARK):
            return None
        tenant_id, _, session_id = where.partition("/")
        return TaskRef(tenant_id, session_id, task_id)

    async def was_erased(self, task_id: str) -> bool:
        """Whether the task was erased with its session (within its location's ttl)."""
        where = _text(await self.redis.get(keys.task_location(task_id)))
        return where is not None and where.endswith(ERASED_MARK)

    async def erase_session(self, tenant_id: str, session_id: str) -> Erased:
        """Delete the state of every task of the session: an erased session's answers must not
        be served by `GET /api/chat/tasks/{id}` until they expire.

        A task's location is kept, marked erased, until it expires: an `Idempotency-Key`
        naming the task is then told so instead of taken for a key whose send never queued
        its task (which would send the erased message again). The session's tasks are read
        from its index (`keys.session_tasks`); while tasks created before this deployment
        indexed them may still live, also from a SCAN of the session's keys
        (`index_complete`). A task still running is ended as cancelled
        (`lua/erase_task.lua`): its later chunks are dropped, and its completion's usage is
        counted as after a cancel."""
        index = keys.session_tasks(tenant_id, session_id)
        found = [
            member.decode() if isinstance(member, bytes) else str(member)
            for member in await self.redis.zrange(index, 0, -1)
        ]
        if not await self.index_complete():
            pattern = keys.task_state(tenant_id, session_id, "*")
            prefix = len(pattern) - 1
            scanned = [
                str(_text(key))[prefix:]
                async for key in self.redis.scan_iter(match=pattern, count=1000)
            ]
            found = list(dict.fromkeys([*found, *scanned]))
        marked = f"{tenant_id}/{session_id}{ERASED_MARK}"
        running: list[ErasedTask] = []
        kept: list[ErasedTask] = []
        erased = 0
        for start in range(0, len(found), 500):
            chunk = found[start : start + 500]
            # The locations first, then the states, in two round trips: on a cluster they
            # are on other nodes, and a state erased while its location's node refused the
            # mark was never marked by a retry (it found no state): the erased message was
            # sent again under its Idempotency-Key. Marked first, a retry finds the state.
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in chunk:
                    pipe.set(keys.task_location(task_id), marked, xx=True, keepttl=True)
                await pipe.execute()
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id in chunk:
                    # EVAL, not a cached script: rare, and safe from a flushed script cache.
                    state_key = keys.task_state(tenant_id, session_id, task_id)
                    pipe.eval(_ERASE_TASK, 2, state_key, index, isoformat())
                replies = await pipe.execute()
            for task_id, reply in zip(chunk, replies, strict=True):
                outcome = int(reply[0])
                if outcome in (1, 2):
                    erased += 1
                if outcome not in (2, 3):
                    continue
                pairs = [str(_text(item)) for item in reply[2:]]
                state = dict(zip(pairs[::2], pairs[1::2], strict=True))
                ended = ErasedTask(TaskRef(tenant_id, session_id, task_id), state, int(reply[1]))
                (running if outcome == 2 else kept).append(ended)
        return Erased(erased, running, kept)

    def queue_told(self, pipe: Any, ref: TaskRef) -> None:
        """Note on the stub of a task an erasure dropped that its record and notices are out:
        a later erasure of the session sends none of them again (`lua/erase_task.lua`). Only
        if the stub is still there: a plain HSET on one that had just expired made a hash
        that never expired, taken by the next erasure for a running task."""
        pipe.eval(_TOLD, 1, keys.task_state(ref.tenant_id, ref.session_id, ref.task_id))

    async def mark_index_start(self) -> None:
        """Note when this deployment began to index every session's tasks (the first api of
        this version to start, or the first erasure: whichever comes first)."""
        await self.redis.set(keys.TASK_INDEX_SINCE, int(clock.now() * 1000), nx=True)

    async def index_complete(self) -> bool:
        """Whether every task state that may still live is in its session's index: those
        created before the index was, by an older version, live at most their deadline plus
        TASK_TTL_SECONDS (and an older api left running through a rollout for up to a day)."""
        since = _text(await self.redis.get(keys.TASK_INDEX_SINCE))
        if since is None:
            await self.mark_index_start()
            return False
        longest = self.settings.task_ttl_seconds + MAX_TASK_TIMEOUT_SECONDS + INDEX_SLACK_SECONDS
        return clock.now() - int(since) / 1000 > longest

    def location_value(self, ref: TaskRef) -> str:
        return f"{ref.tenant_id}/{ref.session_id}"

    async def read(self, ref: TaskRef) -> dict[str, Any] | None:
        raw = await self.redis.hgetall(keys.task_state(ref.tenant_id, ref.session_id, ref.task_id))
        if not raw:
            return None
        return {str(_text(k)): _text(v) for k, v in raw.items()}


def parse_outcome(result: Any) -> Outcome:
    verdict, detail, *facts = result
    outcome = Outcome(Verdict(_text(verdict) or ""), _text(detail) or "")
    if len(facts) >= 3:
        tier, created_ms, first_chunk = facts[:3]
        outcome = Outcome(
            outcome.verdict,
            outcome.detail,
            _text(tier) or "",
            int(_text(created_ms) or 0),
            bool(first_chunk),
            replay=len(facts) > 3 and bool(facts[3]),
        )
    return outcome


def encode_json(value: Any) -> str:
    return _json.encode(value).decode()
