"""The Redis client of every process, built from settings, with reconnect and backoff.

Failure modes and how long a caller waits before it gets a `REDIS_DOWN` error (the api turns
it into 503 `unavailable`):

- Redis stopped or restarting (connection refused or reset): the command is retried with
  jittered backoff, about half a second in all, which rides through a blip; then it fails.
- Redis frozen or unreachable (a partition, a stuck host: the TCP connection stays open and
  nothing answers): the read times out after `socket_timeout`, the longest blocking read of the
  process plus `COMMAND_TIMEOUT_SECONDS`. A timeout is not retried: the command may have run,
  and a server that did not answer in seconds will not answer the retry sooner.

Without `socket_timeout` a frozen Redis held every request (and readiness probe) for as long
as the kernel kept the connection: tens of seconds to hours.

Topologies (`ORCHESTRATOR_REDIS_MODE`, issue 11):

- `standalone`: one server at `REDIS_URL` (or host and port).
- `cluster`: `REDIS_URL` names any seed node; the client learns the slot map from it, routes
  each command to the slot's primary and refreshes the map on MOVED, connection errors and
  CLUSTERDOWN. Every multi-key command and script of the product touches one slot (see
  `keys`), so the cluster never refuses one with CROSSSLOT. The client is typed `Redis`
  everywhere: the command API is the same, and the few places where the cluster client
  differs (pipelines with scripts, sharded pub/sub per node) ask `is_cluster`.
- `sentinel`: `REDIS_SENTINELS` are asked for the primary of `REDIS_SENTINEL_MASTER` on every
  (re)connect, so after a failover the next connection goes to the promoted replica; a
  connection that finds its old primary demoted (READONLY) is dropped and re-resolved.
  `REDIS_URL`, when set, gives the primary's credentials and TLS (its host is ignored).

A wrong mode for the server reached stops the process at start with one line
(`verify_topology`).

Importing this module (every process and test that talks to Redis does) gives Python 3.11
the `asyncio.wait_for` of 3.12: redis-py awaits each command's write with it, and 3.11's
could lose a task's `cancel()` (see `cancel_safe_wait_for`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
from collections import deque
from collections.abc import Generator, Iterable
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    DataError,
    MaxConnectionsError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core import cancel_safe_wait_for, partition_count
from services.core.settings import ConfigError, RedisMode, Settings
from services.core.task_stop import cancel_and_wait

cancel_safe_wait_for.install()

log = logging.getLogger(__name__)

RedisClient = Redis

# Errors that mean "Redis is not answering right now": callers back off and retry (the api
# answers 503). On a cluster this includes a slot without a primary (a node lost, its
# failover not done yet) and the whole cluster being unreachable.
REDIS_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    SlotNotCoveredError,
)


class WritesRefused(ResponseError):
    """Redis answering but refusing writes for a state of its own that an operator ends:
    `MISCONF` (an RDB snapshot failed and `stop-writes-on-bgsave-error` is on, the default;
    Redis then refuses PING too) or `NOREPLICAS` (`min-replicas-to-write` unmet: no replica
    keeps up). redis-py knows neither prefix: as a plain ResponseError they passed for a bug
    (REST 500, the worker and the executor exiting) instead of an outage to wait out."""

    def __str__(self) -> str:
        # redis-py strips the prefix it matched from the message: put it back, it is the cause.
        text = super().__str__()
        return f"{self.status_code} {text}" if self.status_code else text


# Registered in the map of redis-py's base parser, which both of its reply parsers (hiredis
# and pure Python, sync and asyncio) consult for every error reply: no connection class of
# ours needs to know, and an error raised inside a Lua script keeps its prefix (Redis 7+).
for _prefix in ("MISCONF", "NOREPLICAS"):
    BaseParser.EXCEPTION_CLASSES.setdefault(_prefix, WritesRefused)

# Redis answering but refusing writes: out of memory under `noeviction`, a read-only replica
# (a failover in progress), a failed snapshot or missing replicas (`WritesRefused`). The api
# answers 503 like an outage: the client retries later.
REDIS_REFUSING = (OutOfMemoryError, ReadOnlyError, WritesRefused)
REFUSING_WORDS = "redis refuses writes (out of memory, a failover, a failed snapshot), retry later"
"""What a client is told of any of them (the server's own message stays in the log)."""

COMMAND_TIMEOUT_SECONDS = 2.0  # beyond the longest blocking read (XREADGROUP BLOCK)
CONNECT_TIMEOUT_SECONDS = 2.0
RETRIES = 3
BACKOFF_BASE_SECONDS = 0.05
BACKOFF_CAP_SECONDS = 0.5
VERIFY_TIMEOUT_SECONDS = 8.0
# How long a command waits for a pooled connection when all `max_connections` are busy (a
# burst: 2 000 sockets' admission scripts at once). A busy connection is freed within one
# command's `socket_timeout`, so waiting longer than that only means Redis is not answering.
POOL_WAIT_SECONDS = 5.0
# How often a Sentinel client asks which server is the primary (WaitingSentinelConnectionPool).
PRIMARY_CHECK_SECONDS = 0.5

_UNREACHABLE_CLUSTER = "Redis Cluster cannot be connected"


def _retry(retries: int = RETRIES) -> Retry:
    return Retry(
        ExponentialWithJitterBackoff(base=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS),
        retries=retries,
        supported_errors=(RedisConnectionError,),
    )


def _timeouts(settings: Settings) -> dict[str, Any]:
    # Blocking stream reads wait up to `worker_sleep_seconds` for an answer by design.
    return {
        "socket_timeout": settings.worker_sleep_seconds + COMMAND_TIMEOUT_SECONDS,
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        "health_check_interval": 30,
    }


class PackedByHiredis:
    """Commands packed by hiredis (in C) instead of redis-py's Python `pack_command`.

    redis-py's asyncio connections pack every command in Python: in the worker's profile
    about a tenth of its CPU, and 17% of a five-command pipeline's client cost (measured:
    206 -> 172 us). hiredis, already the reply parser, packs the same bytes.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:  # None, bool: what redis-py's own encoder refuses too
            raise DataError(f"invalid command argument: {exc}") from exc


_MIXED: dict[tuple[type[AbstractConnection], tuple[type, ...]], type[AbstractConnection]] = {}


class ClosedTransportIsLost:
    """A command sent on a pooled connection whose transport uvloop has already closed (the
    peer reset it while it sat idle in the pool: a proxy or load balancer restarting) fails
    inside `writelines` with RuntimeError('... the handler is closed'), which redis-py neither
    retries nor reports as a lost connection: a REST send answered 500, a socket closed 1011,
    with Redis healthy. Reported as the lost connection it is, Retry resends it on a new
    connection and callers ride through it as through any outage. (Cluster nodes keep
    redis-py's own handling: `ClusterClient` maps these errors after its slot-map logic.)"""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except (RuntimeError, AttributeError) as exc:
            lost = as_lost_connection(exc)
            if lost is None:
                raise
            raise lost from exc


class ReconnectsToThePrimary:
    """A Sentinel connection that reconnects to the primary the pool knows now.

    redis-py (8.1) resolves the primary in `SentinelManagedConnection.connect`, but a command
    sent on a connection that was closed reconnects through `connect_check_health`, to the
    host it had: after a failover (the pool closes every connection,
    `WaitingSentinelConnectionPool`) a blocking read went straight back to the old primary,
    and stayed there (reads are allowed on a replica: no READONLY ever moved it)."""

    connection_pool: Any
    host: str
    port: int

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
        pool = self.connection_pool
        known = pool.master_address if pool.is_master else None
        if known is not None and not cast(AbstractConnection, self).is_connected:
            self.host, self.port = known
        return await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]


def _with_mixins(
    connection_class: type[AbstractConnection], *mixins: type
) -> type[AbstractConnection]:
    """`connection_class` with `mixins` in front (one class per combination, made once)."""
    missing = tuple(mixin for mixin in mixins if not issubclass(connection_class, mixin))
    if not missing:
        return connection_class
    if (connection_class, missing) not in _MIXED:
        mixed = type(connection_class.__name__, (*missing, connection_class), {})
        _MIXED[connection_class, missing] = cast(type[AbstractConnection], mixed)
    return _MIXED[connection_class, missing]


def create_redis(
    settings: Settings, *, max_connections: int | None = None, retries: int = RETRIES
) -> Redis:
    """A pooled client for the configured topology (per node on a cluster).

    Commands retry with jittered backoff across short outages (`retries` times: 0 for a
    caller that must see every lost connection); on a cluster or behind Sentinel they follow
    the slot map or the promoted primary by themselves.
    """
    settings.require_redis_topology()
    pool_size = max_connections or settings.redis_max_connections
    if settings.redis_mode is RedisMode.cluster:
        return cast(Redis, _cluster(settings, pool_size))
    if settings.redis_mode is RedisMode.sentinel:
        client = _sentinel_primary(settings, pool_size, retries)
        pool = client.connection_pool
        pool.connection_class = _with_mixins(pool.connection_class, ReconnectsToThePrimary)
    else:
        timeouts = _timeouts(settings)
        if settings.redis_address.startswith("unix://"):
            del timeouts["socket_keepalive"]  # a TCP option: redis-py's unix connection refuses it
        pool = WaitingConnectionPool.from_url(
            settings.redis_address,
            max_connections=pool_size,
            timeout=POOL_WAIT_SECONDS,
            retry=_retry(retries),
            **timeouts,
        )
        client = Redis.from_pool(pool)
    pool.connection_class = _with_mixins(
        pool.connection_class, ClosedTransportIsLost, PackedByHiredis
    )
    return client


class _WaitForConnection:
    """A pool that waits (FIFO, up to `timeout` seconds) for a connection when all
    `max_connections` are in use, instead of failing at once with MaxConnectionsError: a burst
    (2 000 sockets' admission scripts at once) queues for the pool rather than answering 1013.

    redis-py's `BlockingConnectionPool` does the same with an `asyncio.Condition` and a timer
    around every checkout, which cost 15-20 us per command under concurrency here; this one
    touches nothing extra while a connection is free.
    """

    timeout: float
    _waiters: deque[asyncio.Future[None]]

    def _room(self) -> bool:
        return bool(cast(ConnectionPool, self).can_get_connection())

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        pool = cast(ConnectionPool, super())
        if not self._waiters and self._room():
            with contextlib.suppress(MaxConnectionsError):
                return await pool.get_connection()  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if not self._room():
                    raise MaxConnectionsError(
                        f"no Redis connection free within {self.timeout:g} s"
                    ) from None
            except BaseException:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass on the wake-up this task will not use
                raise
            try:
                connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            except MaxConnectionsError:
                continue  # taken meanwhile (a connection released without a wake-up)
            if self._waiters and self._room():
                self._wake_one()
            return connection

    async def release(self, connection: Any) -> None:
        await cast(ConnectionPool, super()).release(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class WaitingConnectionPool(_WaitForConnection, ConnectionPool):
    """The standalone client's pool (see `_WaitForConnection`)."""

    def __init__(self, *, timeout: float = POOL_WAIT_SECONDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeout = timeout
        self._waiters = deque()


class WaitingSentinelConnectionPool(_WaitForConnection, SentinelConnectionPool):
    """Sentinel's pool of connections to the current primary (see `_WaitForConnection`), which
    follows a change of primary with every connection, also those in use.

    redis-py asks the sentinels only when it opens a connection, and then closes only the idle
    ones. After `SENTINEL FAILOVER` (maintenance: the old primary is healthy) the sentinels
    name the promoted replica within a second, but demote the old primary only when they next
    look at it, ~10 s later; the connections in use (blocking reads, subscriptions, a warm
    pool's) went on writing to it meanwhile, and it discarded those writes when it resynced:
    answered tasks read 404, deadlines fired twice. So the sentinels are asked every
    `PRIMARY_CHECK_SECONDS` while the pool is in use, and a new primary closes every
    connection: each command in flight fails as a lost connection and is retried there.
    """

    def __init__(
        self,
        service_name: str,
        sentinel_manager: Sentinel,
        *,
        timeout: float = POOL_WAIT_SECONDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self._waiters = deque()
        self._watch: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._watch is None or self._watch.done():  # started by the first use, and again
            self._watch = asyncio.get_running_loop().create_task(self._watch_primary())
        return await super().get_connection(*args, **kwargs)

    async def _watch_primary(self) -> None:
        while True:
            await asyncio.sleep(PRIMARY_CHECK_SECONDS)
            try:
                await self.get_master_address()
            except (RedisError, OSError) as exc:  # the sentinels unreachable: keep what works
                log.debug("asking the sentinels for the primary failed: %s", exc)

    async def get_master_address(self) -> Any:
        address = await self.sentinel_manager.discover_master(self.service_name)
        if self.master_address != address:
            moved = self.master_address is not None
            self.master_address = address
            if moved:
                log.warning("redis primary moved to %s:%s: reconnecting", *address)
            # The first address: nothing open yet. A new one: every connection (the base
            # class's own `disconnect`, which leaves the watch running).
            await SentinelConnectionPool.disconnect(self, inuse_connections=moved)
        return address

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """The client's close (every connection) also ends the watch."""
        watch, self._watch = self._watch, None
        if inuse_connections and watch is not None and watch is not asyncio.current_task():
            await cancel_and_wait(watch)
        elif watch is not None:
            self._watch = watch
        await super().disconnect(inuse_connections)


# redis-py's repr of one sentinel's client in its MasterNotFoundError: ~1 000 characters.
_SENTINEL_CLIENT = re.compile(
    r"<redis\.asyncio\.client\.Redis\(.*?,host=([^,]+),port=(\d+),.*?\)>\)>\)>"
)


class SentinelCredentialsRefused(MasterNotFoundError, AuthenticationError):
    """No primary named because sentinels refused our credentials (not an unreachable
    network): the fix is REDIS_SENTINEL_USERNAME/_PASSWORD."""


class ReadableSentinel(Sentinel):
    """redis-py names each sentinel it could not ask by its client's repr: behind three
    unreachable sentinels `orchestrator tenants list` printed a 3 KB line, and every service
    logged one a retry. The same error, each sentinel named by its address; sentinels that
    refused the credentials make it `SentinelCredentialsRefused`."""

    async def discover_master(self, service_name: str) -> Any:
        try:
            return await super().discover_master(service_name)
        except MasterNotFoundError as exc:
            text = _SENTINEL_CLIENT.sub(r"\1:\2", str(exc))
            if "AuthenticationError" in text:
                raise SentinelCredentialsRefused(text) from None
            raise MasterNotFoundError(text) from None


def not_reached(exc: BaseException) -> str:
    """A one-shot command's words for a Redis error of `REDIS_DOWN`: a password Redis refused
    is not a network problem (redis-py raises it as a lost connection, and "cannot reach
    Redis" sent an SRE to the network instead of the Secret)."""
    if isinstance(exc, SentinelCredentialsRefused):
        return (
            f"the sentinels refused the credentials ({exc}); check "
            "ORCHESTRATOR_REDIS_SENTINEL_USERNAME and ORCHESTRATOR_REDIS_SENTINEL_PASSWORD"
        )
    if isinstance(exc, AuthenticationError) or "authenticated" in str(exc):
        return (
            f"Redis refused the credentials ({exc}); check the user and password of "
            "ORCHESTRATOR_REDIS_URL"
        )
    return f"cannot reach Redis: {exc}"


def is_cluster(redis: Redis | RedisCluster) -> bool:
    return isinstance(redis, RedisCluster)


def _cluster(settings: Settings, pool_size: int) -> ClusterClient:
    client = ClusterClient.from_url(
        settings.redis_address,
        max_connections=pool_size,
        # Used for its count only: the cluster client retries at once after refreshing
        # the slot map; the callers' loops back off.
        retry=_retry(),
        # A lost node must not stop traffic to the slots the others still serve (when the
        # servers allow it: `cluster-require-full-coverage no`).
        require_full_coverage=False,
        **_timeouts(settings),
    )
    cluster = cast(ClusterClient, client)
    cluster.in_flight_limit = pool_size
    # Every node's connections pack commands with hiredis too: the nodes met later are made
    # from these kwargs, the startup nodes already exist.
    kwargs = cluster.nodes_manager.connection_kwargs
    kwargs["connection_class"] = _with_mixins(kwargs["connection_class"], PackedByHiredis)
    for node in cluster.startup_nodes:
        node.connection_class = kwargs["connection_class"]
    return cluster


def _sentinel_primary(settings: Settings, pool_size: int, retries: int = RETRIES) -> Redis:
    primary: dict[str, Any] = {}
    if settings.redis_url:
        primary = dict(parse_url(settings.redis_url))
        for name in ("host", "port", "path"):
            primary.pop(name, None)
        if primary.pop("connection_class", None) is SSLConnection:
            primary["ssl"] = True
    sentinel_auth = {
        "username": settings.redis_sentinel_username,
        "password": settings.redis_sentinel_password,
    }
    sentinel = ReadableSentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        sentinel_kwargs={
            **{k: v for k, v in sentinel_auth.items() if v},
            "socket_timeout": CONNECT_TIMEOUT_SECONDS,
            "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
            # No retry per sentinel: asking the next sentinel is the retry, and the command's
            # own Retry asks them all again. redis-py's default backoff (seconds per attempt,
            # per sentinel, per command retry) kept a command 33 s behind unreachable
            # sentinels, and an api's start (before /health answered) over a minute.
            "retry": Retry(NoBackoff(), 0),
        },
    )
    client: Redis = sentinel.master_for(
        settings.redis_sentinel_master,
        redis_class=Redis,
        connection_pool_class=WaitingSentinelConnectionPool,
        max_connections=pool_size,
        timeout=POOL_WAIT_SECONDS,
        retry=_retry(retries),
        **_timeouts(settings),
        **primary,
    )
    return client


def as_lost_connection(exc: BaseException) -> RedisConnectionError | None:
    """redis-py (8.1) disconnects a node's idle connections after a connection error while
    other tasks may be taking one of them: that task's command then fails inside the
    transport (`handler is closed`, `'NoneType' object has no attribute 'writelines'`). For
    the caller that is a lost connection, an outage to ride through; anything else is a bug.

    So is `UNBLOCKED`: a primary demoted by a manual failover (`CLUSTER FAILOVER`, an upgrade)
    answers every client blocked on it with it, a plain error reply to redis-py."""
    if isinstance(exc, ResponseError) and str(exc).startswith("UNBLOCKED"):
        return RedisConnectionError(f"blocking read ended by a failover: {exc}")
    if not isinstance(exc, (RuntimeError, AttributeError)):
        return None
    text = str(exc)
    if "handler is closed" in text or "'NoneType' object has no attribute" in text:
        return RedisConnectionError(f"connection closed under the command: {text}")
    return None


def as_cluster_outage(exc: BaseException) -> Exception | None:
    """`as_lost_connection`, and what redis-py's cluster client raises for a cluster that is
    changing under it, which are outages to ride through (503, 1013), not bugs (500, 1011):

    - a `KeyError` from its slot map: a slot no primary serves (CLUSTER DELSLOTS, a node lost
      before its failover), or the map being refreshed while a node is frozen;
    - `MOVED`/`ASK` out of a transaction (MULTI): redis-py follows neither inside one, so a
      session's log read during a reshard of its slot failed; the slot map is learnt again and
      the caller's retry goes to the slot's new node."""
    if isinstance(exc, KeyError):
        return SlotNotCoveredError(f"no node serves the slot now (slot map changing): {exc}")
    if isinstance(exc, AskError):  # MovedError too
        return ClusterDownError(f"the slot moved during a transaction: {exc}")
    return as_lost_connection(exc)


# Set while this task runs a command or pipeline of the cluster client (see `aclose`).
_in_command: contextvars.ContextVar[bool] = contextvars.ContextVar("in_command", default=False)


class ClusterClient(RedisCluster):
    """redis-py's cluster client, adjusted where the product needs it.

    - A timeout is not retried (see the module's docstring): the command may have run.
    - Pipelines run Lua scripts by SHA (`Scripts.queue`): redis-py blocks EVALSHA in cluster
      pipelines. A node that lacks a script (restarted, or a promoted replica) answers NOSCRIPT
      for it, as a restarted standalone server does; the callers reload and retry.
    - An outage reported by one node inside a pipeline (CLUSTERDOWN while a restarted node
      rejoins, a connection lost mid-read) raises, as a lost connection does on a standalone
      server, instead of passing for that command's result.
    - redis-py reacts to CLUSTERDOWN (and to repeated MOVED) by closing every connection of
      every node, including those other tasks are using that instant, whose commands then fail
      with errors such as `'NoneType' object has no attribute 'writelines'`. Here the slot map
      is refreshed on the next command instead (which recycles connections once idle), and
      the same errors from redis-py's narrower races are reported as a lost connection.
    """

    ERRORS_ALLOW_RETRY = (RedisConnectionError, ClusterDownError, SlotNotCoveredError)  # type: ignore[assignment]

    # At most this many commands and pipelines in flight at once; more wait for a turn (in
    # order, up to `POOL_WAIT_SECONDS`). redis-py's pool of each node raises
    # MaxConnectionsError at once when its `max_connections` are busy (a burst of socket
    # handshakes); a pipeline holds at most one connection per node, so no node's pool can
    # run out below this limit.
    in_flight_limit: int = 64
    turn_timeout: float = POOL_WAIT_SECONDS
    _turns: asyncio.Semaphore | None = None

    async def _take_turn(self) -> asyncio.Semaphore | None:
        """A turn for one command or pipeline (None inside one: it holds the turn)."""
        if _in_command.get():
            return None
        turns = self._turns
        if turns is None:
            turns = self._turns = asyncio.Semaphore(self.in_flight_limit)
        if not turns.locked():
            await turns.acquire()
            return turns
        try:
            async with asyncio.timeout(self.turn_timeout):
                await turns.acquire()
        except TimeoutError:
            raise MaxConnectionsError(
                f"no Redis connection free within {self.turn_timeout:g} s"
            ) from None
        return turns

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        turn = await self._take_turn()
        token = _in_command.set(True)
        try:
            return await super().execute_command(*args, **kwargs)
        except (RuntimeError, AttributeError, ResponseError, KeyError) as exc:
            lost = as_cluster_outage(exc)
            if lost is None:
                raise
            self._initialize = True  # the slot map changed (a failover): learn it again
            raise lost from exc
        finally:
            _in_command.reset(token)
            if turn is not None:
                turn.release()

    async def aclose(self) -> None:
        if not _in_command.get():
            await super().aclose()  # the owner closes the client
            return
        # redis-py's own reset, from inside a failing command (see the class docstring): the
        # next command refreshes the slot map, which recycles connections once they are idle.
        self._initialize = True

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> ClusterClient:
        """Reaching no node at all is an outage (`REDIS_DOWN`), not a programming error."""
        try:
            await super().initialize(additional_startup_nodes_info, last_failed_node_name)
        except RedisClusterException as exc:
            if str(exc).startswith(_UNREACHABLE_CLUSTER) and "not enabled" not in str(exc):
                raise RedisConnectionError(str(exc)) from exc
            raise
        return self

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return ScriptingClusterPipeline(self, transaction)  # type: ignore[abstract]

    def node_pubsub(self, node: ClusterNode) -> tuple[Redis, PubSub]:
        """A client of its own on one node and a pub/sub on it (for SSUBSCRIBE per node).

        Close both when done: `await pubsub.aclose(); await client.aclose()`.
        """
        pool = ConnectionPool(
            connection_class=node.connection_class, max_connections=2, **node.connection_kwargs
        )
        client = Redis.from_pool(pool)
        return client, client.pubsub()


# redis-py's cluster pipelines and transactions read the errors they retry from RedisCluster
# itself, not from the client's class: a pipeline that timed out was sent again whole, up to
# four times with pauses (a dead letter written twice; /health/detailed 13-16 s and a send
# 19 s behind one frozen primary, where one timeout is 3 s). The same rule as for commands.
RedisCluster.ERRORS_ALLOW_RETRY = ClusterClient.ERRORS_ALLOW_RETRY  # type: ignore[assignment]


class ScriptingClusterPipeline(ClusterPipeline):
    """A cluster pipeline that queues EVALSHA (see `ClusterClient`).

    Commands of one slot go to one node over one connection in the order they were queued,
    so the per-session order of a pipeline holds; commands of different nodes run in parallel
    with no order between them.
    """

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> ScriptingClusterPipeline:
        self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)
        return self

    def __await__(self) -> Generator[Any, None, ClusterPipeline]:
        # redis-py's script objects `await client.evalsha(...)`; the base class answers that
        # by re-initializing the pipeline, which would silently empty its queue.
        return self._same().__await__()

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        client = cast(ClusterClient, self.cluster_client)
        turn = await client._take_turn()
        token = _in_command.set(True)
        try:
            results: list[Any] = await super().execute(raise_on_error, allow_redirections)
        except (RuntimeError, AttributeError, ResponseError, KeyError) as exc:
            lost = as_cluster_outage(exc)
            if lost is None:
                raise
            client._initialize = True
            raise lost from exc
        finally:
            _in_command.reset(token)
            if turn is not None:
                turn.release()
        for result in results:
            if isinstance(result, REDIS_DOWN):
                raise result
            if isinstance(result, ResponseError) and (lost := as_cluster_outage(result)):
                client._initialize = True
                raise lost from result
        return results

    async def _same(self) -> ScriptingClusterPipeline:
        return self


async def verify_topology(settings: Settings, claim_partitions: bool = False) -> None:
    """Stop the process with one line when the server reached is not of the configured mode,
    or (`claim_partitions`: an api or a worker) when the installation records another
    `CALLBACK_PARTITIONS` (`services.core.partition_count`).

    Unreachable servers are not an error here: every process waits for Redis by itself.
    """
    try:
        async with asyncio.timeout(VERIFY_TIMEOUT_SECONDS):
            await _verify(settings, claim_partitions)
    except ConfigError:
        raise
    except (*REDIS_DOWN, TimeoutError) as exc:
        # Quietly: a CLI command reports it in its own words, a service logs its retries.
        log.debug("redis not reachable at start (%s); mode not verified", exc)
    except ResponseError as exc:
        if "DB index" not in str(exc):
            raise
        # The URL's database does not exist on that server (SELECT at every connection).
        raise ConfigError(
            f"ORCHESTRATOR_REDIS_URL: the server refused its database ({exc})"
        ) from None


async def _verify(settings: Settings, claim_partitions: bool) -> None:
    settings.require_redis_topology()
    mode = settings.redis_mode
    name = "ORCHESTRATOR_REDIS_MODE"
    if mode is RedisMode.sentinel:
        await _verify_sentinels(settings)
    client = create_redis(settings, max_connections=2)
    try:
        if mode is RedisMode.cluster:
            try:
                await cast(RedisCluster, client).initialize()
            except RedisClusterException as exc:
                if "not enabled" in str(exc):
                    raise ConfigError(
                        f"{name}: cluster, but {_address(settings)} is not a cluster node "
                        "(cluster mode is not enabled); set ORCHESTRATOR_REDIS_MODE=standalone"
                    ) from None
                raise
            await warn_on_eviction(client)
            if claim_partitions:
                await partition_count.claim_at_start(client, settings.callback_partitions)
            return
        info = await client.info("server")
        server_mode = str(info.get("redis_mode") or info.get("server_mode") or "standalone")
        where = (
            "the primary named by the sentinels"
            if mode is RedisMode.sentinel
            else (_address(settings))
        )
        if server_mode == "cluster":
            raise ConfigError(
                f"{name}: {mode.value}, but {where} is a Redis Cluster node; "
                "set ORCHESTRATOR_REDIS_MODE=cluster"
            )
        if server_mode == "sentinel":
            raise ConfigError(
                f"{name}: {mode.value}, but {where} is a Sentinel; set "
                "ORCHESTRATOR_REDIS_MODE=sentinel and ORCHESTRATOR_REDIS_SENTINELS to it"
            )
        await warn_on_eviction(client)
        if claim_partitions:
            await partition_count.claim_at_start(client, settings.callback_partitions)
    finally:
        await client.aclose()


NEEDED_POLICY = "noeviction"


async def eviction_policy(redis: Redis) -> str | None:
    """The servers' `maxmemory-policy` (on a cluster every primary's: the first one that
    evicts, else `noeviction`; one node of three set to `allkeys-lru` went unseen), or None
    when Redis will not tell (managed Redis often refuses CONFIG)."""
    try:
        if is_cluster(redis):
            reply: Any = await redis.config_get(
                "maxmemory-policy",
                target_nodes=RedisCluster.PRIMARIES,
            )
        else:
            reply = await redis.config_get("maxmemory-policy")
    except ResponseError:
        return None
    policies = sorted(set(_policy_values(reply)))
    evicting = [policy for policy in policies if policy != NEEDED_POLICY]
    return evicting[0] if evicting else (policies[0] if policies else None)


def _policy_values(reply: Any) -> list[str]:
    """The values of a CONFIG GET reply: one dict, or one per node (a cluster)."""
    if not isinstance(reply, dict):
        return []
    found: list[str] = []
    for value in reply.values():
        if isinstance(value, dict):
            found.extend(_policy_values(value))
        else:
            found.append(value.decode() if isinstance(value, bytes) else str(value))
    return found


async def warn_on_eviction(redis: Redis) -> None:
    """One warning line at start when Redis may evict keys: under any policy but
    `noeviction` a full Redis deletes, without an error, task states, Idempotency-Keys,
    leases, session logs, streams and consumer groups. Refusing writes (OOM) is what the
    service rides out; losing its state silently is not."""
    policy = await eviction_policy(redis)
    if policy is not None and policy != NEEDED_POLICY:
        log.warning(
            "redis maxmemory-policy is %s: when full, Redis evicts the service's keys "
            "(task states, streams, leases); run it with maxmemory-policy %s",
            policy,
            NEEDED_POLICY,
        )


async def _verify_sentinels(settings: Settings) -> None:
    """Every reachable sentinel must be a sentinel that monitors the configured master."""
    master = settings.redis_sentinel_master
    for host, port in settings.sentinel_addresses:
        sentinel = Redis(
            host=host,
            port=port,
            username=settings.redis_sentinel_username,
            password=settings.redis_sentinel_password,
            socket_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        )
        try:
            masters = cast(dict[str, Any], await sentinel.sentinel_masters())
        except ResponseError:
            raise ConfigError(
                f"ORCHESTRATOR_REDIS_SENTINELS: {host}:{port} is not a Sentinel "
                "(it does not know the SENTINEL command)"
            ) from None
        except REDIS_DOWN:
            continue
        finally:
            await sentinel.aclose()
        if master not in masters:
            known = ", ".join(sorted(masters)) or "none"
            raise ConfigError(
                f"ORCHESTRATOR_REDIS_SENTINEL_MASTER: the sentinel at {host}:{port} monitors "
                f"no master named {master!r} (it monitors: {known})"
            )


def _address(settings: Settings) -> str:
    parsed = parse_url(settings.redis_address)
    return f"{parsed.get('host', '?')}:{parsed.get('port', 6379)}"
