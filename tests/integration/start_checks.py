"""Start one real `orchestrator` process with some settings; see how it ends (bounded).

Shared by the tests of what a process refuses at start (exit 2, one line naming the setting)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.cli.embedded import free_port
from tests.e2e.clients import SECRET

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    state: str  # "exited" or "ready" or "running"
    returncode: int | None
    output: str
    port: int | None = None

    def describe(self) -> str:
        return f"{self.state} (rc={self.returncode}); output tail:\n{self.output[-2500:]}"


def base_env(redis_url: str | None, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    if redis_url is not None:
        env["ORCHESTRATOR_REDIS_URL"] = redis_url
    env["ORCHESTRATOR_JWT_SECRET"] = SECRET
    env["ORCHESTRATOR_METRICS_PORT"] = "0"
    for name, value in settings.items():
        env[f"ORCHESTRATOR_{name.upper()}"] = value
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *args],
            env=env,
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_role(
    role: str, env: dict[str, str], log: Path, *, timeout: float = 20.0, keep: bool = False
) -> tuple[Outcome, subprocess.Popen[bytes]]:
    """Start `role`; return when it exits, (an api) answers /health/ready, or `timeout`.
    A process still running is stopped unless `keep`."""
    port = free_port() if role == "api" else None
    args = [role, "--host", "127.0.0.1", "--port", str(port)] if role == "api" else role.split()
    process = start(args, env, log)
    deadline = time.monotonic() + timeout
    state = "running"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            state = "exited"
            break
        if port is not None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/health/ready", timeout=1
                ) as reply:
                    if reply.status == 200:
                        state = "ready"
                        break
            except OSError:
                pass
        time.sleep(0.05)
    if not keep:
        stop(process)
    return Outcome(state, process.poll(), log.read_text(errors="replace"), port), process


def assert_refused_at_start(outcome: Outcome, variable: str) -> None:
    """DESIGN §6 / README: exit code 2, one line naming the variable, no traceback."""
    assert outcome.state == "exited", f"expected a refusal at start, got {outcome.describe()}"
    assert "Traceback" not in outcome.output, f"a traceback, not one line: {outcome.describe()}"
    assert outcome.returncode == 2, outcome.describe()
    assert variable in outcome.output, f"{variable} not named: {outcome.describe()}"
