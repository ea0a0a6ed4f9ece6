"""A `LocalSentinel` whose primary, replica and sentinels all require passwords, as an SRE's
production Sentinel does: the primary's password in `REDIS_URL`, the sentinels' own
credentials in `REDIS_SENTINEL_USERNAME`/`_PASSWORD` (README "Redis topologies")."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import redis

from services.cli import embedded
from services.cli.embedded import SENTINEL_READY_SECONDS, LocalSentinel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRIMARY_PASSWORD = "primary-Secret-7781"
SENTINEL_PASSWORD = "sentinel-Secret-4432"


def command(port: int, password: str | None, *args: str) -> Any:
    client = redis.Redis(
        host="127.0.0.1", port=port, password=password, socket_timeout=2,
        socket_connect_timeout=2, decode_responses=True,
    )  # fmt: skip
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


@contextlib.contextmanager
def noauth_ping() -> Iterator[None]:
    """The harness's start check sends a bare PING: a server that requires a password answers
    NOAUTH, which is as good a sign that it listens."""
    plain = embedded._answers_ping

    def answers(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                reply = conn.recv(64)
                return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
        except OSError:
            return False

    embedded._answers_ping = answers
    try:
        yield
    finally:
        embedded._answers_ping = plain


class SecuredSentinel(LocalSentinel):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        auth = ("--requirepass", PRIMARY_PASSWORD, "--masterauth", PRIMARY_PASSWORD)
        self.primary.extra_args = (*self.primary.extra_args, *auth)
        self.replica.extra_args = (*self.replica.extra_args, *auth)
        for sentinel in self.sentinels:
            assert sentinel.config is not None
            sentinel.config += (
                f"sentinel auth-pass {self.master_name} {PRIMARY_PASSWORD}\n"
                f"requirepass {SENTINEL_PASSWORD}\n"
                f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            )

    @property
    def url(self) -> str:
        return f"redis://:{PRIMARY_PASSWORD}@127.0.0.1:{self.master_port()}/0"

    def client_settings(self) -> dict[str, str]:
        return {
            **super().client_settings(),
            "redis_sentinel_username": "default",
            "redis_sentinel_password": SENTINEL_PASSWORD,
        }

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment of a CLI command pointed at this deployment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
        settings = {"redis_url": self.url, **self.client_settings(), **overrides}
        for name, value in settings.items():
            env[f"ORCHESTRATOR_{name.upper()}"] = value
        return env

    def start(self) -> SecuredSentinel:
        with noauth_ping():
            super().start()
        return self

    def restart(self, server: embedded.RedisServer) -> None:
        with noauth_ping():
            server.start()

    def _replicating(self) -> bool:
        try:
            info = command(self.replica.port, PRIMARY_PASSWORD, "INFO", "replication")
        except (redis.RedisError, OSError):
            return False
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            try:
                replicas = command(
                    sentinel.port, SENTINEL_PASSWORD, "SENTINEL", "REPLICAS", self.master_name
                )
                others = command(
                    sentinel.port, SENTINEL_PASSWORD, "SENTINEL", "SENTINELS", self.master_name
                )
            except (redis.RedisError, OSError):
                return False
            if len(replicas) < 1 or len(others) < len(self.sentinels) - 1:
                return False
        return True

    def master_port(self) -> int:
        for sentinel in self.sentinels:
            try:
                address = command(
                    sentinel.port, SENTINEL_PASSWORD, "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                    self.master_name,
                )  # fmt: skip
            except (redis.RedisError, OSError):
                continue
            if address:
                return int(address[1])
        raise RuntimeError("no sentinel answers")

    def role(self, port: int) -> str:
        try:
            info = command(port, PRIMARY_PASSWORD, "INFO", "replication")
        except (redis.RedisError, OSError):
            return ""
        return str(info.get("role", "")) if isinstance(info, dict) else ""

    def failover(self) -> int:
        """`SENTINEL FAILOVER mymaster` (a manual failover: no data loss); the old port."""
        old = self.master_port()
        command(self.sentinels[0].port, SENTINEL_PASSWORD, "SENTINEL", "FAILOVER", self.master_name)
        return old

    def wait_failover(self, old_port: int, timeout: float = SENTINEL_READY_SECONDS) -> float:
        def promoted() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                try:
                    address = command(
                        sentinel.port, SENTINEL_PASSWORD, "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                        self.master_name,
                    )  # fmt: skip
                except (redis.RedisError, OSError):
                    return False
                ports.add(int(address[1]))
            if len(ports) != 1 or old_port in ports:
                return False
            return self.role(ports.pop()) == "master"

        started = time.monotonic()
        while not promoted():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"no failover away from port {old_port} within {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def wait_replica_in_sync(self, port: int, timeout: float = 20) -> None:
        """Until the server on `port` is a replica with its link up (the demoted primary)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = command(port, PRIMARY_PASSWORD, "INFO", "replication")
                if info.get("role") == "slave" and info.get("master_link_status") == "up":
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{port} did not become an in-sync replica within {timeout} s")


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
