"""An AES written from README "For AES teams: the contract on Redis" only, with plain
redis-py: how a team that never read our code answers (tests/e2e/test_external_aes.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

STREAMS = ["{aes}:actions:high", "{aes}:actions:normal", "{aes}:actions:low"]
GROUP = "aes"
CANCEL = "{aes}:cancel"
DLQ = "{dlq}:actions"


class Aes:
    def __init__(self, redis: Redis, name: str) -> None:
        self.redis = redis
        self.name = name

    async def ensure_group(self) -> None:
        for stream in STREAMS:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def take(
        self, task_id: str, timeout: float = 20.0, attempt: int | None = None
    ) -> tuple[str, str, dict[str, Any]]:
        """Read with the group until the action of `task_id` (and `attempt`) arrives (others
        are acked)."""
        stream, entry_id, _, action = await self.take_entry(task_id, timeout, attempt)
        return stream, entry_id, action

    async def take_entry(
        self, task_id: str, timeout: float = 20.0, attempt: int | None = None
    ) -> tuple[str, str, dict[bytes, bytes], dict[str, Any]]:
        """`take`, with the stream entry's fields as read."""
        async with asyncio.timeout(timeout):
            while True:
                reply = await self.redis.xreadgroup(
                    GROUP, self.name, dict.fromkeys(STREAMS, ">"), count=10, block=1000
                )
                for stream, entries in reply or []:
                    stream = stream.decode() if isinstance(stream, bytes) else stream
                    for entry_id, fields in entries:
                        action = json.loads(fields[b"action"])
                        eid = entry_id.decode()
                        if action["task_id"] == task_id and (
                            attempt is None or action.get("attempt") == attempt
                        ):
                            return stream, eid, fields, action
                        await self.redis.xack(stream, GROUP, eid)

    async def keep_alive(self, stream: str, entry_id: str) -> list[Any]:
        """README: refresh the claim with `XCLAIM ... JUSTID`, min-idle 0."""
        return list(await self.redis.xclaim(stream, GROUP, self.name, 0, [entry_id], justid=True))

    async def ack(self, stream: str, entry_id: str) -> None:
        await self.redis.xack(stream, GROUP, entry_id)

    async def answer(
        self, action: dict[str, Any], body: dict[str, Any], queue: str | None = None
    ) -> str:
        """Write one callback, copying the envelope fields from the action."""
        callback = {
            "tenant_id": action["tenant_id"],
            "session_id": action["session_id"],
            "task_id": action["task_id"],
            "attempt": action.get("attempt", 1),
            "trace_context": action.get("trace_context", {}),
            **body,
        }
        entry = await self.redis.xadd(
            queue or action["callback_queue"], {"action": json.dumps(callback)}
        )
        return entry.decode()

    async def raw(self, queue: str, callback: dict[str, Any] | str) -> str:
        """One stream entry as given (a dict as its JSON; a string as is, malformed or not)."""
        data = callback if isinstance(callback, str) else json.dumps(callback)
        return (await self.redis.xadd(queue, {"action": data})).decode()
