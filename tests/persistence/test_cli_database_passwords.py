"""The SRE side: a password with special characters, migrate up/down/re-run, prune."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from services.cli.embedded_postgres import PostgresServer, find_binaries

PASSWORD = "p@ss:w/o rd%#?&=+[]€'\"\\"
ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    pg = PostgresServer(durable=False).start()
    try:

        async def setup() -> None:
            conn = await asyncpg.connect(pg.url())
            try:
                await conn.execute("SET password_encryption = 'scram-sha-256'")
                literal = PASSWORD.replace("'", "''")
                await conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{literal}'")
                await conn.execute("CREATE DATABASE appdb OWNER app")
                await conn.execute("CREATE ROLE reader LOGIN")  # no CREATE on appdb's schema
            finally:
                await conn.close()

        asyncio.run(setup())
        hba = pg.data_dir / "pg_hba.conf"
        stat = hba.stat()
        hba.write_text(
            "local all all trust\n"
            "host all app 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
        )
        os.chown(hba, stat.st_uid, stat.st_gid)

        async def reload() -> None:
            conn = await asyncpg.connect(pg.url())
            try:
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()

        asyncio.run(reload())
        yield pg
    finally:
        pg.cleanup()


def run(command: list[str], url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATOR_DATABASE_URL": url}
    return subprocess.run(
        [ORCHESTRATOR, *command], env=env, capture_output=True, text=True, timeout=60
    )


def app_url(pg: PostgresServer, password: str) -> str:
    return f"postgresql://app:{quote(password, safe='')}@127.0.0.1:{pg.port}/appdb"


def test_a_wrong_password_is_refused_so_the_server_checks_it(server: PostgresServer) -> None:
    """Sanity: the role's password is really checked; the error does not echo the URL."""
    done = run(["migrate"], app_url(server, "wrong"))
    assert done.returncode == 1, done
    assert "wrong" not in done.stderr, done.stderr


def test_special_characters_in_the_password_migrate_down_up_rerun_and_prune(
    server: PostgresServer,
) -> None:
    """A percent-encoded password with @ : / space % # ? & = + [ ] € ' \" \\ works for
    migrate, migrate --down base, migrate again (twice) and prune (twice, idempotent)."""
    url = app_url(server, PASSWORD)
    outputs = [
        run(["migrate"], url),
        run(["migrate", "--down", "base"], url),
        run(["migrate"], url),
        run(["migrate"], url),
        run(["prune"], url),
        run(["prune"], url),
    ]
    for done in outputs:
        assert done.returncode == 0, (done.args, done.stdout, done.stderr)
    assert outputs[1].stdout.strip() == "database schema at revision base"
    assert outputs[2].stdout == outputs[3].stdout
    assert "messages 0, tasks 0, usage_events 0, sessions 0" in outputs[5].stdout


def test_the_password_in_the_query_string_as_libpq_reads_it(server: PostgresServer) -> None:
    """README: the URL may carry libpq parameters as a managed database gives them. libpq
    percent-decodes `?password=` only ('+' stays '+'): psql connects with this URL. The
    orchestrator reads the query as a form ('+' becomes a space) and is refused: "PostgreSQL
    unreachable: DBAPIError: password authentication failed for user "app"". (The same
    turns '+' into ' ' in application_name, options, sslpassword and certificate paths.)"""
    base = f"postgresql://app@127.0.0.1:{server.port}/appdb"
    url = f"{base}?password={quote(PASSWORD, safe='+')}"
    psql = find_binaries() / "psql"
    libpq = subprocess.run(
        [str(psql), url, "-Atc", "select 1"], capture_output=True, text=True, timeout=30
    )
    assert libpq.stdout.strip() == "1", libpq.stderr  # libpq (psql) connects with this URL
    done = run(["migrate"], url)
    assert done.returncode == 0, (done.stdout, done.stderr)


def test_migrate_refused_by_a_permission_is_not_reported_as_unreachable(
    server: PostgresServer,
) -> None:
    """An SRE runs `orchestrator migrate` with a role that may connect but lacks the grants
    (no CREATE on schema public for non-owners since PostgreSQL 15, or no rights on the
    tables). They expect to be told the database refused the migration; instead the CLI says
    "orchestrator: PostgreSQL unreachable: ProgrammingError: permission denied for table
    alembic_version", sending them to check the network and the server, not the grants."""
    url = f"postgresql://reader@127.0.0.1:{server.port}/appdb"
    done = run(["migrate"], url)
    assert done.returncode != 0, done
    assert "permission denied" in done.stderr, done.stderr
    assert "unreachable" not in done.stderr, done.stderr
