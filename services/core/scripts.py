"""The Lua scripts of the product, loaded once per client (EVALSHA with a NOSCRIPT fallback)."""

from __future__ import annotations

from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _source(name: str) -> str:
    return (files("services.core") / "lua" / f"{name}.lua").read_text()


class Scripts:
    """Registered scripts bound to one client; usable with a pipeline via `client=`."""

    def __init__(self, redis: Redis) -> None:
        self.task_event: AsyncScript = redis.register_script(_source("task_event"))
        self.session_event: AsyncScript = redis.register_script(_source("session_event"))
        self.broadcast: AsyncScript = redis.register_script(_source("broadcast"))
        self.lease: AsyncScript = redis.register_script(_source("lease"))
