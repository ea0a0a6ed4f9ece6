"""The async engine (SQLAlchemy 2 on asyncpg) and what a database failure means for callers.

One bounded pool per process, built from settings. Failures fall into two kinds: a *data*
error (the row itself is unacceptable: retrying cannot help) and anything else (server down,
restarting, timed out, deadlocked, not migrated yet), which is worth retrying later.

`ORCHESTRATOR_DATABASE_URL` is a libpq URL, often copied from a managed database with
parameters (`sslmode`, `sslrootcert`, `connect_timeout`, `application_name`, `options`...).
SQLAlchemy would hand each query parameter to `asyncpg.connect()` as a keyword argument, and
most are not asyncpg's (a TypeError on every connection, so a 500 on every history request).
So the URL goes to asyncpg as its `dsn` instead: asyncpg's own DSN parser implements libpq's
host lists, ssl files and `target_session_attrs`. What it lacks is translated here, and what
cannot be honoured at all is refused when the engine is built: at start, in one line.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, QueuePool

from services.core.settings import ConfigError, Settings

VARIABLE = "ORCHESTRATOR_DATABASE_URL"
_PLAIN_SCHEMES = {"postgres", "postgresql", "postgresql+asyncpg"}
# Everything about the server travels in the `dsn` connect argument, not in this URL.
_DIALECT_URL = "postgresql+asyncpg://"
DEFAULT_APPLICATION_NAME = "agent-orchestrator"

# libpq parameters asyncpg's DSN parser implements itself; each value is checked here first,
# because asyncpg only checks it when it connects (an error per request, not one at start).
_ENUMS: dict[str, frozenset[str]] = {
    "sslmode": frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}),
    "target_session_attrs": frozenset(
        {"any", "primary", "standby", "read-write", "read-only", "prefer-standby"}
    ),
    "gsslib": frozenset({"gssapi", "sspi"}),
    "sslnegotiation": frozenset({"postgres", "direct"}),
}
_VERIFYING = ("require", "verify-ca", "verify-full")
_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl", "passfile")
_TLS_VERSIONS = ("ssl_min_protocol_version", "ssl_max_protocol_version")
_FREE = ("host", "port", "dbname", "user", "password", "service", "sslpassword", "krbsrvname")
_FOR_ASYNCPG = frozenset((*_ENUMS, *_FILES, *_TLS_VERSIONS, *_FREE))

# Accepted with nothing to pass on: with these values libpq would behave as asyncpg does
# anyway (asyncpg never uses channel binding or GSS encryption, sends SNI, speaks UTF-8).
# Any other value asks for something asyncpg cannot do, so it is refused.
_ALREADY_SO: dict[str, frozenset[str]] = {
    "channel_binding": frozenset({"disable", "prefer"}),
    "gssencmode": frozenset({"disable", "prefer"}),
    "sslsni": frozenset({"1"}),
    "load_balance_hosts": frozenset({"disable"}),
    "sslcompression": frozenset({"0", "1"}),  # no server since PostgreSQL 14 compresses
    "client_encoding": frozenset({"utf8", "UTF8", "utf-8", "UTF-8", "unicode", "UNICODE"}),
}
# Translated into connect arguments; `ssl` is the spelling this module once wrote for sslmode.
_TRANSLATED = frozenset(
    {
        "connect_timeout",
        "application_name",
        "fallback_application_name",
        "options",
        "prepared_statement_cache_size",
        "ssl",
    }
)
SUPPORTED = frozenset(_FOR_ASYNCPG | _ALREADY_SO.keys() | _TRANSLATED)


@dataclass
class AsyncpgTarget:
    """What `asyncpg.connect()` needs for one URL: the dsn plus what the URL translates to."""

    dsn: str
    timeout: float | None = None
    server_settings: dict[str, str] = field(default_factory=dict)
    ssl_context: ssl.SSLContext | None = None
    dialect: dict[str, int] = field(default_factory=dict)  # SQLAlchemy's own DBAPI arguments

    def connect_args(
        self, *, timeout: float | None = None, command_timeout: float | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for `asyncpg.connect()`: the URL's values win over the defaults
        given here, as libpq lets a URL's `connect_timeout` and `application_name` win."""
        args: dict[str, Any] = {"dsn": self.dsn, **self.dialect}
        args["server_settings"] = {"application_name": DEFAULT_APPLICATION_NAME}
        args["server_settings"].update(self.server_settings)
        if (chosen := self.timeout or timeout) is not None:
            args["timeout"] = chosen
        if command_timeout is not None:
            args["command_timeout"] = command_timeout
        if self.ssl_context is not None:
            args["ssl"] = self.ssl_context  # wins over the dsn's sslmode, in asyncpg
        return args


def _refuse(reason: str) -> ConfigError:
    return ConfigError(f"{VARIABLE}: {reason}")


