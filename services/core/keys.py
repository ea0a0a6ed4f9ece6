"""Every Redis key, stream, channel and group name, in one place.

Hash tags (`{...}`) decide the Redis Cluster slot. The rule: whatever one Lua script or one
multi-key command touches shares a tag.

- `{s:T:S}`: one chat session. Its event log, its tasks' state and its delivery channel live
  together, so appending an event, moving a task's state and publishing are one atomic script.
- `{t:ID}`: where a task lives (task id -> tenant/session), for lookups by task id alone.
- `{aes}`: the three priority streams and the cancel stream of the AES contract; one tag so one
  XREADGROUP reads all priorities (a chat message is one entry: far below a node's capacity).
- `{cb:N}`: callback partition N; the heavy traffic (chunks) spreads over N slots.
- `{dlq}`: dead letters. `{workers}`: worker heartbeats.
- `{tn:T}`: one tenant: besides its broadcast channel and dedupe markers, its quota record, its
  tenant-wide rate limit, its daily usage and the markers of counted tasks, so a script
  reading or moving any of them stays on one slot. A session's rate limit is on `{s:T:S}`.
- `{quota}`: the index of tenants with a quota record and the change channel (`list` and the
  announcement only; never in a script with a tenant's keys).
"""

from __future__ import annotations

import zlib
from typing import Literal

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")

AES_GROUP = "aes"
WORKER_GROUP = "workers"
DEAD_LETTERS = "{dlq}:actions"
WORKER_HEARTBEATS = "{workers}:heartbeats"
# Bumped by a worker that leaves cleanly: the others look every WATCH_SECONDS and take its
# partitions at once instead of at their next round (a third of a lease later).
WORKER_DEPARTURES = "{workers}:departures"
CANCEL_STREAM = "{aes}:cancel"
CANCEL_STREAM_MAXLEN = 10_000  # every executor reads all of it; a notice is needed briefly


def session_tag(tenant_id: str, session_id: str) -> str:
    return f"{{s:{tenant_id}:{session_id}}}"


def session_log(tenant_id: str, session_id: str) -> str:
    return f"{session_tag(tenant_id, session_id)}:log"


def session_unwritten(tenant_id: str, session_id: str) -> str:
    """Sorted set: ids of the session's tasks whose history records are on their way to
    PostgreSQL, by when they ended (ms); a history read waits for them, or says how many."""
    return f"{session_tag(tenant_id, session_id)}:unwritten"


def session_channel(tenant_id: str, session_id: str) -> str:
    return f"{session_tag(tenant_id, session_id)}:events"


SESSION_CHANNEL_TEMPLATE = "{s:TENANT:SESSION}:events"
"""`session_channel` as span names give it: one name for every session."""


def session_applied(tenant_id: str, session_id: str) -> str:
    """Hash: partition stream -> id of the session's last `websocket.send` applied from it (a
    redelivered entry at or below it is a duplicate). One key per session. (Not the name of
    the string that held one id for all streams before: workers of both kinds meet during a
    rolling upgrade, and neither must find the other's key with the wrong type.)"""
    return f"{session_tag(tenant_id, session_id)}:applied:marks"


def tenant_applied(tenant_id: str) -> str:
    """Hash: partition stream -> id of the tenant's last `websocket.broadcast` applied from it."""
    return f"{{tn:{tenant_id}}}:applied:mark"


def session_dedupe(tenant_id: str, session_id: str, action_id: str) -> str:
    """A per-action once-only key, for callers of `session_event.lua` with no stream entry
    (`bench --direct`); the worker uses `session_applied`."""
    return f"{session_tag(tenant_id, session_id)}:applied:{action_id}"


def tenant_sockets(tenant_id: str) -> str:
    """Sorted set of the tenant's open sockets on every pod, scored by their expiry (ms)."""
    return f"{{tn:{tenant_id}}}:sockets"


def tenant_idempotency(tenant_id: str, key_digest: str) -> str:
    """The task created by a request with this `Idempotency-Key` (24 hours)."""
    return f"{{tn:{tenant_id}}}:idem:{key_digest}"


