"""A parent killed without its cleanup (SIGKILL, the OOM killer, a cancelled CI job) leaves
nothing running: Valkey, PostgreSQL, the api, the worker and the executor it started all
stop. They were in sessions of their own and kept their ports and memory forever, so that
the next `make dev` found stale servers.

Servers started from a thread that then ends (`asyncio.to_thread`, as some tests restart a
cluster node) keep running until their process dies: the kernel's parent-death signal is
tied to the thread that forked the child, not to the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from services.cli.embedded import free_port
from tests.e2e.clients import SECRET
from tests.integration.start_checks import ROOT

START_SECONDS = 90.0
GONE_SECONDS = 15.0
READY_LINE = "Press Ctrl-C to stop."


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a live process; None once it is gone or a zombie
    (an orphan's zombie stays until its new parent reaps it: it no longer runs)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    state, ppid, start = fields[0], int(fields[1]), fields[19]
    return None if state in ("Z", "X") else (ppid, state, start)


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root`, with its start time (a reused pid is another one)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = (stat[0], stat[2])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(gone)"


def survivors(processes: dict[int, str]) -> dict[int, str]:
    return {
        pid: command_line(pid)
        for pid, start in processes.items()
        if (stat := _stat(pid)) is not None and stat[2] == start
    }


def kill_and_wait_for_orphans(parent: subprocess.Popen[bytes], orphans: dict[int, str]) -> None:
    """SIGKILL `parent`; every one of `orphans` must be gone within GONE_SECONDS."""
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + GONE_SECONDS
    while (left := survivors(orphans)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:  # leave nothing behind for the next tests, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running {GONE_SECONDS} s after their parent was killed: {left}"


def wait_for_line(process: subprocess.Popen[bytes], log: Path, line: str) -> str:
    deadline = time.monotonic() + START_SECONDS
    while line not in (text := log.read_text(errors="replace")):
        assert process.poll() is None, f"exited with {process.returncode}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no {line!r} in {START_SECONDS} s:\n{text[-3000:]}"
        time.sleep(0.05)
    return text


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["ORCHESTRATOR_JWT_SECRET"] = SECRET
    env["ORCHESTRATOR_LOG_LEVEL"] = "WARNING"
    return env


def test_a_killed_orchestrator_dev_leaves_nothing_running(tmp_path: Path) -> None:
    log = tmp_path / "dev.log"
    with log.open("wb") as sink:
        dev = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "dev", "--port", str(free_port())],
            env=clean_env(),
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_line(dev, log, READY_LINE)
        started = descendants(dev.pid)
        commands = " | ".join(command_line(pid) for pid in started)
        for name in ("valkey-server", "postgres", " api ", " worker", " executor"):
            assert name in commands + " ", f"no {name.strip()} among {commands}"
        kill_and_wait_for_orphans(dev, started)
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()


# Valkey started from a thread that ends, PostgreSQL from `asyncio.to_thread` (the pool's
# thread ends with `asyncio.run`), then an api on both from the main thread: the api gets
# ready only if the servers outlived their threads.
THROWAWAY_PARENT = textwrap.dedent(
    """
    import asyncio, os, sys, threading, time
    from services.cli.embedded import RedisServer
    from services.cli.embedded_postgres import PostgresServer
    from services.cli.stack import LocalStack
    from services.persistence.migrate import migrate

    threads = []

    def in_thread(start):
        threads.append(threading.get_native_id())
        return start()

    def thread_gone(tid):
        return not os.path.exists(f"/proc/self/task/{tid}")

    servers = []
    worker = threading.Thread(target=lambda: servers.append(in_thread(RedisServer().start)))
    worker.start()
    worker.join()
    redis = servers[0]
    postgres = asyncio.run(asyncio.to_thread(in_thread, PostgresServer(durable=False).start))
    while not all(thread_gone(tid) for tid in threads):
        time.sleep(0.01)
    asyncio.run(migrate(postgres.url()))
    stack = LocalStack.for_redis(redis.url, database_url=postgres.url(), jwt_secret="s" * 32,
                                 metrics_port="0", log_level="WARNING")
    api = stack.start_api()
    stack.wait_ready(api)
    assert redis.alive() and postgres.running(), "a server died with the thread that started it"
    print("READY", flush=True)
    sys.stdin.read()
    """
)


def test_servers_started_from_threads_outlive_them_but_not_the_process(tmp_path: Path) -> None:
    log = tmp_path / "parent.log"
    with log.open("wb") as sink:
        parent = subprocess.Popen(
            [sys.executable, "-c", THROWAWAY_PARENT],
            env=clean_env(),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_line(parent, log, "READY")
        started = descendants(parent.pid)
        commands = " | ".join(command_line(pid) for pid in started)
        for name in ("valkey-server", "postgres", " api "):
            assert name in commands + " ", f"no {name.strip()} among {commands}"
        kill_and_wait_for_orphans(parent, started)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