def _parameters(query: str) -> dict[str, str]:
    """The URL's parameters, the last of a repeated one winning (as in libpq and asyncpg);
    an empty value counts as not given (asyncpg's parser would refuse it on every connect)."""
    # Decoded as libpq decodes it: `%` escapes only. parse_qsl read `+` as a space, so a
    # `password=a+b` that psql accepts was refused as a wrong password.
    pairs = []
    for item in query.split("&") if query else ():
        key, separator, value = item.partition("=")
        if not separator or not key:
            raise _refuse("the query string after '?' is not key=value&key=value")
        pairs.append((unquote(key), unquote(value)))
    parameters = dict(pairs)
    unknown = sorted(parameters.keys() - SUPPORTED)
    if unknown:
        raise _refuse(
            f"parameter {unknown[0]!r} is not supported (supported: {', '.join(sorted(SUPPORTED))})"
        )
    return {key: value for key, value in parameters.items() if value}


def _check_for_asyncpg(parameters: dict[str, str]) -> None:
    """Refuse now the values asyncpg would refuse on every connection attempt."""
    for name, allowed in (_ENUMS | _ALREADY_SO).items():
        value = parameters.get(name)
        if value is not None and value not in allowed:
            raise _refuse(f"{name}={value!r} cannot be honoured; use one of {sorted(allowed)}")
    for name in _FILES:
        path = parameters.get(name)
        if path is None or (name == "sslrootcert" and path == "system"):
            continue
        if not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise _refuse(f"{name}: {path!r} is not a readable file")
    for name in _TLS_VERSIONS:
        if name in parameters:
            _tls_version(name, parameters[name])
    system = parameters.get("sslrootcert") == "system"
    mode = parameters.get("sslmode", "verify-full" if system else "prefer")
    if parameters.get("sslnegotiation") == "direct" and mode not in _VERIFYING:
        raise _refuse("sslnegotiation=direct needs sslmode=require, verify-ca or verify-full")


def _tls_version(name: str, value: str) -> ssl.TLSVersion:
    try:
        if value.startswith("TLS"):
            return ssl.TLSVersion[value.replace(".", "_")]
    except KeyError:
        pass
    raise _refuse(f"{name}={value!r} is not a TLS version (TLSv1.2, TLSv1.3...)")


