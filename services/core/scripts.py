"""The Lua scripts of the product, loaded once per process and called by their SHA.

On a pipeline, redis-py's script objects send `SCRIPT EXISTS` before every execute: one more
round trip per chat message and per worker batch. So scripts are loaded at start (`load()`),
queued on pipelines as plain `EVALSHA` (`queue()`), and reloaded when a reply says
`NOSCRIPT` (Redis restarted or was flushed); callers retry what did not run. Direct calls
(`await script(...)`) keep redis-py's own NOSCRIPT fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError


def _source(name: str) -> str:
    return (files("services.core") / "lua" / f"{name}.lua").read_text()


def composed(name: str, **functions: str) -> str:
    """A script that calls others: each `function=script` becomes a local Lua function of
    (KEYS, ARGV) holding that script's source, defined before `name`'s own source. Redis
    scripts cannot call each other; composing them keeps each rule in its one file."""
    defined = "".join(
        f"local function {function}(KEYS, ARGV)\n{_source(script)}\nend\n"
        for function, script in functions.items()
    )
    return defined + _source(name)


def missing_script(result: Any) -> bool:
    """A pipeline reply that means the script was not in the server's cache."""
    return isinstance(result, NoScriptError)


class Scripts:
    """Registered scripts bound to one client."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.task_event: AsyncScript = redis.register_script(_source("task_event"))
        self.session_event: AsyncScript = redis.register_script(_source("session_event"))
        self.broadcast: AsyncScript = redis.register_script(_source("broadcast"))
        self.lease: AsyncScript = redis.register_script(_source("lease"))
        self.usage_add: AsyncScript = redis.register_script(_source("usage_add"))
        self.compare_and_set: AsyncScript = redis.register_script(_source("compare_and_set"))
        self.zrem_if_due: AsyncScript = redis.register_script(_source("zrem_if_due"))
        self.send: AsyncScript = redis.register_script(
            composed("send", rate_limit="ratelimit", task_event="task_event")
        )

    def all(self) -> list[AsyncScript]:
        return [
            self.task_event,
            self.session_event,
            self.broadcast,
            self.lease,
            self.usage_add,
            self.compare_and_set,
            self.zrem_if_due,
            self.send,
        ]

    async def load(self) -> None:
        """Put every script in the server's cache (at start, and after a NOSCRIPT)."""
        for script in self.all():
            script.sha = await self.redis.script_load(script.script)

    @staticmethod
    def queue(
        pipe: Pipeline, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> None:
        """Queue `EVALSHA` on a pipeline without redis-py's per-execute `SCRIPT EXISTS`."""
        pipe.evalsha(script.sha, len(keys), *keys, *args)
