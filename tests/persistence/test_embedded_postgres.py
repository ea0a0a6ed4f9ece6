"""The embedded PostgreSQL: a loopback server that stops completely and restarts in place."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg

from services.cli.embedded_postgres import PostgresServer


def server_processes(data_dir: Path) -> list[int]:
    """Pids of processes whose command line names `data_dir` (the postmaster)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(data_dir).encode() in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_stop_leaves_no_server_process_and_start_resumes_on_the_same_port_and_data() -> None:
    server = PostgresServer(durable=False).start()
    try:
        assert server.process is not None
        postmaster = server.process.pid
        conn = await asyncpg.connect(server.url())
        await conn.execute("CREATE TABLE kept (value int); INSERT INTO kept VALUES (42)")
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        await conn.close()

        server.stop()
        assert not alive(postmaster)
        assert not alive(backend)
        assert server_processes(server.data_dir) == []

        port = server.port
        server.start()
        assert server.port == port
        conn = await asyncpg.connect(server.url())
        assert await conn.fetchval("SELECT value FROM kept") == 42
        await conn.close()
    finally:
        server.cleanup()
    assert not server.directory.exists()
    assert server_processes(server.data_dir) == []
