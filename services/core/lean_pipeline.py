"""Run a redis-py pipeline's queued commands with less of redis-py around each reply.

redis-py's asyncio pipeline pays per round trip for a retry wrapper, `asyncio.wait_for` around
the socket drain (a task each), and per reply an `asyncio.timeout` context, a health check and
a chain of `parse_response` calls: 150-180 us of client CPU for a four-command pipeline on the
development machine, against 40-46 us to write the same commands and read their replies with
hiredis directly (`/tmp`-style probe, one connection, replies of the same size). For a loop that
pays that once per small batch (the worker's joint loop under light load) it is most of its
CPU.

`run_pipeline` keeps redis-py for everything that is not the hot path: the pipeline still
queues the commands (and their response callbacks), the pool still makes, authenticates,
checks and hands out connections, and the replies go through the same callbacks, so callers
see exactly what `pipe.execute(raise_on_error=False)` returns. What it drops: retries (none:
for callers that must see every lost connection, as the joint loop, or that leave the work
to be redone, as the executor) and the per-reply timers (one deadline for the whole round
trip instead). A transactional pipeline is sent as MULTI, the commands, EXEC in one write.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol, cast

from redis.asyncio.client import Pipeline
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core.redis_client import as_lost_connection


class _AsyncParser(Protocol):
    async def read_response(self, disable_decoding: bool = False) -> Any: ...


# Options redis-py's `parse_response` consumes itself before calling a response callback.
_NEVER_DECODE = "NEVER_DECODE"
_EMPTY_RESPONSE = "EMPTY_RESPONSE"
_NOT_FOR_CALLBACKS = frozenset({_NEVER_DECODE, _EMPTY_RESPONSE, "keys"})


async def run_pipeline(pipe: Pipeline, *, within: float) -> list[Any]:
    """The queued commands' replies in order, an error reply in place as its exception (as
    `execute(raise_on_error=False)`); one deadline of `within` seconds for the round trip
    (it must exceed any BLOCK of the commands). A lost connection or the deadline raises
    redis-py's ConnectionError / TimeoutError, and the connection is dropped: it may hold
    replies no one will read."""
    commands = pipe.command_stack
    if not commands:
        return []
    if pipe.watching or pipe.explicit_transaction:
        raise ValueError("run_pipeline does not run WATCH or explicit MULTI pipelines")
    if not pipe.is_transaction:
        async with round_trip(pipe, within=within) as trip:
            return await trip.take(len(commands))
    async with _borrowed(pipe) as connection:
        try:
            return await _transaction(pipe, connection, commands, within)
        except (TimeoutError, OSError) as exc:
            raise _outage(exc) from exc


class RoundTrip:
    """A non-transactional pipeline sent in one write, its replies read as the caller needs
    them: the first ones can be used while a blocking command at the end still waits."""

    def __init__(self, pipe: Pipeline, connection: Connection, deadline: float) -> None:
        self._pipe = pipe
        self._commands = pipe.command_stack
        self._connection = connection
        self._writer, self._parser = _parts(connection)
        self._deadline = deadline
        self.unread = len(self._commands)

    async def send(self) -> None:
        try:
            async with asyncio.timeout_at(self._deadline):
                _write(
                    self._writer,
                    self._connection.pack_commands(args for args, _ in self._commands),
                )
                await self._writer.drain()
        except (TimeoutError, OSError) as exc:
            raise _outage(exc) from exc

    async def take(self, count: int) -> list[Any]:
        """The next `count` replies, in order, as `run_pipeline` gives them."""
        if count > self.unread:
            raise ValueError(f"{count} replies asked for, {self.unread} unread")
        first = len(self._commands) - self.unread
        replies: list[Any] = []
        try:
            async with asyncio.timeout_at(self._deadline):
                for args, options in self._commands[first : first + count]:
                    reply = await self._parser.read_response(
                        disable_decoding=_NEVER_DECODE in options
                    )
                    self.unread -= 1
                    replies.append(await _through_callback(self._pipe, args, options, reply))
        except (TimeoutError, OSError) as exc:
            raise _outage(exc) from exc
        return replies


@asynccontextmanager
async def round_trip(pipe: Pipeline, *, within: float) -> AsyncIterator[RoundTrip]:
    """Send `pipe`'s commands in one write; `take` their replies inside the block, all
    within `within` seconds of the send. The connection is dropped when the block ends with
    replies unread or on any error: a reply no one read must not reach its next user."""
    if pipe.is_transaction:
        raise ValueError("round_trip runs non-transactional pipelines only")
    async with _borrowed(pipe) as connection:
        trip = RoundTrip(pipe, connection, asyncio.get_running_loop().time() + within)
        await trip.send()
        yield trip
        if trip.unread:
            await connection.disconnect()


@asynccontextmanager
async def _borrowed(pipe: Pipeline) -> AsyncIterator[Connection]:
    """A connection of `pipe`'s pool for one round trip, dropped on any error (it may hold
    replies no one will read) and given back in every case."""
    pool = pipe.connection_pool
    connection = cast(Connection, await pool.get_connection())  # type: ignore[no-untyped-call]
    try:
        yield connection
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


def _outage(exc: TimeoutError | OSError) -> RedisTimeoutError | RedisConnectionError:
    """A missed deadline or a socket error as redis-py's outage errors."""
    if isinstance(exc, TimeoutError):
        return RedisTimeoutError("no reply before the round trip's deadline")
    return RedisConnectionError(str(exc))


