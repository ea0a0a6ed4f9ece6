"""The Redis client of every process, built from settings, with reconnect and backoff."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.core.settings import ConfigError, RedisMode, Settings

RedisClient = Redis

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)


def create_redis(settings: Settings, *, max_connections: int | None = None) -> Redis:
    """A pooled client. Commands retry with jittered backoff across short outages."""
    if settings.redis_mode is not RedisMode.standalone:
        raise ConfigError(
            f"ORCHESTRATOR_REDIS_MODE: '{settings.redis_mode}' is not supported by this build yet"
        )
    return Redis.from_url(
        settings.redis_address,
        max_connections=max_connections or settings.redis_max_connections,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_keepalive=True,
        health_check_interval=30,
        socket_connect_timeout=5,
    )
