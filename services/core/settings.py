"""The one validated settings object, read from `ORCHESTRATOR_*` variables once at start.

A bad value stops the process with a single line naming the variable (`ConfigError`), so an
operator reading `kubectl logs` sees what to fix instead of a traceback.
"""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from redis.asyncio.connection import parse_url

from services.core.ids import is_valid_id

ENV_PREFIX = "ORCHESTRATOR_"


class ConfigError(Exception):
    """Invalid configuration; the message is one line naming the variable."""


class RedisMode(StrEnum):
    standalone = "standalone"
    cluster = "cluster"
    sentinel = "sentinel"


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


_HOUR, _DAY, _YEAR = 3600, 86_400, 365 * 86_400
_MAX_BYTES = 1024**3  # far above any frame, body or head a process should take
MESSAGE_ENVELOPE_BYTES = 1024  # a frame's or body's JSON around the message text
# The most bytes one character of a message takes in JSON: a character outside the BMP escaped
# as a surrogate pair (`\ud83d\ude00`), as Python's json.dumps (httpx, requests) writes it.
MESSAGE_BYTES_PER_CHAR = 12


class Settings(BaseSettings):
    """Every knob of the product. Names are fixed by DESIGN §6; defaults suit a single pod."""

    # No `inf`/`nan`: they pass every lower bound, then `int(inf)` fails in the middle of a
    # start (a traceback) or Redis refuses the expiry. Every duration also has an upper bound
    # (Redis accepts expiries up to about 2^63 ms; a year is beyond any sensible value).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,
    )

    # Redis
    redis_host: str = Field("localhost", min_length=1)  # empty: redis-py took it for localhost
    redis_port: int = Field(6379, ge=1, le=65535)
    redis_url: str | None = None
    redis_mode: RedisMode = RedisMode.standalone
    redis_sentinels: CommaList = []
    redis_sentinel_master: str = "mymaster"
    redis_max_connections: int = Field(64, ge=4, le=100_000)

    # WebSocket
    websocket_ping_interval: float = Field(30.0, gt=0, le=_HOUR)
    websocket_ping_timeout: float = Field(10.0, gt=0, le=_HOUR)
    websocket_compression: bool = False
    websocket_send_queue: int = Field(1000, ge=1, le=10_000_000)
    # ...and characters: frames are bounded by count, an AES's websocket.send is not by size.
    websocket_send_queue_chars: int = Field(4 * 1024 * 1024, ge=1024, le=2**40)
    max_websocket_connections: int = Field(1000, ge=1, le=100_000_000)
    connection_ttl_seconds: float = Field(30.0, ge=3, le=_DAY)
    websocket_frames_per_second: float = Field(20.0, gt=0, le=1_000_000)
    # As large as a REST body: a message of MAX_MESSAGE_CHARS characters sent on the socket
    # must fit (`_coherent`), and JSON takes up to 12 bytes a character (escaped emoji).
    max_frame_bytes: int = Field(512 * 1024, ge=1024, le=_MAX_BYTES)
    # A request head (request line and headers, a socket handshake's too): its size and the
    # time it may take to arrive, before any authentication, and the longest silence within a
    # request body (services/api/http_protocol.py).
    http_max_head_bytes: int = Field(64 * 1024, ge=8 * 1024, le=_MAX_BYTES)
    http_head_timeout_seconds: float = Field(10.0, gt=0, le=_HOUR)

    # Worker and transport
    worker_sleep_seconds: float = Field(1.0, gt=0, le=60)
    worker_batch_size: int = Field(100, ge=1, le=10_000)
    callback_partitions: int = Field(8, ge=1, le=1024)
    partition_lease_seconds: float = Field(10.0, ge=1, le=_HOUR)
    max_delivery_attempts: int = Field(5, ge=1, le=1_000_000)
    session_log_maxlen: int = Field(1000, ge=10, le=10_000_000)
    session_log_ttl_seconds: int = Field(3600, ge=10, le=_YEAR)
    task_ttl_seconds: int = Field(86_400, ge=60, le=_YEAR)
    max_task_attempts: int = Field(3, ge=1, le=100)
    retry_backoff_seconds: float = Field(0.5, ge=0, le=_DAY)
    retry_backoff_max_seconds: float = Field(30.0, ge=0, le=_DAY)
    drain_seconds: float = Field(10.0, ge=0, le=_HOUR)

    # Executor (the bundled reference AES)
    # Also the COUNT of its reads: Redis takes a signed 64-bit integer; far fewer make sense.
    executor_concurrency: int = Field(64, ge=1, le=100_000)
    executor_chunk_delay_ms: float = Field(20.0, ge=0, le=60_000)
    executor_reclaim_idle_seconds: float = Field(30.0, ge=1, le=_DAY)

    # Clients and auth
    max_requests_per_session: int = Field(100, ge=1, le=60_000_000)  # tiers.MAX_PER_MINUTE
    default_tier: str = "free"
    default_agent: str = "default"
    jwt_secret: str | None = None
    # Accepted beside jwt_secret while tokens signed with it are still in use (a rotation).
    jwt_previous_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_private_key: str | None = None
    # An identity provider's JWK Set, read at start and kept fresh (services/core/jwks.py).
    jwt_jwks_url: str | None = None
    jwt_jwks_refresh_seconds: float = Field(300.0, ge=30, le=_DAY)
    allowed_origins: CommaList = []
    max_message_chars: int = Field(32_000, ge=1, le=_MAX_BYTES // MESSAGE_BYTES_PER_CHAR)
    max_body_bytes: int = Field(512 * 1024, ge=1024, le=_MAX_BYTES)

    # Persistence and retention (used by later parts; validated now so typos fail early)
    database_url: str | None = None
    history_retention_days: int = Field(30, ge=1, le=36_500)
    validation_cache_ttl: float = Field(300.0, ge=0, le=_DAY)

    # Tenancy
    require_known_tenant: bool = False
    tiers_file: str | None = None
    tiers: str | None = None

    # Persistence (issue 9)
    database_pool_size: int = Field(5, ge=1, le=200)
    database_connect_timeout_seconds: float = Field(5.0, gt=0, le=300)
    database_command_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    persist_batch_size: int = Field(500, ge=1, le=5000)
    persist_retry_max_seconds: float = Field(5.0, gt=0, le=300)
    persist_reclaim_idle_seconds: float = Field(60.0, ge=1, le=_DAY)
    persist_stream_maxlen: int = Field(1_000_000, ge=1000, le=10**12)  # XADD MAXLEN: 64 bits
    history_page_max: int = Field(200, ge=1, le=1000)

    # Redis topology (issue 11)
    # Sentinel: the sentinels' own credentials (the master's come from REDIS_URL when set).
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = None

    # Process
    metrics_port: int = Field(9090, ge=0, le=65535)
    metrics_tenant_labels: int = Field(20, ge=0, le=1000)
    log_level: LogLevel = LogLevel.INFO
    pod_name: str | None = None

    @field_validator("allowed_origins", "redis_sentinels", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        # A browser's Origin is `scheme://host[:port]` and nothing else: an entry with a path,
        # a trailing slash or no scheme matched no page, and every socket and CORS request of
        # the intended site was refused with nothing saying why. Written as a browser sends
        # it: lower case, without the scheme's default port (`https://App.example.com:443`
        # matched no page either).
        normalised = []
        for origin in value:
            if origin == "*":
                normalised.append(origin)
                continue
            scheme, separator, rest = origin.partition("://")
            if not separator or not scheme or not rest or any(c in rest for c in "/?#"):
                raise ValueError(
                    f"{origin!r} is not an origin: scheme://host[:port], no path or trailing /"
                )
            # A host with a space or credentials, or a port that is not a number, is no
            # Origin a browser sends either (`https://app example.com` loaded, matched nothing).
            host, colon, port = ("", "", "") if rest.endswith("]") else rest.rpartition(":")
            host = host if colon else rest
            if (
                not host
                or "@" in rest
                or any(c.isspace() for c in rest)
                or (colon and not (port.isdigit() or port == "*"))
            ):
                raise ValueError(f"{origin!r} is not an origin: scheme://host[:port]")
            scheme, rest = scheme.lower(), rest.lower()
            default = {"https": ":443", "http": ":80"}.get(scheme)
            if default and rest.endswith(default):
                rest = rest.removesuffix(default)
            normalised.append(f"{scheme}://{rest}")
        return normalised

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("jwt_algorithm")
    @classmethod
    def _algorithm(cls, value: str) -> str:
        allowed = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"}
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(sorted(allowed))}")
        return value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must start with https:// (or http://)")
        if value is not None and not urlsplit(value).hostname:
            raise ValueError("names no host")  # read every 5 s in vain, never ready
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # Checked at start, not at the first connection (a traceback); never echoed: a URL
        # may carry a password.
        if value is None:
            return value
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        try:
            port = urlsplit(value).port  # raises for a port beyond 65535
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError("its port is not a number from 1 to 65535")
        if value.startswith(("redis://", "rediss://")):
            # Each silently meant something else: no host, localhost; a database that is not
            # a number, database 0. A parameter redis-py cannot read crashed at the first
            # connection with a traceback that named no variable.
            if not urlsplit(value).hostname:
                raise ValueError("names no host")
            database = urlsplit(value).path.strip("/")
            if database and not database.isdigit():
                raise ValueError("its database (the path) is not a number")
            try:
                options = parse_url(value)
            except ValueError as exc:
                raise ValueError(str(exc).split(" in connection URL")[0]) from None
            # Kept as text by parse_url and read at the first TLS connection: a bad one was
            # a RedisError there (exit 1, a traceback in the api and the worker).
            reqs = options.get("ssl_cert_reqs")
            if reqs is not None and str(reqs).lower() not in ("none", "optional", "required"):
                raise ValueError("its ssl_cert_reqs is not none, optional or required")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        # At start in every process (the api met it in its lifespan only: a traceback and
        # "Application startup failed"); never echoed: it may carry a password.
        if value and not value.startswith(
            ("postgresql://", "postgres://", "postgresql+asyncpg://")
        ):
            raise ValueError("must start with postgresql:// (or postgres://)")
        if value:
            # A bad port was met by the writer only: "invalid literal for int()" taken for
            # each record's own fault, and the whole history dead-lettered.
            try:
                hosts = urlsplit(value).netloc.rpartition("@")[2]
                for host in hosts.split(","):  # libpq takes several hosts
                    urlsplit(f"//{host}").port  # noqa: B018 (raises for a bad port)
            except ValueError:
                raise ValueError(
                    "is not a URL libpq can read (its host or port: a port is 1-65535)"
                ) from None
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: list[str]) -> list[str]:
        for n, address in enumerate(value, start=1):
            host, _, port = address.rpartition(":")
            if "@" in host or " " in host:  # credentials: never echoed
                raise ValueError(f"entry {n} is not host:port (credentials go elsewhere)")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{address!r} is not host:port")
        return value

    @field_validator("default_agent")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        # Every send without an agent names it: an invalid one was accepted (202), and each
        # action was then dead-lettered by the AES side as malformed.
        if not is_valid_id(value):
            raise ValueError(f"{value!r} is not an agent id ([A-Za-z0-9_-], 1 to 64 characters)")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        # A message within MAX_MESSAGE_CHARS must fit a frame and a body whatever its script
        # and however its JSON is written: up to 12 bytes a character (an escaped surrogate
        # pair; 4 in raw UTF-8), and room for the rest of the JSON.
        least = MESSAGE_BYTES_PER_CHAR * self.max_message_chars + MESSAGE_ENVELOPE_BYTES
        for name, value in (("FRAME", self.max_frame_bytes), ("BODY", self.max_body_bytes)):
            if value < least:
                raise ValueError(
                    f"MAX_{name}_BYTES ({value}) cannot hold a message of "
                    f"{ENV_PREFIX}MAX_MESSAGE_CHARS ({self.max_message_chars}) characters "
                    f"({least} bytes of JSON at worst): raise it, or lower the other"
                )
        return self

    def require_redis_topology(self) -> None:
        """Raise `ConfigError` if REDIS_MODE lacks the addresses it needs.

        Checked when a Redis client is built, not at load: `migrate` and `prune` read the same
        settings ConfigMap as the services but never talk to Redis, and a cluster's seed URL
        lives in a Secret only the services mount.
        """
        if self.redis_mode is RedisMode.sentinel and not self.redis_sentinels:
            raise ConfigError(
                f"{ENV_PREFIX}REDIS_SENTINELS is required when REDIS_MODE is sentinel"
            )
        if self.redis_mode is not RedisMode.sentinel and self.redis_sentinels:
            # Set for a Sentinel deployment but the mode left at its default: the process used
            # REDIS_URL (or localhost) without a word.
            raise ConfigError(
                f"{ENV_PREFIX}REDIS_MODE: is {self.redis_mode.value}, but REDIS_SENTINELS is "
                "set: set REDIS_MODE=sentinel, or unset REDIS_SENTINELS"
            )
        if self.redis_mode is RedisMode.cluster and not self.redis_url:
            raise ConfigError(
                f"{ENV_PREFIX}REDIS_URL (a seed node) is required when REDIS_MODE is cluster"
            )

    @property
    def redis_address(self) -> str:
        return self.redis_url or f"redis://{self.redis_host}:{self.redis_port}/0"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """`REDIS_SENTINELS` as (host, port) pairs (validated at load)."""
        pairs = (address.rpartition(":") for address in self.redis_sentinels)
        return [(host, int(port)) for host, _, port in pairs]

    @property
    def uses_public_key(self) -> bool:
        return not self.jwt_algorithm.startswith("HS")


def process_name(settings: Settings) -> str:
    """ORCHESTRATOR_POD_NAME, or hostname-pid: the name of this process as a consumer, a
    worker, a pod (unique per process on a host, readable in Redis and on dashboards)."""
    return settings.pod_name or f"{socket.gethostname()}-{os.getpid()}"


def load_settings(**overrides: Any) -> Settings:
    """Read the environment; raise `ConfigError` with one line naming the bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = [str(part) for part in error.get("loc", ()) if isinstance(part, str | int)]
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if location:
            name = ENV_PREFIX + location[0].upper()
            raise ConfigError(f"{name}: {message}") from None
        if message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        raise ConfigError(f"{ENV_PREFIX}{message}") from None
