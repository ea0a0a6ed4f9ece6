"""Two versions side by side on one Valkey and one PostgreSQL, as during a rolling update.

The previous release (commit `OLD_COMMIT`) is unpacked to `OLD_TREE` by `git archive` (which
changes no git state) and its processes run from it: `PYTHONPATH` puts the old tree first and
`PYTHONSAFEPATH` keeps the current directory (this checkout, which the venv's editable install
also points at) off `sys.path`, so `-m services.cli.main` imports the old package. `old_tree`
checks that this really is so before any test relies on it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.cli.embedded import RedisServer
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import Child, LocalStack
from services.persistence.migrate import migrate
from tests.e2e.conftest import FAST_EXECUTOR, new_stack

OLD_COMMIT = "1c62846"
# Unpacked once per run (`old_tree`): a fixed place could hold another commit's files.
OLD_TREE = Path(tempfile.gettempdir()) / f"orchestrator-release-{OLD_COMMIT}-{os.getpid()}"
REPO = Path(__file__).resolve().parents[2]


def old_env() -> dict[str, str]:
    """What makes a child of this venv's interpreter import the old tree's `services`."""
    return {"PYTHONPATH": str(OLD_TREE), "PYTHONSAFEPATH": "1"}


@pytest.fixture(scope="session")
def old_tree() -> Iterator[Path]:
    """The previous release's files (unpacked once), checked to be what old children import."""
    if not (OLD_TREE / "services" / "core" / "lua" / "task_event.lua").exists():
        OLD_TREE.mkdir(parents=True, exist_ok=True)
        # Needs the repository's history (a clone, not a tarball): fails loudly without it.
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", OLD_COMMIT],
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            ["tar", "-x", "-C", str(OLD_TREE)], input=archive.stdout, check=True, timeout=60
        )
    probe = subprocess.run(
        [sys.executable, "-c", "import services; print(services.__file__)"],
        env={**old_env(), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert probe.stdout.strip() == str(OLD_TREE / "services" / "__init__.py"), probe
    yield OLD_TREE
    shutil.rmtree(OLD_TREE, ignore_errors=True)


def old_stack(redis: RedisServer, log_dir: Path, **settings: str) -> LocalStack:
    """A `LocalStack` whose children run the previous release."""
    stack = new_stack(redis, log_dir, **settings)
    stack.env.update(old_env())
    return stack


@dataclass
class Mixed:
    """An old and a new api on one Valkey and PostgreSQL; workers and executors swapped by
    the tests (`use`): at most one worker and one executor of a chosen version run."""

    old: LocalStack
    new: LocalStack
    old_api: Child
    new_api: Child
    redis: RedisServer
    database_url: str
    running: dict[str, tuple[str, Child]] = field(default_factory=dict)

    def stack(self, version: str) -> LocalStack:
        return self.old if version == "old" else self.new

    def use(self, *, worker: str, executor: str) -> None:
        """Run the worker and the executor of these versions ("old" or "new"), stopping the
        others (a SIGTERM: a worker gives its leases back and the next one starts at once)."""
        for role, version in (("worker", worker), ("executor", executor)):
            current = self.running.get(role)
            if current is not None and current[0] == version:
                continue
            if current is not None:
                self.stack(current[0]).stop_child(current[1])
            self.running[role] = (version, self.stack(version).start(role))
        self.old.check_alive()
        self.new.check_alive()


@pytest.fixture(scope="module")
def mixed_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def mixed(
    old_tree: Path, mixed_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mixed]:
    """An api of either version (history on), ready; no worker or executor yet."""
    postgres = PostgresServer(durable=False).start()
    logs = tmp_path_factory.mktemp("logs")
    # A short socket ttl: the refreshes of both versions run within a test.
    settings = {"database_url": postgres.url(), "connection_ttl_seconds": "3", **FAST_EXECUTOR}
    old, new = old_stack(mixed_redis, logs, **settings), new_stack(mixed_redis, logs, **settings)
    try:
        asyncio.run(migrate(postgres.url()))
        old_api, new_api = old.start_api(), new.start_api()
        old.wait_ready(old_api)
        new.wait_ready(new_api)
        yield Mixed(old, new, old_api, new_api, mixed_redis, postgres.url())
    finally:
        old.stop()
        new.stop()
        postgres.cleanup()
