"""Real processes for end-to-end tests: embedded Redis, uvicorn api, worker, executor."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.cli.embedded import LocalCluster, LocalRedis, RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.otlp_sink import Receiver
from services.cli.stack import Child, LocalStack
from services.core.redis_client import create_redis
from services.core.settings import load_settings
from services.persistence.migrate import migrate
from tests.e2e.clients import SECRET

FAST_EXECUTOR = {"executor_chunk_delay_ms": "2"}


@pytest.fixture(scope="session")
def e2e_redis() -> Iterator[RedisServer]:
    """A Redis of its own: the integration tests flush theirs between tests."""
    server = RedisServer().start()
    yield server
    server.cleanup()


def new_stack(redis: LocalRedis, log_dir: Path, **settings: str) -> LocalStack:
    """Unknown tenants get the enterprise tier unless a test says otherwise: most tests are
    about the message path, not about limits. The processes use `redis`'s topology (a single
    server, a cluster or sentinels)."""
    settings.setdefault("default_tier", "enterprise")
    settings = {**redis.client_settings(), **settings}
    return LocalStack.for_redis(redis.url, log_dir=log_dir, jwt_secret=SECRET, **settings)


@contextmanager
def lone_api(redis: LocalRedis, log_dir: Path, **settings: str) -> Iterator[Child]:
    """One api process with these settings and no worker: the tests of what an api alone
    bounds (heads, bodies, frames, sockets)."""
    stack = new_stack(redis, log_dir, **settings)
    try:
        child = stack.start_api()
        stack.wait_ready(child)
        yield child
    finally:
        stack.stop()


def proc_kb(pid: int, field: str = "VmRSS") -> int:
    """A size in kB from `/proc/<pid>/status` (VmRSS, VmHWM...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def redis_client(redis: LocalRedis) -> Redis:
    """A client of the test's own on `redis`, of the kind the product uses for its topology."""
    return create_redis(load_settings(redis_url=redis.url, **redis.client_settings()))


def redis_env(redis: LocalRedis) -> dict[str, str]:
    """The `ORCHESTRATOR_*` variables that point a command at `redis`."""
    settings = {"redis_url": redis.url, **redis.client_settings()}
    return {f"ORCHESTRATOR_{name.upper()}": value for name, value in settings.items()}


class Deployment:
    """One api, one worker, one executor (plus whatever a test adds)."""

    def __init__(self, stack: LocalStack, api: Child) -> None:
        self.stack = stack
        self.api = api


@contextmanager
def deploy(redis: LocalRedis, log_dir: Path, **settings: str) -> Iterator[Deployment]:
    """One api, one worker and one executor on `redis` with `settings`, ready; all stopped
    at the end."""
    stack = new_stack(redis, log_dir, **settings)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        yield Deployment(stack, api)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def deployment(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with deploy(e2e_redis, tmp_path_factory.mktemp("logs"), **FAST_EXECUTOR) as deployed:
        yield deployed


@pytest.fixture
def two_apis(e2e_redis: RedisServer, tmp_path: Path) -> Iterator[tuple[LocalStack, Child, Child]]:
    """Two api processes (a socket's session on one, its reconnect on the other), a worker and
    an executor."""
    stack = new_stack(e2e_redis, tmp_path / "logs", **FAST_EXECUTOR)
    try:
        a, b = stack.start_api(), stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(a, b)
        yield stack, a, b
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def traced(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child, Receiver]]:
    """api, worker and executor exporting their spans to an OTLP sink (one per module)."""
    receiver = Receiver().start()
    stack = new_stack(e2e_redis, tmp_path_factory.mktemp("logs"), executor_chunk_delay_ms="1")
    stack.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    stack.env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        yield stack, api, receiver
    finally:
        stack.stop()
        receiver.stop()


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Valkey of the module's own (its tests read whole streams or counters)."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[LocalCluster]:
    """A 3-master cluster of the module's own (its tests freeze a node or remove slots)."""
    cluster = LocalCluster(masters=3).start()
    yield cluster
    cluster.cleanup()


@pytest.fixture(scope="module")
def aes_less_stack(
    own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalStack, Child, Child]]:
    """api and worker (with its persistence writer) on the module's own Valkey and PostgreSQL,
    no executor: the tests answer as an external AES (tests/e2e/external_aes.py), so usage
    figures and their timing are exact. Yields (stack, api, worker)."""
    postgres = PostgresServer(durable=False).start()
    stack = new_stack(
        own_redis,
        tmp_path_factory.mktemp("logs"),
        database_url=postgres.url(),
        retry_backoff_seconds="0.05",
        retry_backoff_max_seconds="0.1",
    )
    try:
        asyncio.run(migrate(postgres.url()))
        api = stack.start_api()
        worker = stack.start("worker")
        stack.wait_ready(api)
        yield stack, api, worker
    finally:
        stack.stop()
        postgres.cleanup()
