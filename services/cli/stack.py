"""A local deployment of real processes: api(s), worker(s) and executor(s) on one Redis.

`orchestrator dev`, the end-to-end tests and the benchmarks all start the product through
this one class, so what the tests exercise is what a developer runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.cli import parent_watch
from services.cli.embedded import free_port

READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]
    log_path: Path | None
    port: int | None = None
    metrics_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self, tail: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-tail:]


@dataclass
class LocalStack:
    """Child processes sharing one environment; `stop()` ends every one of them, and each
    gets SIGTERM (a drain) if we die without stopping it (`parent_watch`).

    `own_sessions`: each child in a session of its own. On Linux with autogroup scheduling
    (`/proc/sys/kernel/sched_autogroup_enabled`), a session is a scheduling group that gets
    an equal share of a busy machine whatever the number of processes in it, the way each pod
    gets its own cgroup; the benchmark starts every server of either side that way, so that
    our api, worker and executor do not share one group's share against its peers' groups.
    Otherwise the children stay in our session and a terminal's Ctrl-C reaches them.
    """

    env: dict[str, str]
    log_dir: Path | None = None  # None: children inherit our stdout/stderr
    children: list[Child] = field(default_factory=list)
    own_sessions: bool = False

    @classmethod
    def for_redis(
        cls, redis_url: str, *, log_dir: Path | None = None, **settings: str
    ) -> LocalStack:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith("ORCHESTRATOR_")
        }
        env["ORCHESTRATOR_REDIS_URL"] = redis_url
        for name, value in settings.items():
            env[f"ORCHESTRATOR_{name.upper()}"] = value
        return cls(env=env, log_dir=log_dir)

    def _spawn(self, role: str, args: list[str], env: dict[str, str]) -> Child:
        log_path: Path | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = Path(tempfile.mkstemp(prefix=f"{role}-", suffix=".log", dir=self.log_dir)[1])
            with log_path.open("wb") as sink:
                process = parent_watch.popen(
                    [sys.executable, "-m", "services.cli.main", *args],
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=self.own_sessions,
                )
        else:
            process = parent_watch.popen(
                [sys.executable, "-m", "services.cli.main", *args],
                env=env,
                start_new_session=self.own_sessions,
            )
        child = Child(role, process, log_path)
        self.children.append(child)
        return child

    def start_api(self, *, host: str = "127.0.0.1", port: int | None = None, **extra: str) -> Child:
        port = port or free_port()
        metrics_port = free_port()
        env = {**self.env, "ORCHESTRATOR_METRICS_PORT": str(metrics_port), **_env(extra)}
        child = self._spawn("api", ["api", "--host", host, "--port", str(port)], env)
        child.port, child.metrics_port = port, metrics_port
        return child

    def start(self, role: str, **extra: str) -> Child:
        """Start a `worker` or an `executor`."""
        metrics_port = free_port()
        env = {**self.env, "ORCHESTRATOR_METRICS_PORT": str(metrics_port), **_env(extra)}
        child = self._spawn(role, [role], env)
        child.metrics_port = metrics_port
        return child

    def wait_ready(self, *apis: Child, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Return when every api answers /health/ready; raise if a child dies meanwhile."""
        deadline = time.monotonic() + timeout
        for api in apis:
            while True:
                self.check_alive()
                try:
                    with urllib.request.urlopen(f"{api.url}/health/ready", timeout=1) as reply:  # noqa: S310
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"api on port {api.port} not ready:\n{api.output()}")
                time.sleep(0.05)

    def wait_serving(self, child: Child, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Return when a worker's or an executor's metrics port answers: it has started, and a
        SIGTERM from then on is a clean stop (before, it kills the process: exit -15)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                url = f"http://127.0.0.1:{child.metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=1):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.role} not serving:\n{child.output()}")
            time.sleep(0.05)

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                raise RuntimeError(
                    f"{child.role} exited with {child.process.returncode}:\n{child.output()}"
                )

    def stop_child(self, child: Child, sig: signal.Signals = signal.SIGTERM) -> int:
        if child.alive():
            child.process.send_signal(sig)
        try:
            return child.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            child.process.kill()
            return child.process.wait()
        finally:
            if child in self.children:
                self.children.remove(child)

    def stop(self) -> None:
        for child in self.children:
            if child.alive():
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.children.clear()


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {f"ORCHESTRATOR_{name.upper()}": value for name, value in extra.items()}