def _write(writer: asyncio.StreamWriter, packed: list[bytes]) -> None:
    """Write on a connection whose transport may have been closed under it while it sat in
    the pool (a reset): uvloop raises RuntimeError, a lost connection for the caller."""
    try:
        writer.writelines(packed)
    except RuntimeError as exc:
        lost = as_lost_connection(exc)
        if lost is None:
            raise
        raise lost from exc


def _parts(connection: Connection) -> tuple[asyncio.StreamWriter, _AsyncParser]:
    writer = connection._writer
    if writer is None:
        raise RedisConnectionError("connection is not connected")
    return writer, cast(_AsyncParser, connection._parser)


async def _transaction(
    pipe: Pipeline, connection: Connection, commands: Any, within: float
) -> list[Any]:
    """MULTI, the commands, EXEC in one write. As redis-py's transactional pipeline: a
    command Redis refused to queue aborts the whole transaction (its error is raised), an
    error of a command that ran is in place in the replies."""
    writer, parser = _parts(connection)
    async with asyncio.timeout(within):
        packed = [("MULTI",), *(args for args, _ in commands), ("EXEC",)]
        _write(writer, connection.pack_commands(packed))
        await writer.drain()
        refused: list[ResponseError] = []
        for _ in range(len(commands) + 1):  # +OK, then +QUEUED or the refusal of each
            reply = await parser.read_response()
            if isinstance(reply, ResponseError):
                refused.append(reply)
        results = await parser.read_response()
    if refused:
        raise refused[0]
    if isinstance(results, ResponseError):
        raise results
    if not isinstance(results, list) or len(results) != len(commands):
        raise ResponseError(f"unexpected EXEC reply: {results!r}")
    return [
        await _through_callback(pipe, args, options, reply)
        for (args, options), reply in zip(commands, results, strict=True)
    ]


async def _through_callback(pipe: Pipeline, args: Any, options: Any, reply: Any) -> Any:
    """What redis-py's pipeline makes of one reply: an error in place, otherwise the reply
    through the command's response callback."""
    if isinstance(reply, ResponseError):
        return options.get(_EMPTY_RESPONSE, reply)
    callback = pipe.response_callbacks.get(args[0])
    if callback is None:
        return reply
    kept = {k: v for k, v in options.items() if k not in _NOT_FOR_CALLBACKS}
    reply = callback(reply, **kept)
    if inspect.isawaitable(reply):
        reply = await reply
    return reply
