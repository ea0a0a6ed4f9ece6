"""`orchestrator deadletters list`, the OrchestratorDeadLetters runbook's first step, on dead
letters a real worker process wrote from an AES's malformed callback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as sync_redis

from services.cli.embedded import RedisServer
from services.core import keys
from tests.e2e.conftest import new_stack
from tests.integration.start_checks import ROOT, base_env

pytestmark = pytest.mark.e2e

ESC = "\x1b"


def test_the_deadletters_table_escapes_an_aes_s_terminal_sequences(
    e2e_redis: RedisServer, tmp_path: Path
) -> None:
    """An SRE reads `orchestrator deadletters list` in a terminal. The table's TASK column
    is taken verbatim from the dead action's JSON, which an AES wrote: a callback whose
    `tenant_id`/`task_id` carry terminal control sequences (ESC `[2K` erase line, `]0;`
    set title, `]52;` write the clipboard, cursor moves) is dead-lettered as malformed, and
    the table wrote those bytes to the SRE's terminal unescaped: a row could hide itself or
    rewrite the rows above, and the clipboard could be filled with a command. Control
    characters are shown escaped now (as `--json` does), never emitted raw."""
    client = sync_redis.Redis(port=e2e_redis.port)
    client.delete(keys.DEAD_LETTERS)
    stack = new_stack(e2e_redis, tmp_path / "logs")
    try:
        stack.start("worker")
        action = {
            "action_type": "execution.completed",
            "tenant_id": f"acme{ESC}[2K{ESC}]0;owned{ESC}\\",
            "session_id": "s1",
            "task_id": f"t{ESC}[1A{ESC}[2K",
            "attempt": 1,
            "content": "x",
        }
        client.xadd(keys.callback_stream(0), {"action": json.dumps(action)})
        deadline = time.monotonic() + 15
        while client.xlen(keys.DEAD_LETTERS) == 0:
            stack.check_alive()
            assert time.monotonic() < deadline, "the malformed callback was not dead-lettered"
            time.sleep(0.1)
    finally:
        stack.stop()

    shown = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "deadletters", "list"],
        env=base_env(e2e_redis.url), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "acme" in shown.stdout, shown.stdout
    assert ESC not in shown.stdout, repr(shown.stdout)