def _positive_number(name: str, value: str) -> float:
    """libpq's 0 means "wait for ever", which this service never does (every wait is bounded)."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not number > 0 or number == float("inf"):
        raise _refuse(f"{name}={value!r}: expected a positive number of seconds")
    return number


def _system_trust(parameters: dict[str, str]) -> ssl.SSLContext:
    """libpq's `sslrootcert=system`: the system's CAs, host name checked (verify-full).
    asyncpg would read "system" as a file name, so the context is built here instead."""
    mode = parameters.get("sslmode", "verify-full")
    if mode != "verify-full":
        raise _refuse(f"sslrootcert=system needs sslmode=verify-full, not {mode!r}")
    context = ssl.create_default_context()
    try:
        if "sslcert" in parameters:
            password = parameters.get("sslpassword", "")
            context.load_cert_chain(parameters["sslcert"], parameters.get("sslkey"), password)
        if "sslcrl" in parameters:
            context.load_verify_locations(cafile=parameters["sslcrl"])
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    except (OSError, ssl.SSLError) as exc:
        raise _refuse(f"sslcert, sslkey or sslcrl cannot be loaded ({exc})") from None
    context.minimum_version = _tls_version(
        "ssl_min_protocol_version", parameters.get("ssl_min_protocol_version", "TLSv1.2")
    )
    if "ssl_max_protocol_version" in parameters:
        context.maximum_version = _tls_version(
            "ssl_max_protocol_version", parameters["ssl_max_protocol_version"]
        )
    return context


def _server_settings(parameters: dict[str, str]) -> dict[str, str]:
    """`application_name` (else `fallback_application_name`) and `options`, which PostgreSQL
    reads from the startup packet exactly as libpq sends them (`-c name=value ...`)."""
    settings: dict[str, str] = {}
    name = parameters.get("application_name") or parameters.get("fallback_application_name")
    if name:
        settings["application_name"] = name
    if "options" in parameters:
        settings["options"] = parameters["options"]
    return settings


def asyncpg_target(database_url: str) -> AsyncpgTarget:
    """`database_url` (libpq's `postgresql://...`) as asyncpg connect arguments, or a
    one-line ConfigError naming the variable and the first parameter that cannot be honoured."""
    parts = urlsplit(database_url)
    if parts.scheme not in _PLAIN_SCHEMES:
        raise _refuse(f"expected postgresql://..., got a {parts.scheme!r} URL")
    parameters = _parameters(parts.query)
    if "ssl" in parameters:
        ssl_mode = parameters.pop("ssl")
        parameters.setdefault("sslmode", ssl_mode)
    _check_for_asyncpg(parameters)
    # asyncpg ignores the dsn's ssl parameters when given a context, so they can stay in it.
    kept = {key: value for key, value in parameters.items() if key in _FOR_ASYNCPG}
    target = AsyncpgTarget(
        dsn=urlunsplit(parts._replace(scheme="postgresql", query=urlencode(kept, quote_via=quote))),
        server_settings=_server_settings(parameters),
    )
    if "connect_timeout" in parameters:
        target.timeout = _positive_number("connect_timeout", parameters["connect_timeout"])
    if "prepared_statement_cache_size" in parameters:
        size = parameters["prepared_statement_cache_size"]
        if not size.isdigit():
            raise _refuse(f"prepared_statement_cache_size={size!r}: expected 0 or more")
        target.dialect["prepared_statement_cache_size"] = int(size)
    if parameters.get("sslrootcert") == "system":
        target.ssl_context = _system_trust(parameters)
    return target


def async_engine(
    database_url: str,
    *,
    timeout: float | None = None,
    command_timeout: float | None = None,
    **options: Any,
) -> AsyncEngine:
    """An engine on `database_url` with SQLAlchemy's `options` (pool size and the like)."""
    target = asyncpg_target(database_url)
    connect_args = target.connect_args(timeout=timeout, command_timeout=command_timeout)
    return create_async_engine(_DIALECT_URL, connect_args=connect_args, **options)


def create_engine(settings: Settings) -> AsyncEngine:
    """The process's pool: at most `database_pool_size` connections, none beyond it.

    Timeouts bound every wait, so a PostgreSQL outage surfaces as an error to retry instead of
    a hung writer or request; `pool_pre_ping` replaces connections a restart left dead. A
    `connect_timeout` in the URL replaces the connect timeout setting for each connection.
    """
    if not settings.database_url:
        raise ConfigError(f"{VARIABLE}: required for persistence")
    return async_engine(
        settings.database_url,
        timeout=settings.database_connect_timeout_seconds,
        command_timeout=settings.database_command_timeout_seconds,
        hide_parameters=True,  # an error's text would carry the rows: message bodies
        pool_size=settings.database_pool_size,
        max_overflow=0,
        pool_timeout=settings.database_connect_timeout_seconds,
        pool_pre_ping=True,
    )


def create_oneshot_engine(database_url: str) -> AsyncEngine:
    """An engine without a pool, for commands that open one connection and exit."""
    return async_engine(database_url, poolclass=NullPool, hide_parameters=True)


# data exception, integrity constraint violation, program limit exceeded (an index row over
# its 2704 bytes: the record's data, retried for ever as an outage before)
DATA_ERROR_CLASSES = ("22", "23", "54")


def is_data_error(exc: BaseException) -> bool:
    """The record cannot be written for its data: never retry it. Either PostgreSQL refused
    the statement (SQLSTATE classes 22 and 23; asyncpg reports most of these as a plain
    driver error, so the SQLSTATE decides), or the record could not even be turned into
    rows (a number or an id out of range: ValueError, decimal's InvalidOperation), which
    retried as an outage would hold the writer on that batch for ever."""
    if isinstance(exc, sa_exc.DataError | sa_exc.IntegrityError | ValueError | ArithmeticError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        state = getattr(exc.orig, "sqlstate", None)
        return isinstance(state, str) and state[:2] in DATA_ERROR_CLASSES
    return False


PING_SECONDS = 2.0  # `database_state`'s longest wait for PostgreSQL's answer


async def database_state(engine: AsyncEngine) -> dict[str, Any]:
    """PostgreSQL's state for `/health/detailed`: `up` when it answers a trivial query, else
    `down`; `busy` when every connection of the pod's pool is taken (history reads waiting on
    a slow or locked table), said at once with the pool's figures. The ping waited for a
    connection of that pool for the connect timeout and then said `down`: an SRE read an
    outage into a pod whose database answered and whose pool was busy."""
    pool = engine.pool
    sizes: dict[str, int] = {}
    if isinstance(pool, QueuePool):
        sizes = {"in_use": pool.checkedout(), "size": pool.size()}
        if sizes["in_use"] >= sizes["size"]:
            return {"status": "busy", "pool": sizes}
    # Bounded: a frozen server (TCP up, no answer) held the whole view for the command
    # timeout (30 s), past a probe's or an SRE's curl's patience, hiding Redis's state too.
    # Not cancelled, left to end by its own timeout: cancelling it waited ~2 s more for the
    # connection's cleanup on that frozen server.
    ping = asyncio.ensure_future(_ping(engine))
    done, _ = await asyncio.wait({ping}, timeout=PING_SECONDS)
    if not done:
        _unanswered.add(ping)
        ping.add_done_callback(_forget)
    if not done or ping.exception() is not None:  # "not answering"; the caller only reports it
        return {"status": "down", **({"pool": sizes} if sizes else {})}
    return {"status": "up", **({"pool": sizes} if sizes else {})}


_unanswered: set[asyncio.Future[None]] = set()  # pings given up on, until they end


def _forget(ping: asyncio.Future[None]) -> None:
    _unanswered.discard(ping)
    if not ping.cancelled():
        ping.exception()  # retrieved: its failure was reported as `down` already


async def _ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
