"""DESIGN §7: logs are JSON lines, also the last one of a service that stops on an error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis

from services.cli.embedded import RedisServer


def test_a_crashing_service_writes_its_traceback_as_a_json_line(
    redis_server: RedisServer,
) -> None:
    """An executor whose Redis user may not create consumer groups (an ACL without XGROUP)
    stops at start: it wrote Python's bare traceback, ~45 lines a log collector reads as as
    many records without service, level or time."""
    admin = redis.Redis.from_url(redis_server.url)
    admin.execute_command(
        "ACL", "SETUSER", "nogroups", "on", ">PWSECRET99", "~*", "&*", "+@all", "-xgroup"
    )
    admin.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_REDIS_URL"] = f"redis://nogroups:PWSECRET99@127.0.0.1:{redis_server.port}/0"
    env["ORCHESTRATOR_METRICS_PORT"] = "0"
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "executor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    output = (done.stdout + done.stderr).splitlines()
    assert "PWSECRET99" not in done.stdout + done.stderr
    records = [json.loads(line) for line in output if line.strip()]  # each line is JSON
    [last] = [record for record in records if record["level"] == "CRITICAL"]
    assert "NoPermissionError" in last["msg"], last
    assert "Traceback" in last["exc"], last
