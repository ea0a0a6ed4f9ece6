"""A developer new to the project follows README "Walk-through" and "Commands".

The walk-through runs against the processes `make dev` starts (api, worker, executor on a
real Valkey; unknown tenants get `pro`, `orchestrator dev`'s default tier), with the token
printed by `orchestrator token` from the dev secret, as the README's first line does."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import websockets

from services.cli.embedded import RedisServer
from services.cli.main import build_parser
from services.cli.stack import LocalStack
from tests.e2e.clients import events_until, final_of, next_event
from tests.integration.start_checks import ROOT

pytestmark = pytest.mark.e2e


def _dev_secret_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"))
    return env


async def test_walkthrough_commands_print_the_documented_shapes(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Guard: README Walk-through steps 1-4 (token from the dev secret, socket by `?token=`
    without a subprotocol as `python -m websockets` opens it, the REST send's answer, the
    socket's status/chunk/response frames and their data, the task's state)."""
    env = _dev_secret_env(tmp_path)
    # `orchestrator dev` keeps its secret where `orchestrator token` finds it.
    code = "from services.cli.dev import ensure_dev_secret; print(ensure_dev_secret())"
    secret = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    token = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "token", "--tenant", "demo", "--user", "alice"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert token.returncode == 0, token
    assert token.stderr == "", token
    bearer = token.stdout.strip()
    assert bearer.count(".") == 2, bearer

    stack = LocalStack.for_redis(
        redis_server.url,
        log_dir=tmp_path / "logs",
        jwt_secret=secret,
        default_tier="pro",
        executor_chunk_delay_ms="1",
        metrics_port="0",
    )
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        base, ws_base = api.url, api.url.replace("http", "ws", 1)
        session = "my-session"
        async with websockets.connect(
            f"{ws_base}/ws/demo/{session}?token={bearer}", open_timeout=10
        ) as ws:
            ack = await next_event(ws)
            assert ack["type"] == "connection.ack", ack
            async with httpx.AsyncClient() as http:
                reply = await http.post(
                    f"{base}/api/chat/send",
                    headers={"Authorization": f"Bearer {bearer}"},
                    json={"message": "Hello, agent!", "stream": True, "session_id": session},
                    timeout=10,
                )
                assert reply.status_code == 202, reply.text
                body = reply.json()
                assert set(body) == {"task_id", "status", "session_id"}, body
                assert body["status"] == "processing", body
                assert body["session_id"] == session, body
                task_id = body["task_id"]
                events = await events_until(ws, final_of(task_id))
                mine = [e for e in events if e.get("task_id") == task_id]
                for event in mine:
                    assert set(event) == {"id", "type", "data", "task_id"}, event
                first = mine[0]
                assert first["type"] == "chat.status", mine
                assert first["data"]["status"] == "processing", first
                assert first["data"]["attempt"] == 1, first
                chunks = [e for e in mine if e["type"] == "chat.chunk"]
                assert chunks, mine
                assert chunks[0]["data"] == {"delta": "[default] ", "seq": 1, "attempt": 1}, chunks
                assert [c["data"]["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
                final = mine[-1]
                assert final["type"] == "chat.response", final
                assert final["data"]["content"] == "[default] You said: Hello, agent!"
                assert final["data"]["role"] == "assistant", final
                assert "usage" in final["data"], final
                state = await http.get(
                    f"{base}/api/chat/tasks/{task_id}",
                    headers={"Authorization": f"Bearer {bearer}"},
                    timeout=10,
                )
                assert state.status_code == 200, state.text
                assert state.json()["status"] == "completed", state.json()
                assert {"task_id", "status", "created_at", "updated_at"} <= set(state.json())
            # The frames the README says one can type in the socket's prompt.
            await ws.send('{"type": "ping"}')
            pong = await next_event(ws)
            assert pong["type"] == "pong", pong
            assert "id" in pong, pong
            await ws.send('{"type": "chat.send", "data": {"message": "hi", "stream": true}}')
            typed = await events_until(ws, lambda e: e["type"] in ("chat.response", "chat.error"))
            assert typed[-1]["type"] == "chat.response", typed
            assert typed[-1]["data"]["content"] == "[default] You said: hi", typed[-1]
    finally:
        stack.stop()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                for inner, subsub in _subparsers(sub).items():
                    found[f"{name} {inner}"] = subsub
    return found


def test_every_option_of_every_command_is_in_readme_commands() -> None:
    """README "Commands" is the developer's reference for `orchestrator`. Expected: every
    option `orchestrator <command> --help` lists is in that section. Instead some are only in
    `--help` (listed in the assertion): `operator`'s `--namespace`, `-A/--all-namespaces`,
    `--standalone`, `--priority` (the row says just `orchestrator operator`) and `schemas
    --dir`; the operator's own variables (`ORCHESTRATOR_OPERATOR_*`) are not in
    "Configuration" either (only in docs/operator.md)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Commands", 1)[1].split("## Development", 1)[0]
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and option not in section:
                    missing.append(f"{name} {option}")
    assert not missing, f"options of `orchestrator` not in README Commands: {missing}"


def test_help_lists_the_readme_commands() -> None:
    """Guard: each command of README's Commands table is a subcommand of `orchestrator
    --help`, and each `tenants`/`deadletters` action the table names exists."""
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    for command in (
        "api",
        "worker",
        "executor",
        "dev",
        "token",
        "schemas",
        "tenants",
        "deadletters",
        "migrate",
        "prune",
        "operator",
        "bench",
    ):
        assert f"    {command}" in result.stdout, (command, result.stdout)
    subs = _subparsers(build_parser())
    for action in (
        "tenants set",
        "tenants get",
        "tenants list",
        "tenants delete",
        "deadletters list",
        "deadletters replay",
        "deadletters discard",
    ):
        assert action in subs, action
