"""`orchestrator dev`: the whole product on one machine, no Kubernetes, nothing to install.

Starts an embedded Redis (one server; with `--redis-mode cluster` a local 3-master cluster;
with `sentinel` a primary, a replica and 3 sentinels) and PostgreSQL (migrated), then the api,
the worker and the reference executor as child processes, prints the URL and a ready-to-use
token, and stops every child on Ctrl-C (or when one of them dies), leaving nothing running.
Killed without that cleanup (SIGKILL, the OOM killer), it still leaves nothing on Linux: every
server and child is started from this main thread and is signalled when we die
(`services.cli.parent_watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from services.cli.embedded import LocalCluster, LocalRedis, LocalSentinel, RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import LocalStack
from services.core.auth import dev_secret_path, issue_token, read_dev_secret
from services.core.settings import load_settings
from services.persistence.migrate import migrate


def ensure_dev_secret() -> str:
    """The machine's dev secret, created (mode 0600) on first use."""
    existing = read_dev_secret()
    if existing:
        return existing
    path: Path = dev_secret_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_dev(*, host: str, port: int, redis_mode: str) -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the children too, like Ctrl-C
    secret = os.environ.get("ORCHESTRATOR_JWT_SECRET") or ensure_dev_secret()
    with contextlib.ExitStack() as servers:
        try:
            redis = local_redis(redis_mode)
            servers.callback(redis.cleanup)
            redis.start()
            postgres = PostgresServer()
            servers.callback(postgres.cleanup)
            postgres.start()
            asyncio.run(migrate(postgres.url()))
            stack = _stack(host, port, redis, secret, postgres.url())
            servers.callback(stack.stop)
            return _serve(stack, host, port, secret, describe(redis), postgres.url())
        except KeyboardInterrupt:
            return 0
        except RuntimeError as exc:
            print(f"orchestrator dev: {exc}", file=sys.stderr)
            return 1


def local_redis(redis_mode: str) -> LocalRedis:
    """The embedded Redis of `--redis-mode` (not started yet)."""
    if redis_mode == "cluster":
        return LocalCluster(masters=3)
    if redis_mode == "sentinel":
        return LocalSentinel()
    return RedisServer()


def describe(redis: LocalRedis) -> str:
    if isinstance(redis, LocalCluster):
        nodes = ", ".join(f"127.0.0.1:{port}" for port in redis.ports)
        return f"cluster of {redis.masters} primaries: {nodes}"
    if isinstance(redis, LocalSentinel):
        return (
            f"sentinel master {redis.master_name!r} (primary {redis.url}, replica "
            f"127.0.0.1:{redis.replica.port}), sentinels {redis.addresses}"
        )
    return redis.url


def _stack(host: str, port: int, redis: LocalRedis, secret: str, database_url: str) -> LocalStack:
    base_url = f"http://{host}:{port}"
    origins = [o for o in os.environ.get("ORCHESTRATOR_ALLOWED_ORIGINS", "").split(",") if o]
    origins += [base_url, f"http://localhost:{port}"]
    stack = LocalStack.for_redis(
        redis.url,
        log_dir=None,
        **redis.client_settings(),
        jwt_secret=secret,
        default_tier=os.environ.get("ORCHESTRATOR_DEFAULT_TIER", "pro"),
        allowed_origins=",".join(origins),
        database_url=database_url,
    )
    # Keep the rest of the caller's configuration (log level, pace of the executor, ...).
    for name, value in os.environ.items():
        if name.startswith("ORCHESTRATOR_") and name not in stack.env:
            stack.env[name] = value
    return stack


def _serve(
    stack: LocalStack, host: str, port: int, secret: str, redis_text: str, database_url: str
) -> int:
    base_url = f"http://{host}:{port}"
    api = stack.start_api(host=host, port=port)
    worker = stack.start("worker")
    executor = stack.start("executor")
    stack.wait_ready(api)
    settings = load_settings(jwt_secret=secret)
    token = issue_token(settings, tenant_id="demo", user_id="dev", ttl_seconds=86_400)
    print(
        "\nAgent Orchestrator is running\n"
        f"  URL:       {base_url}   (OpenAPI: {base_url}/schema)\n"
        f"  WebSocket: ws://{host}:{port}/ws/demo/<session_id>\n"
        f"  Redis:     {redis_text}\n"
        f"  Postgres:  {database_url}\n"
        f"  Metrics:   api :{api.metrics_port}, worker :{worker.metrics_port}, "
        f"executor :{executor.metrics_port}\n"
        "  Token (tenant 'demo', 24 h):\n"
        f"{token}\n"
        "  More tokens: orchestrator token --tenant demo --user alice\n"
        "Press Ctrl-C to stop.\n",
        flush=True,
    )
    while True:
        if any(not child.alive() for child in stack.children) and _interrupted(stack):
            return 0  # Ctrl-C reached the children first: an orderly stop, not a failure
        stack.check_alive()
        time.sleep(0.5)


def _interrupted(stack: LocalStack) -> bool:
    """Every child that ended was stopped, as Ctrl-C (the terminal signals the whole group)
    or a drain stops it: exit code 0 or killed by SIGINT or SIGTERM."""
    stopped = (0, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT)
    return all(child.alive() or child.process.returncode in stopped for child in stack.children)