def task_state(tenant_id: str, session_id: str, task_id: str) -> str:
    return f"{session_tag(tenant_id, session_id)}:task:{task_id}"


def session_tasks(tenant_id: str, session_id: str) -> str:
    """Sorted set: the session's task ids, by when each one's state expires at the latest
    (ms). What an erasure reads instead of a SCAN of the keyspace; `task_event.lua` adds a
    task when it creates it and forgets the ones long expired."""
    return f"{session_tag(tenant_id, session_id)}:tasks"


# When this deployment's apis began to index every session's tasks (ms, Redis's clock): until
# every task created before then may have expired, an erasure also SCANs (`TaskStore`).
TASK_INDEX_SINCE = "{tasks}:index-since"


def task_location(task_id: str) -> str:
    return f"{{t:{task_id}}}:where"


def task_recancel(task_id: str) -> str:
    """Set while a repeated cancel of the task may not send its notices again."""
    return f"{{t:{task_id}}}:recancel"


def tenant_channel(tenant_id: str) -> str:
    return f"{{tn:{tenant_id}}}:broadcast"


def aes_stream(priority: Priority) -> str:
    return f"{{aes}}:actions:{priority}"


def callback_stream(partition: int) -> str:
    return f"{{cb:{partition}}}:callbacks"


def partition_lease(partition: int) -> str:
    return f"{{cb:{partition}}}:lease"


def partition_released(partition: int) -> str:
    """Set for a lease's ttl when its holder gave the lease back after stopping its consumer."""
    return f"{{cb:{partition}}}:released"


def partition_deadlines(partition: int) -> str:
    """Sorted set of the partition's unfinished tasks by deadline (members `T/S/ID`)."""
    return f"{{cb:{partition}}}:deadlines"


def partition_retries(partition: int) -> str:
    """Sorted set of the partition's tasks waiting for their next attempt, by due time."""
    return f"{{cb:{partition}}}:retries"


def task_member(tenant_id: str, session_id: str, task_id: str) -> str:
    return f"{tenant_id}/{session_id}/{task_id}"


CALLBACK_PARTITION_COUNT = "{cb}:partitions"
"""The installation's `CALLBACK_PARTITIONS`, recorded by its first api or worker
(`services.core.partition_count`)."""


def partition_of(tenant_id: str, session_id: str, partitions: int) -> int:
    """Stable partition of a session: all of its callbacks land in one stream, in order."""
    return zlib.crc32(f"{tenant_id}:{session_id}".encode()) % partitions


def callback_stream_for(tenant_id: str, session_id: str, partitions: int) -> str:
    return callback_stream(partition_of(tenant_id, session_id, partitions))


QUOTA_TENANTS = "{quota}:tenants"
QUOTA_CHANGES = "{quota}:changes"
INSTALLED_TIERS = "{quota}:tiers"  # the tier table the apis serve, recorded at their start


def tenant_quota(tenant_id: str) -> str:
    return f"{{tn:{tenant_id}}}:quota"


def session_rate(tenant_id: str, session_id: str) -> str:
    return f"{session_tag(tenant_id, session_id)}:rl"


def tenant_rate(tenant_id: str) -> str:
    return f"{{tn:{tenant_id}}}:rl"


def tenant_usage(tenant_id: str, day: str) -> str:
    """Usage counters of one UTC day (`YYYY-MM-DD`)."""
    return f"{{tn:{tenant_id}}}:usage:{day}"


def tenant_usage_counted(tenant_id: str, task_id: str) -> str:
    """Marker that a task's usage was already counted (makes `UsageCounter.add` idempotent)."""
    return f"{{tn:{tenant_id}}}:counted:{task_id}"


PERSIST_GROUP = "persist"
PERSIST_RECORDS = "{persist}:records"
"""Stream of finished tasks waiting to be written to PostgreSQL (one entry per task).

One stream on one slot, like the AES streams: it carries one entry per chat message, far
below a node's capacity, and any number of writers share it through the `persist` group.
Writes are keyed by task id, so no order between entries matters and none is kept.
"""
