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
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core.settings import ConfigError, RedisMode, Settings

RedisClient = Redis

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

COMMAND_TIMEOUT_SECONDS = 2.0  # beyond the longest blocking read (XREADGROUP BLOCK)
CONNECT_TIMEOUT_SECONDS = 2.0
RETRIES = 3
BACKOFF_BASE_SECONDS = 0.05
BACKOFF_CAP_SECONDS = 0.5


def create_redis(settings: Settings, *, max_connections: int | None = None) -> Redis:
    """A pooled client. Commands retry with jittered backoff across short outages."""
    if settings.redis_mode is not RedisMode.standalone:
        raise ConfigError(
            f"ORCHESTRATOR_REDIS_MODE: '{settings.redis_mode}' is not supported by this build yet"
        )
    # Blocking stream reads wait up to `worker_sleep_seconds` for an answer by design.
    longest_block = settings.worker_sleep_seconds
    return Redis.from_url(
        settings.redis_address,
        max_connections=max_connections or settings.redis_max_connections,
        retry=Retry(
            ExponentialWithJitterBackoff(base=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS),
            retries=RETRIES,
            supported_errors=(RedisConnectionError,),
        ),
        socket_timeout=longest_block + COMMAND_TIMEOUT_SECONDS,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_keepalive=True,
        health_check_interval=30,
    )
