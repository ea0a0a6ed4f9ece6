"""`orchestrator dev`: the whole product on one machine, no Kubernetes, nothing to install.

Starts an embedded Redis, then the api, the worker and the reference executor as child
processes, prints the URL and a ready-to-use token, and stops every child on Ctrl-C (or when
one of them dies), leaving nothing running.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from services.cli.embedded import RedisServer, free_port
from services.core.auth import dev_secret_path, issue_token, read_dev_secret
from services.core.settings import load_settings

READY_TIMEOUT_SECONDS = 30.0


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


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            raise RuntimeError("a process exited during start-up; see its output above")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback)
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the api did not become ready at {url}")


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_dev(*, host: str, port: int, redis_mode: str) -> int:
    secret = os.environ.get("ORCHESTRATOR_JWT_SECRET") or ensure_dev_secret()
    redis = RedisServer().start()
    base_url = f"http://{host}:{port}"
    origins = [o for o in os.environ.get("ORCHESTRATOR_ALLOWED_ORIGINS", "").split(",") if o]
    origins += [base_url, f"http://localhost:{port}"]
    env = {
        **os.environ,
        "ORCHESTRATOR_REDIS_URL": redis.url,
        "ORCHESTRATOR_REDIS_MODE": redis_mode,
        "ORCHESTRATOR_JWT_SECRET": secret,
        "ORCHESTRATOR_DEFAULT_TIER": os.environ.get("ORCHESTRATOR_DEFAULT_TIER", "pro"),
        "ORCHESTRATOR_ALLOWED_ORIGINS": ",".join(origins),
    }
    command = [sys.executable, "-m", "services.cli.main"]
    metrics = {name: free_port() for name in ("api", "worker", "executor")}
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(
            subprocess.Popen(
                [*command, "api", "--host", host, "--port", str(port)],
                env={**env, "ORCHESTRATOR_METRICS_PORT": str(metrics["api"])},
            )
        )
        for name in ("worker", "executor"):
            children.append(
                subprocess.Popen(
                    [*command, name], env={**env, "ORCHESTRATOR_METRICS_PORT": str(metrics[name])}
                )
            )
        _wait_ready(f"{base_url}/health/ready", children)
        settings = load_settings(jwt_secret=secret)
        token = issue_token(settings, tenant_id="demo", user_id="dev", ttl_seconds=86_400)
        print(
            "\nAgent Orchestrator is running\n"
            f"  URL:       {base_url}   (OpenAPI: {base_url}/schema)\n"
            f"  WebSocket: ws://{host}:{port}/ws/demo/<session_id>\n"
            f"  Redis:     {redis.url}\n"
            f"  Metrics:   api :{metrics['api']}, worker :{metrics['worker']}, "
            f"executor :{metrics['executor']}\n"
            "  Token (tenant 'demo', 24 h):\n"
            f"{token}\n"
            "  More tokens: orchestrator token --tenant demo --user alice\n"
            "Press Ctrl-C to stop.\n",
            flush=True,
        )
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("a process stopped; shutting everything down", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"orchestrator dev: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(children)
        redis.cleanup()
