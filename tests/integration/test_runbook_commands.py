"""The runbooks of docs/kubernetes.md, run as written against a real Valkey (found by the
review of the docs: the OrchestratorDeadLettersDropped runbook's command showed the 100
oldest dead letters, the ones being dropped, not what keeps failing now)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from services.core import keys
from services.core.actions import ACTION_FIELD

DOC = Path(__file__).resolve().parents[2] / "docs" / "kubernetes.md"
ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")


def runbook(name: str) -> str:
    text = DOC.read_text()
    start = text.index(f"### {name}\n")
    end = text.find("\n### ", start + 1)
    return text[start : end if end != -1 else None]


async def test_the_dropped_dead_letters_runbook_shows_what_keeps_failing_now(
    redis: Redis, redis_url: str
) -> None:
    [command] = re.findall(r"`(orchestrator deadletters list[^`]*)`", runbook(
        "OrchestratorDeadLettersDropped"))  # fmt: skip
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(1000):  # stands for the full stream
            reason = "old: handler failed" if n < 999 else "NEW: what keeps failing now"
            pipe.xadd(keys.DEAD_LETTERS, {
                "stream": "{aes}:actions:normal", "entry_id": f"{n + 1}-0", "group": "workers",
                "reason": reason, "at": "2026-11-27T00:00:00Z", ACTION_FIELD: b"{}",
            })  # fmt: skip
        await pipe.execute()
    env = {**os.environ, "ORCHESTRATOR_REDIS_URL": redis_url}
    args = shlex.split(command)[1:]
    result = subprocess.run(
        [ORCHESTRATOR, *args], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "NEW: what keeps failing now" in result.stdout, (command, result.stdout[-400:])
