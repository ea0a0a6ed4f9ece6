"""`MONITOR` on every node of a cluster, parsed: which keys each command and script touched.

A cluster refuses a multi-key command or a script whose declared keys span slots (CROSSSLOT),
and a script that touches an undeclared key or sharded channel of another slot; those
refusals surface as errors in the product's logs. This module checks the other side: every
command the nodes did run, and every command run inside a script (MONITOR shows them as
`lua` lines right after the script's own line), stayed on one slot, and every key the product
wrote belongs to one of the documented hash-tag families.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from redis.crc import key_slot

from services.cli.embedded import LocalCluster, find_cli

_LINE = re.compile(r"^(\d+\.\d+) \[\d+ ([^\]]+)\] (.*)$")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|.)")
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b"}

SCRIPTS = {"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"}
NO_KEYS = {
    "AUTH", "ASKING", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DBSIZE", "ECHO", "EXEC",
    "FLUSHALL", "FLUSHDB", "FUNCTION", "HELLO", "INFO", "MONITOR", "MULTI", "PING", "PUBLISH",
    "PUBSUB", "PUNSUBSCRIBE", "PSUBSCRIBE", "QUIT", "READONLY", "READWRITE", "RESET", "SCAN",
    "SCRIPT", "SELECT", "SUBSCRIBE", "TIME", "UNSUBSCRIBE", "UNWATCH", "DISCARD", "WAIT",
    "LATENCY", "SLOWLOG", "MEMORY", "ROLE", "REPLCONF", "PSYNC", "SYNC", "LASTSAVE",
}  # fmt: skip
ALL_KEYS = {"DEL", "UNLINK", "EXISTS", "TOUCH", "MGET", "WATCH", "SINTER", "SUNION", "SDIFF",
            "PFCOUNT", "SSUBSCRIBE", "SUNSUBSCRIBE"}  # fmt: skip
SUBCOMMAND_THEN_KEY = {"XGROUP", "XINFO", "OBJECT"}
WRITES = {
    "SET", "SETEX", "PSETEX", "SETNX", "GETDEL", "GETEX", "HSET", "HMSET", "HSETNX", "HDEL",
    "HINCRBY", "HINCRBYFLOAT", "INCR", "INCRBY", "DECR", "DECRBY", "XADD", "XACK", "XDEL",
    "XTRIM", "XGROUP", "XCLAIM", "XAUTOCLAIM", "XREADGROUP", "ZADD", "ZREM",
    "ZREMRANGEBYSCORE", "ZINCRBY", "SADD", "SREM", "EXPIRE", "PEXPIRE", "EXPIREAT",
    "PEXPIREAT", "PERSIST", "DEL", "UNLINK", "LPUSH", "RPUSH", "LPOP", "RPOP", "SPUBLISH",
}  # fmt: skip

# Every key the product writes has one of these shapes (README, "Redis keys").
FAMILIES = {
    "session": re.compile(
        r"^\{s:[\w-]+:[\w-]+\}:(log|events|rl|task:[\w-]+|applied:marks|applied:erased:[\w-]+"
        r"|unwritten|tasks)$"
    ),
    "task location": re.compile(r"^\{t:[\w-]+\}:(where|recancel)$"),
    "tenant": re.compile(
        r"^\{tn:[\w-]+\}:(broadcast|sockets|quota|quota-owner|quota-contenders|rl"
        r"|usage:\d{4}-\d{2}-\d{2}|counted:[\w-]+|idem:[0-9a-f]+|applied:mark)$"
    ),
    "aes contract": re.compile(r"^\{aes\}:(actions:(high|normal|low)|cancel)$"),
    "callback partition": re.compile(r"^\{cb:\d+\}:(callbacks|lease|released|deadlines|retries)$"),
    "dead-letter replay marks": re.compile(r"^\{[^}]+\}:dlq:replayed:\d+-\d+$"),
    "dead letters": re.compile(r"^\{dlq\}:actions$"),
    "workers": re.compile(r"^\{workers\}:(heartbeats|departures)$"),
    "quota index": re.compile(r"^\{quota\}:(tenants|changes|tiers)$"),
    "persistence": re.compile(r"^\{persist\}:records$"),
    "pod": re.compile(r"^\{pod:[\w-]+\}:control$"),
    "health probes": re.compile(r"^\{health(:\d+)?\}:probe:[\w.-]+$"),
    "task index start": re.compile(r"^\{tasks\}:index-since$"),
    "partition count": re.compile(r"^\{cb\}:partitions$"),
}


def _unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code.startswith("x") and len(code) == 3:
            return chr(int(code[1:], 16))
        return _SIMPLE_ESCAPES.get(code, code)

    return _ESCAPE.sub(one, text)


@dataclass
class Command:
    node: int
    source: str  # client address, or "lua" inside a script
    args: list[str]
    inner: list[Command] = field(default_factory=list)  # a script's commands

    @property
    def name(self) -> str:
        return self.args[0].upper() if self.args else ""

    def key_names(self) -> list[str]:
        """The keys (and sharded channels) the command names."""
        name, rest = self.name, self.args[1:]
        if name in NO_KEYS or not rest:
            return []
        if name in SCRIPTS:
            return rest[2 : 2 + int(rest[1])]
        if name in ("XREAD", "XREADGROUP"):
            upper = [arg.upper() for arg in rest]
            tail = rest[upper.index("STREAMS") + 1 :]
            return tail[: len(tail) // 2]
        if name in ALL_KEYS:
            return rest
        if name in ("MSET", "MSETNX"):
            return rest[::2]
        if name in SUBCOMMAND_THEN_KEY:
            return rest[1:2]
        return rest[:1]

    def slots(self) -> set[int]:
        found = {key_slot(key.encode("latin-1")) for key in self.key_names()}
        for command in self.inner:
            found |= command.slots()
        return found


def parse(path: Path, node: int) -> list[Command]:
    commands: list[Command] = []
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        args = [_unescape(arg) for arg in _ARG.findall(match.group(3))]
        command = Command(node, match.group(2), args)
        if command.source == "lua" and commands and commands[-1].name in SCRIPTS:
            commands[-1].inner.append(command)
        else:
            commands.append(command)
    return commands


def family(key: str) -> str | None:
    return next((name for name, shape in FAMILIES.items() if shape.match(key)), None)


def shape(key: str) -> str:
    """The key with its ids replaced by placeholders, for a readable list."""
    key = re.sub(r"^\{s:[\w-]+:[\w-]+\}", "{s:T:S}", key)
    key = re.sub(r"^\{(t|tn|pod):[\w-]+\}", lambda m: "{" + m.group(1) + ":ID}", key)
    key = re.sub(r"^\{cb:\d+\}", "{cb:N}", key)
    key = re.sub(r"\d{4}-\d{2}-\d{2}$", "DAY", key)
    return re.sub(r":(task|applied|counted|idem):[\w-]+$", r":\1:ID", key)


class Monitor:
    """`valkey-cli monitor` on every node of `cluster`, each into its own file."""

    def __init__(self, cluster: LocalCluster, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = [directory / f"monitor-{port}.txt" for port in cluster.ports]
        self.processes = []
        for port, path in zip(cluster.ports, self.paths, strict=True):
            with path.open("wb") as sink:
                self.processes.append(
                    subprocess.Popen(
                        [str(find_cli()), "-p", str(port), "monitor"],
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                    )
                )

    def ready(self) -> bool:
        """Each monitor has been accepted (its first line, OK, is written)."""
        return all(path.exists() and path.read_bytes().startswith(b"OK") for path in self.paths)

    def stop(self) -> list[Command]:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=10)
        commands: list[Command] = []
        for node, path in enumerate(self.paths):
            commands += parse(path, node)
        return commands
